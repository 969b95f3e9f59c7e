"""Splitters ``mosa`` and ``hierarchical`` and their memory-lean parameterisation.

Module ``i`` of a split projection is ``W_i = W0 + M_i * D``: ``W0`` the common (frozen)
initial value, ``M_i`` the mask of cell ``i``, ``D`` the trained deltas. The cells are
disjoint, so one dense ``D`` holds every module, and every element is stored once:
``W0`` (only when the init is not all zeros: a zero-initialised ``up`` side costs
nothing), ``D`` and ``uint8`` cell ids, never N copies.

Design: the forward multiplies ``D`` by per-element gates ``gates[cell_ids]``; the
sampler draws one-hot gates on the device, so there is no host sync and no Python
branch on the draw (``torch.compile(fullgraph=True)`` captures it). The gradient of
``D`` outside the active cell is therefore exactly zero, but zero is not ``None``: a
stateful optimizer (AdamW's momentum and weight decay) would still move those
elements. Each training forward marks the cells it used in a ``touched`` buffer, and
:class:`adapterkit.optim.MaskedAdamW` updates only touched cells, with one step count
per cell: every cell trains exactly as if it were its own parameter, skipped while
inactive. The alternative (one packed parameter per cell, grad ``None`` when unused)
needs the draw on the host to pick the parameter, which breaks on-device sampling and
full-graph capture.
"""

from __future__ import annotations

from collections.abc import Iterator

import attrs
import torch
from torch import Tensor, nn

from adapterkit.plugin_api import Partition, Projection, ProjectionSpec, Splitter, one_of, positive

from .cells import check_levels, id_dtype, random_cells

SHARES = ("down", "up", "none")


def _split_sides(share: str) -> set[str]:
    """Sides that are split: ``share`` names the side kept whole (shared by every module)."""
    return {"down": {"up"}, "up": {"down"}, "none": {"down", "up"}}[share]


def _levels(value: list[int] | tuple[int, ...]) -> tuple[int, ...]:
    return tuple(value)


def _nested(instance: object, attribute: attrs.Attribute, value: tuple[int, ...]) -> None:  # type: ignore[type-arg]
    check_levels(value)


class SparseDelta(nn.Module):
    """``W0 + gates[cell_ids] * D`` for one projection; see the module docstring.

    ``w0`` is a frozen buffer (absent when the init is all zeros), ``delta`` the one
    trainable tensor, ``cell_ids`` a persistent compact buffer (saved, so resumed runs
    keep their cells) and ``touched`` a transient per-cell flag read by the optimizer.
    """

    w0: Tensor | None
    cell_ids: Tensor
    touched: Tensor

    def __init__(self, spec: ProjectionSpec, partition: Partition, init_value: Tensor) -> None:
        super().__init__()
        assert partition.cell_ids is not None
        self.spec = spec
        self.partition = partition
        self.n_cells = partition.n_cells
        self.zero_init = not bool(torch.count_nonzero(init_value))
        self.register_buffer("w0", None if self.zero_init else init_value.clone())
        self.register_buffer("cell_ids", partition.cell_ids.clone())
        self.register_buffer("touched", torch.zeros(self.n_cells, dtype=torch.bool), persistent=False)
        self.delta = nn.Parameter(torch.zeros_like(init_value))

    def element_gates(self, gates: Tensor) -> Tensor:
        """Per-element gate ``gates[cell_ids]`` (``[*shape]``), in the delta's dtype."""
        return gates.to(self.delta.dtype)[self.cell_ids.long()]

    def gated_delta(self, gates: Tensor | None) -> Tensor:
        """``gates[cell_ids] * D`` (``None``: every cell active, e.g. the 'all' sampler);
        a training forward marks the cells it uses."""
        if gates is None:
            if self.training and torch.is_grad_enabled():
                self.touched.fill_(True)
            return self.delta
        if self.training and torch.is_grad_enabled():
            self.touched.logical_or_(gates > 0)
        return self.element_gates(gates) * self.delta

    def forward(self, gates: Tensor | None) -> Tensor:
        delta = self.gated_delta(gates)
        return delta if self.w0 is None else self.w0 + delta

    def cell_masks(self) -> Iterator[tuple[nn.Parameter, Tensor, Tensor]]:
        """``(parameter, cell_ids, touched)`` for :mod:`adapterkit.optim`."""
        yield self.delta, self.cell_ids, self.touched

    def extra_repr(self) -> str:
        w0 = "zeros" if self.zero_init else "stored"
        return f"{self.spec.name}: cells={self.n_cells}, shape={tuple(self.delta.shape)}, w0={w0}"


