"""adapterkit's built-in plugin: the adapter kinds and the trivial roles.

Registered through the ``adapterkit`` entry-point group like any third-party plugin.
"""

from __future__ import annotations

from adapterkit.plugin_api import AdapterSite, Merger, Registry, Router, Sampler, SingleSkill, Splitter, hookimpl

from .bottleneck import Bottleneck
from .lora import LoRA
from .mergers import Fold, Identity


@hookimpl
def adapterkit_register_kinds(registry: Registry[AdapterSite]) -> None:
    registry.add("lora", LoRA)
    registry.add("bottleneck", Bottleneck)


@hookimpl
def adapterkit_register_splitters(registry: Registry[Splitter]) -> None:
    registry.add("dense", Splitter)


@hookimpl
def adapterkit_register_samplers(registry: Registry[Sampler]) -> None:
    registry.add("all", Sampler)


@hookimpl
def adapterkit_register_routers(registry: Registry[Router]) -> None:
    registry.add("none", SingleSkill)


@hookimpl
def adapterkit_register_mergers(registry: Registry[Merger]) -> None:
    registry.add("identity", Identity)
    registry.add("fold", Fold)
