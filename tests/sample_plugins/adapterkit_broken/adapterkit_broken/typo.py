"""A misspelled hook name: pluggy's check_pending must catch it."""

from __future__ import annotations

from adapterkit import Registry, Splitter, hookimpl


class Typo(Splitter):
    pass


@hookimpl
def adapterkit_register_spliters(registry: Registry[Splitter]) -> None:
    registry.add("typo", Typo)
