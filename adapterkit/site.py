"""The module that replaces a base module at each adapted site.

An :class:`AdapterSite` owns the frozen base module, one parameterised projection per
skill-stacked adapter parameter, the sampler that gates cells and the router that
mixes skills. Adapter kinds (LoRA, bottleneck, ...) subclass it and define the math of
``forward`` on the effective weights returned by :meth:`AdapterSite.weights`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .errors import RoutingError
from .roles import Configurable, Partition, Projection, ProjectionSpec, Router, Sampler, SingleSkill, Splitter


class RoutingState:
    """Task ids shared by every routed site of one model (set by ``adapterkit.route`` or the
    ``task_ids=`` keyword). ``repeat`` (on during ``generate``) lets a batch that is a whole
    multiple of the ids take each id for consecutive examples, as beams and returned
    sequences repeat each example (``repeat_interleave``)."""

    def __init__(self) -> None:
        self.task_ids: Tensor | None = None
        self.repeat = False


def mix_skills(weight: Tensor, routing: Tensor | None, partition: Partition) -> Tensor:
    """Collapse ``weight[K, *shape]`` over skills.

    ``routing`` is ``None`` (single skill: returns ``weight[0]``) or ``(b, H, K)``
    weights, giving ``[b, *shape]``; with ``H > 1`` head ``h`` mixes only its block of
    ``partition.head_axis`` with its own weights (parameters, not outputs, are mixed).
    """
    if routing is None:
        return weight[0]
    heads = routing.shape[1]
    if heads == 1 or partition.head_axis is None:
        per_example = routing[:, 0] if heads == 1 else routing.mean(1)
        return (per_example @ weight.flatten(1)).view(-1, *weight.shape[1:])  # one GEMM (b, K) @ (K, n)
    axis = partition.head_axis + 1
    blocks = weight.unflatten(axis, (heads, -1)).movedim(axis, 0)  # [H, K, ..., block, ...]
    mixed = torch.bmm(routing.transpose(0, 1), blocks.flatten(2))  # per head: (b, K) @ (K, n) -> [H, b, n]
    mixed = mixed.view(heads, -1, *blocks.shape[2:])  # [H, b, ..., block, ...]
    return mixed.movedim(0, axis).flatten(axis, axis + 1)


def batched_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, add_to: Tensor | None = None) -> Tensor:
    """``x @ weight (+ bias)`` for a shared ``weight[i, o]`` or per-example ``weight[b, i, o]``.

    ``add_to`` (shaped like the result) is added in the same GEMM (``addmm``/``baddbmm``),
    saving a pass over the output: adapters use it to add their update to the base output.
    """
    if add_to is not None:
        if bias is not None:
            add_to = add_to + bias
        if weight.dim() == 2:
            out = torch.addmm(add_to.reshape(-1, weight.shape[-1]), x.reshape(-1, x.shape[-1]), weight)
        else:
            flat = x.reshape(x.shape[0], -1, x.shape[-1])
            out = torch.baddbmm(add_to.reshape(x.shape[0], -1, weight.shape[-1]), flat, weight)
        return out.view(add_to.shape)
    if weight.dim() == 2:
        return F.linear(x, weight.mT, bias)  # one fused addmm, like nn.Linear
    flat = x.reshape(x.shape[0], -1, x.shape[-1])
    y = torch.bmm(flat, weight)
    if bias is not None:
        y = y + bias.unsqueeze(1)
    return y.reshape(*x.shape[:-1], weight.shape[-1])


class AdapterSite(Configurable, nn.Module):
    """Base class of adapter kinds: wraps ``base`` and holds the adapter parameters.

    Subclasses define ``Config`` (attrs), :meth:`projection_specs` (validating the base
    module and raising ``ValueError`` with a reason when it does not fit) and
    ``forward``. Parameters in :attr:`projections` and the router train; ``base`` is
    frozen by ``attach``.

    Adapter tensors live on the base's device, in the base's dtype unless the kind's
    ``Config`` has a ``dtype`` field (see :func:`factory_kwargs`): ``"float32"`` keeps them
    in float32 over a float16/bfloat16 base (PEFT's default), ``"base"`` matches the base.
    Such a kind's ``forward`` runs its path in the adapter dtype and adds the update to the
    base output cast to the output's dtype.
    """

    kind: ClassVar[str] = ""

    def __init__(
        self,
        base: nn.Module,
        config: Any,
        *,
        name: str,
        skills: int,
        splitter: Splitter,
        sampler: Sampler,
        make_router: Callable[..., Router],
        routing: RoutingState,
        generator: torch.Generator,
    ) -> None:
        Configurable.__init__(self, config)
        nn.Module.__init__(self)
        self.base = base
        self.site_name = name
        self.skills = skills
        self.splitter = splitter
        self.sampler = sampler
        self.routing = routing
        self.projections = nn.ModuleDict()
        factory = factory_kwargs(base, getattr(self.config, "dtype", "base"))
        specs = self.projection_specs(base, self.config)
        weight_of = {spec.side: spec.name for spec in reversed(specs) if spec.side is not None}
        # a bias -> the weight projection of its side, whose draw it takes when it has cells
        self.drawn_with = {s.name: weight_of[s.bias_of] for s in specs if s.bias_of in weight_of}
        for spec in specs:
            partition = splitter.split(spec, skills, generator)
            sampler.check(partition)
            value = torch.empty(skills, *spec.shape)
            spec.init(value, partition.heads, generator)
            module = splitter.parameterize(spec, partition, value)
            self.projections[spec.name] = module.to(**factory)
        heads = {self.partition(p).heads for p in self.projections} - {1} or {1}
        if len(heads) != 1:
            raise ValueError(f"projections disagree on the number of heads: {sorted(heads)}")
        self.router = make_router(heads=heads.pop()).to(**factory)
        self.router.check(skills)
        if self.router.needs_inputs:  # per-token routing on the layer input (Router.needs_inputs)
            features = self.input_features()
            if features is None:
                raise ValueError(f"router {type(self.router).__name__} routes each token on the layer input; kind "
                                 f"{self.kind!r} cannot mix its skills per token on {type(base).__name__} "
                                 "(use a LoRA on nn.Linear or Conv1D)")
            self.router.setup_inputs(features)

    def adapter_parameters(self) -> Iterator[nn.Parameter]:
        """Every parameter of the adapter (projections, router, kind extras), not of ``base``."""
        for name, param in self.named_parameters():
            if not name.startswith("base."):
                yield param

    @classmethod
    def projection_specs(cls, base: nn.Module, config: Any) -> list[ProjectionSpec]:
        raise NotImplementedError

    def input_features(self) -> int | None:
        """The size of the layer input's last dimension, for kinds whose ``forward`` mixes the
        skills' outputs per token under a router with ``needs_inputs`` (the router's
        ``token_weights(x)``, with :meth:`weights` unmixed); ``None``: the kind cannot."""
        return None

    def partition(self, name: str) -> Partition:
        partition: Partition = self.projections[name].partition  # type: ignore[assignment]
        return partition

    def task_ids(self, batch: int) -> Tensor | None:
        """The task ids for a batch of ``batch`` examples: as routed, or repeated for
        consecutive examples under ``RoutingState.repeat`` (shapes only: no host sync)."""
        task_ids = self.routing.task_ids
        if task_ids is not None and self.routing.repeat and 1 < task_ids.shape[0] < batch:
            if batch % task_ids.shape[0]:
                raise RoutingError(
                    f"site {self.site_name!r}: {task_ids.shape[0]} task ids for a batch of {batch}, "
                    "which is not a whole multiple (generate repeats each example's id for its beams)"
                )
            task_ids = task_ids.repeat_interleave(batch // task_ids.shape[0])
        return task_ids

    def routing_weights(self, batch: int) -> Tensor | None:
        """Skill weights ``(batch, H, K)`` for this forward, or ``None`` (one skill)."""
        if not self.router.needs_task_ids:
            return self.router(None)
        task_ids = self.task_ids(batch)
        if task_ids is None:
            raise RoutingError(
                f"site {self.site_name!r} is routed: call the model with `task_ids=` or inside "
                "`with adapterkit.route(model, task_ids):`"
            )
        if task_ids.shape[0] != batch:
            if task_ids.shape[0] != 1:
                raise RoutingError(
                    f"site {self.site_name!r}: {task_ids.shape[0]} task ids for a batch of {batch}"
                )
            if self.training:  # one id for the whole batch; training draws stay per example
                task_ids = task_ids.expand(batch)
        return self.router(task_ids)

    def weights(self, batch: int) -> dict[str, Tensor]:
        """Effective weights of every projection: gated by the sampler, mixed by the router.

        Each is ``[*shape]`` (shared by the batch: unrouted, or routing weights of batch
        size 1, e.g. one task id for the whole batch in eval) or ``[batch, *shape]``.
        In eval, when the router serves fewer tasks (``Router.n_tasks``) than the batch,
        weights are mixed once per task and gathered per example (no host sync): an eval
        router's weights depend on the task id only. Under a router that needs the layer
        input (``Router.needs_inputs``) every weight stays ``[K, *shape]``: the kind mixes
        the skills' outputs per token.
        """
        draws = self.draw(self.training)
        if self.router.needs_inputs:
            return {name: module(draws[name]) for name, module in self.projections.items()}
        if self.router.selects:
            return self._selected(draws, batch)
        index = None
        tasks = self.router.n_tasks
        task_ids = self.task_ids(batch) if self.router.needs_task_ids else None
        if (
            not self.training and self.router.needs_task_ids and isinstance(tasks, int) and 1 < tasks < batch
            and task_ids is not None and task_ids.shape[0] == batch
        ):
            routing: Tensor | None = self.router(torch.arange(tasks, device=task_ids.device))
            index = task_ids
        else:
            routing = self.routing_weights(batch)
        out = {}
        for name, module in self.projections.items():
            partition = self.partition(name)
            mixed = mix_skills(module(draws[name]), routing, partition)
            if index is not None:
                mixed = mixed.index_select(0, index)  # (on the CPU 5-7x faster than mixed[index], same rows)
            elif routing is not None and routing.shape[0] == 1:
                mixed = mixed[0]
            out[name] = mixed
        return out

    def _selected(self, draws: dict[str, Tensor | None], batch: int) -> dict[str, Tensor]:
        """Each example's own skill (``Router.selects``): a gather, no mixing GEMM; one id for
        the whole batch gives shared ``[*shape]`` weights."""
        task_ids = self.task_ids(batch)
        if task_ids is None:
            raise RoutingError(f"site {self.site_name!r} serves several adapters: call the model with "
                               "`adapter_names=` or `task_ids=`, or inside `with adapterkit.route(model, ids):`")
        if task_ids.shape[0] not in (1, batch):
            raise RoutingError(f"site {self.site_name!r}: {task_ids.shape[0]} adapter choices for a batch of {batch}")
        out = {}
        for name, module in self.projections.items():
            # index_select, not value[task_ids]: the same rows, 5-7x faster on CPU (advanced
            # indexing's generic kernel); no .item(): no sync
            chosen = module(draws[name]).index_select(0, task_ids)
            out[name] = chosen[0] if task_ids.shape[0] == 1 else chosen
        return out

    def serving_weights(self) -> dict[str, Tensor]:
        """Every projection's eval weight ``[*shape]`` for serving this single-skill site in
        mixed-adapter batches, with the kind's per-adapter constants (e.g. a LoRA scale) folded
        in, so that weights zero-padded to the largest shapes of several adapters compute each
        adapter's function under :meth:`serving_config`. Kinds that support mixed batches
        implement it; others raise ``ValueError`` with the reason."""
        raise ValueError(f"adapter kind {self.kind!r} does not support mixed-adapter batches")

    @classmethod
    def serving_config(cls, configs: Sequence[Any]) -> Any:
        """One config of this kind under which the :meth:`serving_weights` of adapters made
        with ``configs`` (zero-padded to the largest shapes) give each adapter's output;
        ``ValueError`` naming the field when they differ in a way that cannot be served."""
        raise ValueError(f"adapter kind {cls.kind!r} does not support mixed-adapter batches")

    def draw(self, training: bool) -> dict[str, Tensor | None]:
        """The sampler's gates of every projection for one forward (eval: the activation
        probabilities). A bias with cells of its own (one per module copy, see
        ``ProjectionSpec.bias_of``) takes the draw of its side's weight: copy ``i`` runs whole."""
        draws: dict[str, Tensor | None] = {}
        for name, module in self.projections.items():
            weight = self.drawn_with.get(name)
            cells = self.partition(name).n_cells
            if weight is not None and weight in draws and cells == self.partition(weight).n_cells > 1:
                draws[name] = draws[weight]
            else:
                draws[name] = self.sampler.gates(self.partition(name), training, module_device(module))
        return draws

    @torch.no_grad()
    def expected_weights(self) -> dict[str, Tensor]:
        """Every projection's ``[K, *shape]`` weight under the sampler's eval gates: the
        expectation of the training-time weight (``W0 + p * D`` for split projections)."""
        out = {}
        draws = self.draw(False)
        for name, module in self.projections.items():
            training = module.training
            module.eval()  # an eval forward marks no cell as used
            try:
                value = module(draws[name])
            finally:
                module.train(training)
            out[name] = value.detach().clone()
        return out

    @torch.no_grad()
    def mixed_weights(self, routing: Tensor | None = None) -> dict[str, Tensor]:
        """Every projection's eval weight ``[*shape]`` with the skills mixed by ``routing``
        (``(1, H, K)``); ``None`` for a single-skill site. What one task's eval forward uses."""
        out = {}
        for name, value in self.expected_weights().items():
            mixed = mix_skills(value, routing, self.partition(name))
            out[name] = mixed if routing is None else mixed[0]
        return out

    @torch.no_grad()
    def rebuild(self, weights: dict[str, Tensor], *, config: Any = None, router: Router | None = None) -> AdapterSite:
        """A site of the same kind on the same base, unsplit, holding ``weights``.

        Without ``router``: a single-skill, unrouted site and every weight is ``[*shape]``.
        With ``router`` (kept as is): the site keeps ``self.skills`` skills and every weight
        is ``[K, *shape]``. ``config`` (default: this site's) may change the kind's
        arguments, e.g. a new rank. The kind's other state (e.g. a LayerNorm) is copied
        when its shapes still fit. Mergers use this to deploy a plain adapter.
        """
        generator = torch.Generator()
        make_router: Callable[..., Router] = (
            functools.partial(SingleSkill, None, skills=1, generator=generator) if router is None
            else lambda heads: router
        )
        new = type(self)(
            self.base, self.config if config is None else config, name=self.site_name,
            skills=1 if router is None else self.skills, splitter=Splitter(), sampler=Sampler(),
            make_router=make_router, routing=self.routing, generator=generator,
        )
        for name, value in weights.items():
            projection: Projection = new.projections[name]  # type: ignore[assignment]  # dense splitter
            projection.weight.copy_(value if router is not None else value.unsqueeze(0))
        own = new.state_dict()
        extras = {
            k: v for k, v in self.state_dict().items()
            if not k.startswith(("base.", "projections.", "router.")) and k in own and own[k].shape == v.shape
        }
        new.load_state_dict(extras, strict=False)
        new.train(self.training)
        return new

    def delta_weight(self) -> Tensor:
        """The update this single-skill site adds to ``base.weight``, shaped like it (eval).

        Kinds that are linear in their input (LoRA) implement it; folding a site into its
        base layer (merger result :class:`~adapterkit.roles.Folded`) needs it.
        """
        raise ValueError(f"site {self.site_name!r}: fold needs a kind with a weight update (e.g. a LoRA site), "
                         f"got {self.kind!r}")

    def extra_repr(self) -> str:
        return f"site={self.site_name!r}, kind={self.kind!r}, skills={self.skills}"


def module_device(module: nn.Module) -> torch.device:
    for param in module.parameters():
        return param.device
    for buffer in module.buffers():
        return buffer.device
    return torch.device("cpu")


ADAPTER_DTYPES = ("float32", "base")
"""Values of a kind's ``Config.dtype`` (see :func:`factory_kwargs`)."""


def factory_kwargs(base: nn.Module, dtype: str = "base") -> dict[str, Any]:
    """``device``/``dtype`` for new adapter tensors: those of the first floating parameter of
    ``base``; with ``dtype="float32"`` a float16/bfloat16 base gets float32 adapters (as PEFT
    keeps them: updates and their gradients stay in full precision)."""
    for p in base.parameters():
        if p.is_floating_point():
            low = p.dtype in (torch.float16, torch.bfloat16)
            return {"device": p.device, "dtype": torch.float32 if dtype == "float32" and low else p.dtype}
    return {}
