"""Hook specifications: the whole contract between adapterkit and its plugins.

A plugin is a module (or object) with functions marked ``@adapterkit.hookimpl`` named
after these specs, exposed through an entry point in the group ``adapterkit``::

    [project.entry-points.adapterkit]
    myplugin = "my_package.plugin"

Every registration hook receives a :class:`~adapterkit.registry.Registry`; call
``registry.add(name, cls)``. The host records which plugin added each name and rejects
duplicates. Hooks not implemented by a plugin are simply skipped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    import click

    from .objectives import Objective
    from .peft_format import PeftFormat
    from .registry import Registry
    from .roles import AdaptMode, LossTerm, Merger, Router, Sampler, Splitter
    from .site import AdapterSite
    from .zoo import Backbone, Dataset

hookspec = pluggy.HookspecMarker("adapterkit")
hookimpl = pluggy.HookimplMarker("adapterkit")


@hookspec
def adapterkit_register_kinds(registry: Registry[AdapterSite]) -> None:
    """Register adapter kinds.

    :param registry: add :class:`~adapterkit.site.AdapterSite` subclasses by name
        (e.g. ``"lora"``); the name is what recipes write in ``[adapter] kind``.
    """


@hookspec
def adapterkit_register_splitters(registry: Registry[Splitter]) -> None:
    """Register splitters: how one adapter's parameter space is cut into cells or heads.

    :param registry: add :class:`~adapterkit.roles.Splitter` subclasses by name; the
        name is what recipes write in ``[splitter] name``.
    """


@hookspec
def adapterkit_register_samplers(registry: Registry[Sampler]) -> None:
    """Register samplers: which cells are active at each training step.

    :param registry: add :class:`~adapterkit.roles.Sampler` subclasses by name; the
        name is what recipes write in ``[sampler] name``.
    """


@hookspec
def adapterkit_register_routers(registry: Registry[Router]) -> None:
    """Register routers: how skills are mixed for an example or task.

    :param registry: add :class:`~adapterkit.roles.Router` subclasses by name; the
        name is what recipes write in ``[router] name``.
    """


@hookspec
def adapterkit_register_mergers(registry: Registry[Merger]) -> None:
    """Register mergers: how modules and skills collapse into one deployable adapter.

    :param registry: add :class:`~adapterkit.roles.Merger` subclasses by name; the
        name is what recipes write in ``[merger] name`` and ``adapterkit merge`` takes.
    """


@hookspec
def adapterkit_register_adapt_modes(registry: Registry[AdaptMode]) -> None:
    """Register few-shot adaptation modes (``adapterkit adapt --mode``, :func:`adapterkit.adapt`).

    :param registry: add :class:`~adapterkit.roles.AdaptMode` subclasses by name
        (e.g. ``"mhr-z"``); a blocked plugin's modes are gone from the CLI too.
    """


@hookspec
def adapterkit_register_losses(registry: Registry[LossTerm]) -> None:
    """Register loss terms a method adds in training (workflow config ``[train.loss]``).

    :param registry: add :class:`~adapterkit.roles.LossTerm` subclasses by name
        (e.g. ``"consistency"``); the workflow config names one with its arguments.
    """


@hookspec
def adapterkit_register_backbones(registry: Registry[Backbone]) -> None:
    """Register backbones: pretrained models the workflows (``adapterkit train``) can adapt.

    :param registry: add :class:`~adapterkit.zoo.Backbone` subclasses by name; the name
        is what workflow configs write in ``[model] backbone``.
    """


@hookspec
def adapterkit_register_datasets(registry: Registry[Dataset]) -> None:
    """Register datasets: labelled corpora (optionally split into tasks) for the workflows.

    :param registry: add :class:`~adapterkit.zoo.Dataset` subclasses by name; the name
        is what workflow configs write in ``[data] dataset``.
    """


@hookspec
def adapterkit_register_objectives(registry: Registry[Objective]) -> None:
    """Register objectives: what the workflows train a model to do (classification, causal-lm, ...).

    :param registry: add :class:`~adapterkit.objectives.Objective` subclasses by name; the
        name is what workflow configs write in ``[model] objective``.
    """


@hookspec
def adapterkit_register_peft_formats(registry: Registry[PeftFormat]) -> None:
    """Register PEFT adapter formats: how a PEFT ``peft_type`` converts to adapterkit and back
    (``adapterkit import``/``export --peft``, :func:`adapterkit.import_peft`, :func:`adapterkit.export_peft`).

    :param registry: add :class:`~adapterkit.peft_format.PeftFormat` subclasses by PEFT's
        ``peft_type`` (e.g. ``"LORA"``, ``"POLY"``); a PEFT folder of that type imports
        through it and the sites it ``owns`` export through it.
    """


@hookspec
def adapterkit_register_commands(cli: click.Group) -> None:
    """Add subcommands to the ``adapterkit`` command line.

    :param cli: the root :class:`click.Group`; call ``cli.add_command(command)``.
    """
