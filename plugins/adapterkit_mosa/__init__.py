"""adapterkit plugin: MoSA (Mixture of Sparse Adapters) and hierarchical sparsity.

Registers splitters ``mosa`` and ``hierarchical``, samplers ``mosa`` and
``hierarchical`` and the merger ``mosa``. A MoSA recipe::

    [adapter]
    kind = "bottleneck"          # or "lora" (A is the down side, B the up side)
    targets = ["encoder.layer.*.output"]
    input_arg = 1
    r = 16
    [splitter]
    name = "mosa"
    n_cells = 4                  # N sparse modules
    share = "down"               # the side kept whole: "down" (default), "up" or "none"
    [sampler]
    name = "mosa"                # one cell per split projection, per layer, per forward
    [merger]
    name = "mosa"                # W0 + D/N: a plain dense adapter

Train with :func:`adapterkit.optim.adamw` (inactive cells stay bit-identical) and,
optionally, :func:`consistency_loss` (the loss term ``consistency`` in workflow configs:
``[train.loss] name = "consistency"``; ``consistency-hidden`` adds the official Stanford Cars
hidden-state term); then ``adapterkit.merge(model)``.

Hierarchical sparsity (this project's reading of the paper's strategy; the released
code lacks it): ``[splitter] name = "hierarchical"``, ``levels = [2, 4, 8]`` nests
the partitions, each level refining the previous one; ``[sampler] name =
"hierarchical"`` picks a level (``mix = [...]`` fixed, or ``schedule =
"coarse-to-fine"`` driven by training progress, ``Sampler.set_progress``) and then one of its cells. The merge
is ``W0 + p * D`` with ``p = sum_l mix_l / n_l``. See ``docs/methods/mosa.md``.
"""

from __future__ import annotations

from adapterkit import set_progress  # the core's; kept here for code written against this plugin
from adapterkit.plugin_api import LossTerm, Merger, Registry, Sampler, Splitter, hookimpl

from .consistency import Consistency, ConsistencyHidden, ConsistencyLoss, consistency_loss, hidden_mse, symmetric_kl
from .merger import MoSAMerger
from .presets import NAMES as PRESETS
from .presets import Preset, load_preset
from .samplers import HierarchicalSampler, MoSASampler
from .splitters import BiasCopies, Hierarchical, MoSA, SparseDelta

__all__ = [
    "PRESETS",
    "BiasCopies",
    "Consistency",
    "ConsistencyHidden",
    "ConsistencyLoss",
    "Hierarchical",
    "HierarchicalSampler",
    "MoSA",
    "MoSAMerger",
    "MoSASampler",
    "Preset",
    "SparseDelta",
    "consistency_loss",
    "hidden_mse",
    "load_preset",
    "set_progress",
    "symmetric_kl",
]


@hookimpl
def adapterkit_register_splitters(registry: Registry[Splitter]) -> None:
    registry.add("mosa", MoSA)
    registry.add("hierarchical", Hierarchical)


@hookimpl
def adapterkit_register_samplers(registry: Registry[Sampler]) -> None:
    registry.add("mosa", MoSASampler)
    registry.add("hierarchical", HierarchicalSampler)


@hookimpl
def adapterkit_register_mergers(registry: Registry[Merger]) -> None:
    registry.add("mosa", MoSAMerger)


@hookimpl
def adapterkit_register_losses(registry: Registry[LossTerm]) -> None:
    registry.add("consistency", Consistency)
    registry.add("consistency-hidden", ConsistencyHidden)
