"""Imports fine, but its registration hook raises after adding a name."""

from __future__ import annotations

from adapterkit import Registry, Sampler, Splitter, hookimpl


class Half(Splitter):
    pass


@hookimpl
def adapterkit_register_splitters(registry: Registry[Splitter]) -> None:
    registry.add("half_registered", Half)  # must be rolled back when the next hook fails


@hookimpl
def adapterkit_register_samplers(registry: Registry[Sampler]) -> None:
    raise RuntimeError("sampler table is corrupt")
