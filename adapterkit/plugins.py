"""The plugin host: discovers plugins through entry points and fills the registries.

Built-in methods are plugins too: they live in ``plugins/`` and are registered through
the entry-point group ``adapterkit`` exactly like third-party packages.

Environment switches:

``ADAPTERKIT_DISABLE_PLUGIN_AUTOLOAD=1``
    load only the plugins shipped with adapterkit plus those named in
    ``ADAPTERKIT_PLUGINS`` (comma separated entry-point names).
``ADAPTERKIT_BLOCK_PLUGINS=a,b``
    never load these plugins (built-ins included).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from importlib import metadata
from types import ModuleType
from typing import Any

import attrs
import pluggy

from . import hookspecs
from .objectives import Objective
from .peft_format import PeftFormat
from .registry import Registry
from .roles import AdaptMode, LossTerm, Merger, Router, Sampler, Splitter
from .site import AdapterSite
from .zoo import Backbone, Dataset

ENTRY_POINT_GROUP = "adapterkit"
ENV_DISABLE_AUTOLOAD = "ADAPTERKIT_DISABLE_PLUGIN_AUTOLOAD"
ENV_PLUGINS = "ADAPTERKIT_PLUGINS"
ENV_BLOCK = "ADAPTERKIT_BLOCK_PLUGINS"
BUILTIN_DISTRIBUTION = "adapterkit"

# role name -> (registration hook, registry label, base class)
ROLE_HOOKS: dict[str, tuple[str, str, type]] = {
    "kind": ("adapterkit_register_kinds", "adapter kind", AdapterSite),
    "splitter": ("adapterkit_register_splitters", "splitter", Splitter),
    "sampler": ("adapterkit_register_samplers", "sampler", Sampler),
    "router": ("adapterkit_register_routers", "router", Router),
    "merger": ("adapterkit_register_mergers", "merger", Merger),
    "adapt_mode": ("adapterkit_register_adapt_modes", "adaptation mode", AdaptMode),
    "loss": ("adapterkit_register_losses", "loss term", LossTerm),
    "backbone": ("adapterkit_register_backbones", "backbone", Backbone),
    "dataset": ("adapterkit_register_datasets", "dataset", Dataset),
    "objective": ("adapterkit_register_objectives", "objective", Objective),
    "peft_format": ("adapterkit_register_peft_formats", "PEFT format", PeftFormat),
}


@attrs.define
class PluginInfo:
    name: str
    version: str
    distribution: str | None
    provides: dict[str, list[str]]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "provides": self.provides}


@attrs.define
class PluginFailure:
    name: str
    error: str

    def __str__(self) -> str:
        return f"plugin {self.name!r} failed to load: {self.error}"

    def reason(self) -> str:
        """The error's first line, escaped to printable ASCII and cut at 200 characters."""
        first = (self.error.splitlines() or [""])[0]
        if len(first) > 200:
            first = first[:200] + "..."
        return first.encode("unicode_escape").decode("ascii")

    def brief(self) -> str:
        """``'name' failed to load (Error: first line of the message)``, on one line."""
        return f"{self.name!r} failed to load ({self.reason()})"


def _env_list(name: str) -> set[str]:
    return {item.strip() for item in os.environ.get(name, "").split(",") if item.strip()}


