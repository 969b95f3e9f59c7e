"""adapterkit's built-in plugin: the adapter kinds, the trivial roles and PEFT ``LORA`` folders.

Registered through the ``adapterkit`` entry-point group like any third-party plugin.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from adapterkit.plugin_api import (
    AdapterSite,
    Merger,
    PeftFormat,
    Registry,
    Router,
    Sampler,
    SingleSkill,
    Splitter,
    hookimpl,
)

from .bottleneck import Bottleneck
from .lora import LoRA
from .mergers import Fold, Identity
from .peft import LoRAFormat

if TYPE_CHECKING:
    import click


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


@hookimpl
def adapterkit_register_peft_formats(registry: Registry[PeftFormat]) -> None:
    registry.add("LORA", LoRAFormat)


@hookimpl
def adapterkit_register_commands(cli: click.Group) -> None:
    from .cli import export_command, import_command

    cli.add_command(import_command)
    cli.add_command(export_command)