class BiasCopies(SparseDelta):
    """Per-copy biases (the official code's default): copy ``i`` of a split side has its own
    full bias ``b0 + D_i``. ``delta: [K, N, *shape]``; cell ``i`` is row ``i`` (``cell_ids``
    ``[N, *shape]``), drawn with its side's weight (``ProjectionSpec.bias_of``), so the
    training bias is copy ``i``'s and the eval gates ``1/N`` give the mean of the copies:
    the official merge. Gates ``g`` in general: ``b0 + sum_i g_i D_i``."""

    def __init__(self, spec: ProjectionSpec, partition: Partition, init_value: Tensor) -> None:
        super().__init__(spec, partition, init_value)
        self.delta = nn.Parameter(init_value.new_zeros(init_value.shape[0], *self.cell_ids.shape))

    def forward(self, gates: Tensor | None) -> Tensor:
        delta = self.gated_delta(gates).sum(1)
        return delta if self.w0 is None else self.w0 + delta


def copy_ids(shape: tuple[int, ...], n: int) -> Tensor:
    """Cell ids ``[n, *shape]`` of ``n`` full copies: row ``i`` is cell ``i``."""
    ids = torch.arange(n, dtype=id_dtype(n)).view(n, *(1,) * len(shape))
    return ids.expand(n, *shape).clone()


class MoSA(Splitter):
    """N disjoint random element-wise cells per split projection (MoSA's "split").

    ``share`` names the side every module shares (left whole): ``down`` (default; only
    ``up`` / LoRA ``B`` is split), ``up`` (only ``down`` / LoRA ``A``) or ``none`` (both).
    Biases are never split: with ``bias_copies = false`` (the default) a split side keeps one
    bias, trained at every step; with ``true`` each of the N modules has its own full bias
    (:class:`BiasCopies`, as the official code's ``ADAPTER.BIAS``), merged by the mean.
    Cells are shared by the ``K`` skills of a projection, so MoSA composes with routed
    methods. ``seed`` drives a CPU generator of its own (the attach generator, which
    initialises weights, is left untouched).
    """

    @attrs.frozen
    class Config:
        n_cells: int = attrs.field(default=4, validator=positive)
        share: str = attrs.field(default="down", validator=one_of(*SHARES))
        seed: int = 0
        bias_copies: bool = False

    def __init__(self, config: Config | None = None) -> None:
        super().__init__(config)
        self.generator = torch.Generator().manual_seed(self.config.seed)

    def n_cells(self) -> int:
        return int(self.config.n_cells)

    def meta(self) -> dict[str, object]:
        return {}

    def split(self, spec: ProjectionSpec, skills: int, generator: torch.Generator) -> Partition:
        n = self.n_cells()
        sides = _split_sides(self.config.share)
        if spec.side is None and spec.bias_of in sides and getattr(self.config, "bias_copies", False) and n > 1:
            return Partition(n_cells=n, cell_ids=copy_ids(spec.shape, n), meta={**self.meta(), "copies": True})
        if spec.side is None or spec.side not in sides or n == 1:
            return Partition()
        try:
            ids = random_cells(spec.shape, n, self.generator)
        except ValueError as exc:
            raise ValueError(f"cannot split projection {spec.name!r}: {exc}") from None
        return Partition(n_cells=n, cell_ids=ids, meta=self.meta())

    def parameterize(self, spec: ProjectionSpec, partition: Partition, init_value: Tensor) -> nn.Module:
        if partition.n_cells == 1:
            return Projection(spec, partition, init_value)
        if partition.meta.get("copies"):
            return BiasCopies(spec, partition, init_value)
        return SparseDelta(spec, partition, init_value)


class Hierarchical(MoSA):
    """Nested MoSA partitions: ``levels`` (e.g. ``[2, 4, 8]``), each refining the previous.

    The cell ids are those of the finest level; a coarser level's cell is a union of
    consecutive finest cells (see :mod:`adapterkit_mosa.cells`). The ``hierarchical``
    sampler picks a level, then one of its cells.
    """

    @attrs.frozen
    class Config:
        levels: tuple[int, ...] = attrs.field(default=(2, 4, 8), converter=_levels, validator=_nested)
        share: str = attrs.field(default="down", validator=one_of(*SHARES))
        seed: int = 0

    def n_cells(self) -> int:
        return int(self.config.levels[-1])

    def meta(self) -> dict[str, object]:
        return {"levels": self.config.levels}
