"""Mergers that remove the skill structure: ``average``, ``weighted``, ``collapse``.

All read the eval-mode weights (a sampler's gates are its expectation), so a split and
routed adapter merges to what its eval forward computes. ``collapse`` turns a routed
site into the plain LoRA of one task (exact: for a fixed task the eval weights are
constant); the built-in ``fold`` then folds that into the base weight, or
``collapse(fold=true)`` does both and remembers how to :func:`unfold`.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import torch
from torch import Tensor, nn

from adapterkit.errors import AdapterkitError
from adapterkit.roles import Merger, Sampler, SingleSkill, Splitter
from adapterkit.site import AdapterSite, mix_skills
from adapterkit.validators import one_of, positive

UNFOLD_ATTR = "_adapterkit_unfold"


def eval_weights(site: AdapterSite, routing: Tensor | None) -> dict[str, Tensor]:
    """Every projection's eval weight mixed by ``routing`` (``(1, H, K)`` or ``None``): ``[*shape]``."""
    out = {}
    for name, module in site.projections.items():
        partition = site.partition(name)
        value = module(site.sampler.gates(partition, False, _factory(site)["device"]))
        mixed = mix_skills(value, routing, partition)
        out[name] = mixed if routing is None else mixed[0]
    return out


@torch.no_grad()
def task_routing(site: AdapterSite, task: int | None) -> Tensor | None:
    """The eval routing weights ``(1, H, K)`` of ``task`` at ``site`` (``None``: one skill)."""
    router = site.router
    if not router.needs_task_ids:
        return router(None)
    if task is None:
        raise ValueError(f"site {site.site_name!r} is routed by task: say which task to collapse (task=...)")
    tasks = getattr(router.config, "tasks", None)
    if isinstance(tasks, int) and not 0 <= task < tasks:
        raise ValueError(f"task {task} is out of range: the router knows tasks [0, {tasks})")
    training = router.training
    router.eval()
    try:
        return router(torch.tensor([task], device=_factory(site)["device"]))
    finally:
        router.train(training)


def uniform_routing(site: AdapterSite) -> Tensor | None:
    if site.skills == 1:
        return None
    return torch.full((1, site.router.heads, site.skills), 1.0 / site.skills, **_factory(site))


class Average(Merger):
    """The mean of the skills (per head, the same ``1/K``): MHR-mu / Poly-mu.

    Equals the model under the ``uniform`` router exactly; the result is one plain adapter.
    """

    @torch.no_grad()
    def merge_site(self, site: AdapterSite) -> nn.Module:
        return site.dense_copy(eval_weights(site, uniform_routing(site)))


def _as_weights(value: Any) -> tuple[Any, ...]:
    if isinstance(value, (int, float)):
        raise ValueError("weights must be a list of numbers (one per skill) or of lists (one per head)")
    return tuple(tuple(float(v) for v in row) if isinstance(row, (list, tuple)) else float(row) for row in value)


class Weighted(Merger):
    """Skills combined with given weights (not normalised).

    ``mode="separate"``: ``A = sum_k w_k A_k`` and ``B = sum_k w_k B_k`` (any kind; what a
    router with those weights computes; fast, but not the weighted sum of the skills'
    updates, since ``A B`` is a product). ``weights`` may give one list per head.
    ``mode="delta"`` (LoRA): exactly ``dW = sum_k w_k A_k B_k``, held as a rank ``K*r``
    LoRA (concatenated factors), or re-factorised by SVD to ``rank`` (best rank-``rank``
    approximation; exact when ``rank >= rank(dW)``).
    """

    @attrs.frozen
    class Config:
        weights: tuple[Any, ...] = attrs.field(converter=_as_weights)
        mode: str = attrs.field(default="separate", validator=one_of("separate", "delta"))
        rank: int | None = attrs.field(default=None, validator=attrs.validators.optional(positive))

    @torch.no_grad()
    def merge_site(self, site: AdapterSite) -> nn.Module:
        per_head = any(isinstance(w, tuple) for w in self.config.weights)
        rows = [list(w) for w in self.config.weights] if per_head else [list(self.config.weights)]
        heads = site.router.heads
        if any(len(row) != site.skills for row in rows) or (per_head and len(rows) != heads):
            want = f"{heads} lists of {site.skills}" if per_head else f"{site.skills}"
            raise ValueError(
                f"site {site.site_name!r}: weighted merger needs {want} weights, got {self.config.weights}"
            )
        routing = torch.tensor(rows, **_factory(site)).expand(heads, -1).unsqueeze(0)
        if self.config.mode == "separate":
            if self.config.rank is not None:
                raise ValueError("rank applies to mode='delta' only")
            return site.dense_copy(eval_weights(site, routing))
        if per_head:
            raise ValueError("mode='delta' takes one weight per skill (the skills' whole updates are combined)")
        return delta_merge(site, rows[0], self.config.rank)


