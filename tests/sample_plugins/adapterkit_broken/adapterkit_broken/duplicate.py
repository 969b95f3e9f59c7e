"""Registers a name the built-ins already own: the collision names both plugins."""

from __future__ import annotations

from adapterkit import Registry, Splitter, hookimpl


class Dense(Splitter):
    pass


@hookimpl
def adapterkit_register_splitters(registry: Registry[Splitter]) -> None:
    registry.add("dense", Dense)
