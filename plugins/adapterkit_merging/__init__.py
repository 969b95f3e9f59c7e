"""adapterkit's merging plugin: model-merging methods on a selection of experts.

Mergers ``task-arithmetic``, ``ties``, ``dare-linear``, ``dare-ties`` and
``magnitude-prune`` combine the K skills of each site, the experts that
:func:`adapterkit.stack` put side by side or a trained inventory's skills, into one plain
adapter. For LoRA they work on the exact updates ``ΔW_k`` by default (``form = "delta"``),
as PEFT's ``merge_utils`` define each method; ``form = "separate"`` combines the factors
as PEFT's ``add_weighted_adapter`` does without SVD. See ``docs/methods/merging.md``.

The methods are also plain functions on task tensors (:mod:`adapterkit_merging.methods`).
"""

from __future__ import annotations

from adapterkit.plugin_api import Merger, Registry, hookimpl

from . import methods
from .mergers import MERGERS, DareLinear, DareTies, MagnitudePrune, TaskArithmetic, TaskMerger, Ties
from .updates import Update, update_of

__all__ = [
    "MERGERS",
    "DareLinear",
    "DareTies",
    "MagnitudePrune",
    "TaskArithmetic",
    "TaskMerger",
    "Ties",
    "Update",
    "methods",
    "update_of",
]


@hookimpl
def adapterkit_register_mergers(registry: Registry[Merger]) -> None:
    for name, cls in MERGERS.items():
        registry.add(name, cls)