class PluginHost:
    """A pluggy manager plus one registry per role; see the module docstring."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("adapterkit")
        self.pm.add_hookspecs(hookspecs)
        self.registries: dict[str, Registry[Any]] = {
            role: Registry(label, base) for role, (_, label, base) in ROLE_HOOKS.items()
        }
        self.plugins: dict[str, PluginInfo] = {}
        self.failures: list[PluginFailure] = []
        self.blocked: list[str] = []  # entry points named in ADAPTERKIT_BLOCK_PLUGINS
        self.not_enabled: list[str] = []  # third-party entry points left out by ADAPTERKIT_DISABLE_PLUGIN_AUTOLOAD
        for registry in self.registries.values():
            registry.unavailable = self.unavailable

    def unavailable(self) -> list[str]:
        """The plugins that did not load, each in a few words (an unknown name's error lists
        them: ``unknown adapter kind 'lora'`` when the plugin providing it is broken or blocked)."""
        out = [failure.brief() for failure in self.failures]
        out += [f"{name!r} is blocked by {ENV_BLOCK}" for name in self.blocked]
        out += [f"{name!r} is not enabled ({ENV_DISABLE_AUTOLOAD} is set; add it to {ENV_PLUGINS})"
                for name in self.not_enabled]
        return out

    # typed accessors ------------------------------------------------------------
    @property
    def kinds(self) -> Registry[AdapterSite]:
        return self.registries["kind"]

    @property
    def splitters(self) -> Registry[Splitter]:
        return self.registries["splitter"]

    @property
    def samplers(self) -> Registry[Sampler]:
        return self.registries["sampler"]

    @property
    def routers(self) -> Registry[Router]:
        return self.registries["router"]

    @property
    def mergers(self) -> Registry[Merger]:
        return self.registries["merger"]

    @property
    def adapt_modes(self) -> Registry[AdaptMode]:
        return self.registries["adapt_mode"]

    @property
    def losses(self) -> Registry[LossTerm]:
        return self.registries["loss"]

    @property
    def backbones(self) -> Registry[Backbone]:
        return self.registries["backbone"]

    @property
    def datasets(self) -> Registry[Dataset]:
        return self.registries["dataset"]

    @property
    def objectives(self) -> Registry[Objective]:
        return self.registries["objective"]

    @property
    def peft_formats(self) -> Registry[PeftFormat]:
        return self.registries["peft_format"]

    # loading ----------------------------------------------------------------------
    def load_entry_points(self, entry_points: Iterable[metadata.EntryPoint] | None = None) -> None:
        """Load every plugin of the ``adapterkit`` group, honouring the env switches.

        A plugin that fails to import or register is recorded in :attr:`failures` and
        skipped; the others keep working.
        """
        autoload = os.environ.get(ENV_DISABLE_AUTOLOAD, "").lower() not in {"1", "true", "yes"}
        wanted = _env_list(ENV_PLUGINS)
        blocked = _env_list(ENV_BLOCK)
        eps = entry_points if entry_points is not None else metadata.entry_points(group=ENTRY_POINT_GROUP)
        # adapterkit's own plugins first: a third-party name clash then fails the newcomer,
        # never the built-ins (a name sorting before "builtins" would otherwise take them down)
        for ep in sorted(eps, key=lambda e: (e.dist is None or e.dist.name != BUILTIN_DISTRIBUTION, e.name)):
            dist = ep.dist.name if ep.dist is not None else None
            if ep.name in self.plugins or any(f.name == ep.name for f in self.failures):
                continue
            if ep.name in blocked:
                if ep.name not in self.blocked:
                    self.blocked.append(ep.name)
                continue
            if not autoload and dist != BUILTIN_DISTRIBUTION and ep.name not in wanted:
                if ep.name not in self.not_enabled:
                    self.not_enabled.append(ep.name)
                continue
            try:
                plugin = ep.load()
            except (Exception, SystemExit, KeyboardInterrupt) as exc:  # a broken plugin must not be fatal
                self.failures.append(PluginFailure(ep.name, f"{type(exc).__name__}: {exc}"))
                continue
            version = ep.dist.version if ep.dist is not None else "unknown"
            self.register(plugin, ep.name, version=version, distribution=dist)

    def register(
        self, plugin: ModuleType | object, name: str, *, version: str = "unknown", distribution: str | None = None
    ) -> PluginInfo | None:
        """Register one plugin object and run its registration hooks.

        Returns its info, or ``None`` (with a recorded failure) if it is invalid.
        """
        try:
            self.pm.register(plugin, name=name)
            self.pm.check_pending()
        except (Exception, SystemExit) as exc:  # plugin code (a hookimpl marker, ...) must not exit the host
            self._forget(plugin)
            self.failures.append(PluginFailure(name, f"{type(exc).__name__}: {exc}"))
            return None
        provides: dict[str, list[str]] = {}
        added: list[tuple[Registry[Any], str]] = []
        try:
            for role, (hook_name, _, _) in ROLE_HOOKS.items():
                registry = self.registries[role]
                before = set(registry)
                registry._current_plugin = name
                try:
                    for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                        if impl.plugin_name == name:
                            impl.function(registry=registry)
                finally:
                    registry._current_plugin = "<direct>"
                new = [n for n in registry if n not in before]
                added += [(registry, n) for n in new]
                if new:
                    provides[role] = sorted(new)
        except (Exception, SystemExit) as exc:  # a registration hook calling sys.exit() is a failure too
            for registry, entry in added:  # leave no half-registered plugin behind
                registry._items.pop(entry, None)
                registry._providers.pop(entry, None)
            self._forget(plugin)
            self.failures.append(PluginFailure(name, f"{type(exc).__name__}: {exc}"))
            return None
        info = PluginInfo(name, version, distribution, provides)
        self.plugins[name] = info
        return info

    def _forget(self, plugin: object) -> None:
        if self.pm.is_registered(plugin):
            self.pm.unregister(plugin)

    def plugin_versions(self) -> dict[str, str]:
        return {name: info.version for name, info in self.plugins.items()}


_host: PluginHost | None = None


def get_host() -> PluginHost:
    """The process-wide plugin host, loading entry points on first use (lazily)."""
    global _host
    if _host is None:
        host = PluginHost()
        host.load_entry_points()
        _host = host
    return _host


def set_host(host: PluginHost | None) -> None:
    """Replace the process-wide host (``None``: rediscover on next use). For tests and embedding."""
    global _host
    _host = host
