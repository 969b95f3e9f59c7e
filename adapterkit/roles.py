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
    bias_of: Side | None = None
    """For a bias: the side whose weight it belongs to. A splitter may give each module copy
    of that side its own bias (cells of the bias's own), drawn together with the weight."""


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

    def set_progress(self, fraction: float) -> None:
        """Training progress in ``[0, 1]``, reported by training loops before each step.

        Scheduled samplers (e.g. coarse-to-fine) override this; the default ignores it.
        """


class Router(Configurable, nn.Module):
    """Per-site module giving skill weights for the examples of a batch.

    Contract: ``forward(task_ids[b]) -> weights (b, heads, K)`` (normalised over K), or
    ``None`` when the site has a single skill and needs no routing. Parameters it owns
    train with the router's own learning rate and no weight decay.
    """

    needs_task_ids: ClassVar[bool] = False
    needs_inputs: ClassVar[bool] = False
    """Routers whose weights depend on the layer input (e.g. Arrow, per token) set this: the
    site then skips :meth:`forward`, calls :meth:`token_weights` with its input and mixes
    the skills' *outputs* per token. Only kinds that implement that path
    (:meth:`AdapterSite.input_features`, e.g. LoRA) accept such a router."""

    selects: ClassVar[bool] = False
    """Routers whose weights are one-hot (each task id picks one skill, task ``i`` skill
    ``i``) set this: the site then gathers each example's skill weights instead of mixing
    them (mixed-adapter batches, :func:`adapterkit.serve`); :meth:`forward` is not called."""

    def __init__(self, config: Any, *, heads: int, skills: int, generator: torch.Generator) -> None:
        Configurable.__init__(self, config)
        nn.Module.__init__(self)
        self.heads = heads
        self.skills = skills

    def check(self, skills: int) -> None:
        """Raise ``ValueError`` when this router cannot serve ``skills`` skills."""

    def setup_inputs(self, features: int) -> None:
        """Called once per site at attach when :attr:`needs_inputs`: ``features`` is the size of
        the layer input's last dimension (size per-feature state here, e.g. prototypes)."""

    def token_weights(self, inputs: Tensor) -> Tensor:
        """``inputs[..., features] -> weights[..., K]``: skill weights per token, for routers
        with :attr:`needs_inputs`; torch ops only (no host sync)."""
        raise NotImplementedError

    @property
    def n_tasks(self) -> int | None:
        """How many task ids this router serves (ids ``0 .. n_tasks-1``), or ``None`` when
        it takes no task ids or any. ``route`` validates ids against it once per forward."""
        return None

    @classmethod
    def for_tasks(cls, args: Mapping[str, Any], n_tasks: int) -> dict[str, Any]:
        """Recipe arguments for serving ``n_tasks`` tasks (workflows fill this from the data).

        Routers that route by task override this to set their task count, and raise
        ``ValueError`` naming both numbers when ``args`` already fixes a different one.
        """
        return dict(args)

    def forward(self, task_ids: Tensor | None) -> Tensor | None:
        raise NotImplementedError


class SingleSkill(Router):
    """No routing: the site holds one skill and every example uses it."""

    def check(self, skills: int) -> None:
        if skills != 1:
            raise ValueError(f"{skills} skills need a router (e.g. 'uniform' or 'poly'); this router serves one skill")

    def forward(self, task_ids: Tensor | None) -> Tensor | None:
        return None


@attrs.frozen
class Folded:
    """What :meth:`Merger.merge_site` returns to fold a single-skill site into its base layer.

    The core adds ``site.delta_weight()`` to the base weight, records the folded site (so
    ``save`` writes its small factors, ``load`` refolds them and ``detach`` unfolds) and
    puts the plain base module back in the model.
    """

    site: AdapterSite


class Merger(Configurable):
    """Collapses the skill and cell structure of an attached model into a deployable one.

    Contract: :meth:`merge_site` returns what replaces ``site``: the site itself, a new
    site (e.g. ``site.rebuild(site.mixed_weights())``), or :class:`Folded` to fold a
    single-skill site into its base weight. It must not modify ``site`` or the model:
    ``adapterkit.merge`` installs every result only after all sites merged, records the
    step, and derives the recipe of what the merge left from the new sites themselves
    (kind, role classes and their configs), so ``save`` writes it and ``load`` onto a
    fresh base model reproduces the merged model. Eval outputs must equal the
    expectation the method defines.
    """

    def merge_site(self, site: AdapterSite) -> AdapterSite | Folded:
        raise NotImplementedError


class AdaptMode(Configurable):
    """A few-shot adaptation mode: prepares a trained model for learning a new task.

    Contract: :meth:`prepare` changes the model in place only through its sites (new
    router rows, replaced sites via :func:`adapterkit.plugin_api.replace_sites`) and sets
    ``requires_grad`` on what trains; ``adapterkit.adapt`` then records the step and
    re-derives the model's recipe from its sites. ``train_head`` says whether a
    workflow's classification head trains by default in this mode.
    """

    train_head: ClassVar[bool] = True

    def prepare(self, model: nn.Module, *, seed: int) -> None:
        raise NotImplementedError

    def compact_state(self, model: nn.Module) -> dict[str, Tensor] | None:
        """The tensors that alone reproduce the adapted task on the prepared inventory
        (e.g. MHR-z's routing rows), or ``None`` when the mode has no such compact form."""
        return None


class LossTerm(Configurable):
    """A loss term a method adds in training, named in a workflow config (``[train.loss]``).

    Contract: :meth:`__call__` runs ``forward()`` (one training forward; it may run it
    again: each call draws fresh cells) and returns the total loss given
    ``task_loss(outputs)``. ``Config`` must have a ``weight`` (0 turns the term off).
    """

    @attrs.frozen
    class Config:
        weight: float = 1.0

    def __call__(self, forward: Callable[[], Tensor], task_loss: Callable[[Tensor], Tensor]) -> Tensor:
        raise NotImplementedError
