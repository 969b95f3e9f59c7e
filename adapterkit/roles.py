"""The four roles and the data model they share.

Every adapter parameter has shape ``[K skills, *shape]``. A **splitter** partitions the
element index space of ``shape`` into cells (and optionally into heads); a **sampler**
picks the active cells at each forward (gates); a **router** gives per-example skill
weights ``(batch, heads, K)``; a **merger** removes the skill and cell structure.

Each role is a class with a nested attrs ``Config``; recipes name the class through a
registry and pass its arguments, which ``Config`` validates (unknown keys are errors).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import attrs
import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from .site import AdapterSite

Side = Literal["down", "up"]


@attrs.frozen
class ProjectionSpec:
    """One skill-stacked adapter parameter that a kind asks for.

    ``side`` names the bottleneck side (``down``: LoRA A / adapter down; ``up``: LoRA B /
    adapter up; ``None`` for biases, which splitters leave whole). ``head_axis`` is the
    axis of ``shape`` that multi-head splitters cut into heads (input rows of ``down``,
    output columns of ``up``), or ``None`` when the parameter has none.
    """

    name: str
    shape: tuple[int, ...]
    side: Side | None
    head_axis: int | None
    init: Callable[[Tensor, int, torch.Generator], None]
    """``init(tensor[K, *shape], heads, generator)`` fills the tensor in place."""


@attrs.frozen
class Partition:
    """How a splitter cut one projection.

    ``cell_ids`` (same shape as the projection without K, integer) assigns every element
    to one of ``n_cells`` disjoint cells; ``None`` means one cell. ``heads`` cuts
    ``head_axis`` into equal blocks for per-head routing. ``meta`` carries
    plugin-specific structure (e.g. the levels of nested partitions).
    """

    n_cells: int = 1
    cell_ids: Tensor | None = None
    heads: int = 1
    head_axis: int | None = None
    meta: Mapping[str, Any] = attrs.field(factory=dict)


class Configurable:
    """Base of every plugin class: holds its validated ``Config``."""

    @attrs.frozen
    class Config:
        pass

    config: Any

    def __init__(self, config: Any = None) -> None:
        self.config = config if config is not None else type(self).Config()


class Projection(nn.Module):
    """Default parameterisation of one projection under a partition.

    One cell: a plain trainable ``weight[K, *shape]``. Several cells: a frozen initial
    value ``w0`` plus one trainable dense ``delta`` (zeros) whose elements belong to
    cells through ``cell_ids``; the weight is ``w0 + gates[cell_ids] * delta``. Every
    element is stored once; splitters may return a leaner or optimizer-exact module.
    """

    w0: Tensor
    cell_ids: Tensor

    def __init__(self, spec: ProjectionSpec, partition: Partition, init_value: Tensor) -> None:
        super().__init__()
        self.spec = spec
        self.partition = partition
        if partition.n_cells == 1:
            self.weight = nn.Parameter(init_value)
        else:
            assert partition.cell_ids is not None
            self.register_buffer("w0", init_value)
            self.register_buffer("cell_ids", partition.cell_ids.to(torch.long))
            self.delta = nn.Parameter(torch.zeros_like(init_value))

    def forward(self, gates: Tensor | None) -> Tensor:
        """The weight ``[K, *shape]`` given per-cell gates (``None``: every cell active)."""
        if self.partition.n_cells == 1:
            return self.weight
        if gates is None:
            return self.w0 + self.delta
        return self.w0 + gates[self.cell_ids] * self.delta


class Splitter(Configurable):
    """Cuts each projection into cells and/or heads.

    Contract: :meth:`split` returns disjoint cells covering every element (or one cell),
    raises ``ValueError`` with a reason when the projection cannot be cut that way, and
    is deterministic given ``generator``.
    """

    def split(self, spec: ProjectionSpec, skills: int, generator: torch.Generator) -> Partition:
        return Partition()

    def parameterize(self, spec: ProjectionSpec, partition: Partition, init_value: Tensor) -> nn.Module:
        """Build the module whose ``forward(gates)`` returns the weight ``[K, *shape]``."""
        return Projection(spec, partition, init_value)


class Sampler(Configurable):
    """Chooses the active cells of a partition at each forward.

    Contract: :meth:`gates` returns ``None`` (all cells fully active) or a float tensor of
    shape ``(n_cells,)`` on ``device``. In training it is a random draw made with torch
    ops only (no host sync, so ``torch.compile(fullgraph=True)`` works); in eval it is the
    per-cell activation probability, so the eval forward equals the merged expectation.
    """

    def check(self, partition: Partition) -> None:
        """Raise ``ValueError`` when this sampler cannot gate ``partition`` (called at attach)."""

    def gates(self, partition: Partition, training: bool, device: torch.device) -> Tensor | None:
        return None


class Router(Configurable, nn.Module):
    """Per-site module giving skill weights for the examples of a batch.

    Contract: ``forward(task_ids[b]) -> weights (b, heads, K)`` (normalised over K), or
    ``None`` when the site has a single skill and needs no routing. Parameters it owns
    train with the router's own learning rate and no weight decay.
    """

    needs_task_ids: ClassVar[bool] = False

    def __init__(self, config: Any, *, heads: int, skills: int, generator: torch.Generator) -> None:
        Configurable.__init__(self, config)
        nn.Module.__init__(self)
        self.heads = heads
        self.skills = skills

    def check(self, skills: int) -> None:
        """Raise ``ValueError`` when this router cannot serve ``skills`` skills."""

    def forward(self, task_ids: Tensor | None) -> Tensor | None:
        raise NotImplementedError


class SingleSkill(Router):
    """No routing: the site holds one skill and every example uses it."""

    def check(self, skills: int) -> None:
        if skills != 1:
            raise ValueError(f"{skills} skills need a router (e.g. 'uniform' or 'poly'); this router serves one skill")

    def forward(self, task_ids: Tensor | None) -> Tensor | None:
        return None


class Merger(Configurable):
    """Collapses the skill and cell structure of an attached model into a deployable one.

    Contract: :meth:`merge_site` returns the module that replaces ``site`` (the site
    itself, a simplified site, or a plain base module) and keeps eval outputs equal to
    the expectation the method defines.
    """

    def merge_site(self, site: AdapterSite) -> nn.Module:
        raise NotImplementedError
