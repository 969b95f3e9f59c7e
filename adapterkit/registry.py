"""Typed name -> class registries, one per role."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Generic, TypeVar

from .errors import DuplicateNameError, UnknownNameError

T = TypeVar("T")


class Registry(Mapping[str, type[T]], Generic[T]):
    """A read-only mapping of names to plugin classes for one role.

    Plugins add entries through :meth:`add` from their registration hook; the host
    records which plugin supplied each name so collisions and listings can name it.
    """

    def __init__(self, role: str, base: type[T]) -> None:
        self.role = role
        self.base = base
        self._items: dict[str, type[T]] = {}
        self._providers: dict[str, str] = {}
        self._current_plugin = "<direct>"
        # set by the plugin host: the plugins that did not load (failed, blocked, not
        # enabled), each described in a few words; an unknown name names them
        self.unavailable: Callable[[], list[str]] | None = None

    def add(self, name: str, cls: type[T]) -> None:
        """Register ``cls`` under ``name``; a name already taken raises."""
        if not isinstance(cls, type) or not issubclass(cls, self.base):
            raise TypeError(
                f"{self.role} {name!r} from plugin {self._current_plugin!r} must be a "
                f"subclass of {self.base.__name__}, got {cls!r}"
            )
        if name in self._items:
            raise DuplicateNameError(
                f"{self.role} {name!r} is registered twice: by plugin "
                f"{self._providers[name]!r} and by plugin {self._current_plugin!r}"
            )
        self._items[name] = cls
        self._providers[name] = self._current_plugin

    def provider(self, name: str) -> str:
        """The plugin that registered ``name``."""
        self[name]
        return self._providers[name]

    def names_by(self, plugin: str) -> list[str]:
        return [n for n, p in self._providers.items() if p == plugin]

    def __getitem__(self, name: str) -> type[T]:
        try:
            return self._items[name]
        except KeyError:
            available = ", ".join(sorted(self._items)) or "none"
            hint = self.missing_hint()
            raise UnknownNameError(f"unknown {self.role} {name!r}; available: {available} {hint}") from None

    def missing_hint(self) -> str:
        """Where a missing name may be: a plugin that did not load, else a package to install."""
        missing = self.unavailable() if self.unavailable is not None else []
        if len(missing) == 1:
            return f"(plugin {missing[0]} and might provide it)"
        if missing:
            return f"(plugins that might provide it did not load: {'; '.join(missing)})"
        return "(a plugin package providing it may need to be installed)"

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.role!r}, {sorted(self._items)})"
