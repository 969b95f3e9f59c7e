"""Registers a sampler fine, but its command hook raises: the CLI must survive it."""

from __future__ import annotations

import click

from adapterkit import Registry, Sampler, hookimpl


class Never(Sampler):
    pass


@hookimpl
def adapterkit_register_samplers(registry: Registry[Sampler]) -> None:
    registry.add("never", Never)


@hookimpl
def adapterkit_register_commands(cli: click.Group) -> None:
    raise RuntimeError("command table is corrupt")