def delta_merge(site: AdapterSite, weights: Sequence[float], rank: int | None) -> nn.Module:
    """A plain LoRA holding ``sum_k w_k A_k B_k`` exactly (rank ``K*r``) or by SVD at ``rank``."""
    if set(site.projections) != {"A", "B"}:
        raise ValueError(f"site {site.site_name!r}: mode='delta' needs a LoRA site, got {site.kind!r}")
    skill_a, skill_b = (_skill_weights(site, name) for name in ("A", "B"))  # [K, d_in, r], [K, r, d_out]
    w = torch.tensor(weights, dtype=skill_a.dtype, device=skill_a.device)
    a = (skill_a * w[:, None, None]).permute(1, 0, 2).flatten(1)  # [d_in, K*r]
    b = skill_b.flatten(0, 1)  # [K*r, d_out]
    if rank is not None:
        u, s, vh = torch.linalg.svd(a.double() @ b.double(), full_matrices=False)
        root = s[:rank].sqrt()
        a, b = (u[:, :rank] * root).to(a.dtype), (root[:, None] * vh[:rank]).to(b.dtype)
    return lora_like(site, a, b)


def _skill_weights(site: AdapterSite, name: str) -> Tensor:
    module = site.projections[name]
    return module(site.sampler.gates(site.partition(name), False, _factory(site)["device"]))  # type: ignore[no-any-return]


def lora_like(site: AdapterSite, a: Tensor, b: Tensor) -> AdapterSite:
    """A single-skill site of ``site``'s kind and scale holding ``a[d_in, r']``, ``b[r', d_out]``."""
    rank = a.shape[1]
    scale = site.config.scale
    config = attrs.evolve(site.config, r=rank, alpha=scale * rank)
    generator = torch.Generator()
    new = type(site)(
        site.base, config, name=site.site_name, skills=1, splitter=Splitter(), sampler=Sampler(),
        make_router=functools.partial(SingleSkill, None, skills=1, generator=generator),
        routing=site.routing, generator=generator,
    )
    for name, value in (("A", a), ("B", b)):
        new.projections[name].get_parameter("weight").copy_(value.unsqueeze(0))
    new.train(site.training)
    return new


class Collapse(Merger):
    """One task's plain adapter: the routed site's eval weights for ``task``, fixed.

    Exact in eval. ``fold=true`` (LoRA on ``nn.Linear``) further folds it into the base
    weight (zero inference overhead) and keeps what :func:`unfold` needs to undo it.
    """

    @attrs.frozen
    class Config:
        task: int | None = None
        fold: bool = False

    @torch.no_grad()
    def merge_site(self, site: AdapterSite) -> nn.Module:
        plain = site.dense_copy(eval_weights(site, task_routing(site, self.config.task)))
        if not self.config.fold:
            return plain
        base = site.base
        if not isinstance(base, nn.Linear) or set(plain.projections) != {"A", "B"}:
            raise ValueError(f"site {site.site_name!r}: fold needs a LoRA on nn.Linear, got {site.kind!r}")
        w = eval_weights(plain, None)
        delta = (plain.config.scale * (w["A"] @ w["B"])).T.to(base.weight.dtype)
        base.weight += delta
        base.__dict__[UNFOLD_ATTR] = (site, delta)  # a plain attribute: not a submodule, not in state_dict
        return base


@torch.no_grad()
def unfold(model: nn.Module) -> nn.Module:
    """Undo ``collapse(fold=true)``: subtract each folded update and put the routed site back.

    Restores the base weights up to float rounding of ``(W + d) - d``.
    """
    found = [(name, m) for name, m in model.named_modules() if UNFOLD_ATTR in m.__dict__]
    if not found:
        raise AdapterkitError("nothing to unfold: no layer was folded with merger 'collapse' (fold=true)")
    for name, module in found:
        site, delta = module.__dict__.pop(UNFOLD_ATTR)
        module.weight -= delta
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, site)
    return model


def soup(adapters: Sequence[Mapping[str, Tensor]], weights: Sequence[float] | None = None) -> dict[str, Tensor]:
    """Weighted average (default: mean) of compatible adapter state dicts (same keys and shapes).

    Each tensor is averaged on its own (a LoRA's A and B separately: the usual "model
    soup", not the average of the updates ``A B``). Load the result with
    ``model.load_state_dict(result, strict=False)``.
    """
    if not adapters:
        raise AdapterkitError("soup needs at least one adapter")
    w = [1.0 / len(adapters)] * len(adapters) if weights is None else [float(x) for x in weights]
    if len(w) != len(adapters):
        raise AdapterkitError(f"soup: {len(w)} weights for {len(adapters)} adapters")
    first = adapters[0]
    for i, other in enumerate(adapters[1:], 1):
        if set(other) != set(first):
            diff = sorted(set(other) ^ set(first))[:3]
            raise AdapterkitError(f"soup: adapter {i} has different tensors than adapter 0 (e.g. {diff})")
        for key, value in other.items():
            if value.shape != first[key].shape:
                raise AdapterkitError(
                    f"soup: {key!r} has shape {tuple(value.shape)} in adapter {i} but {tuple(first[key].shape)} in 0"
                )
    out = {}
    for key, value in first.items():
        if value.is_floating_point():
            out[key] = sum(wi * a[key] for wi, a in zip(w, adapters, strict=True))
        elif all(torch.equal(a[key], value) for a in adapters):
            out[key] = value.clone()  # structure (e.g. cell ids) must agree, not be averaged
        else:
            raise AdapterkitError(f"soup: non-float tensor {key!r} differs between adapters; they are not compatible")
    return out  # type: ignore[return-value]


def _factory(site: AdapterSite) -> dict[str, Any]:
    for tensor in site.projections.parameters():
        return {"device": tensor.device, "dtype": tensor.dtype}
    return {}
