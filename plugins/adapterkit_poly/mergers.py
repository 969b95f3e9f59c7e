"""Mergers that remove the skill structure: ``average``, ``weighted``, ``collapse``.

All read the eval-mode weights (``site.mixed_weights``: a sampler's gates are its
expectation), so a split and routed adapter merges to what its eval forward computes.
``collapse`` turns a routed site into the plain LoRA of one task (exact: for a fixed task
the eval weights are constant); the built-in ``fold`` then folds that into the base
weight, or ``collapse(fold=true)`` does both; :func:`unfold` (``adapterkit.unmerge``)
puts the routed sites back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import torch
from torch import Tensor, nn

import adapterkit
from adapterkit.plugin_api import (
    AdapterkitError,
    AdapterSite,
    Folded,
    Merger,
    concat_factors,
    non_negative,
    one_of,
    optional,
    positive,
    truncate,
)


@torch.no_grad()
def task_routing(site: AdapterSite, task: int | None) -> Tensor | None:
    """The eval routing weights ``(1, H, K)`` of ``task`` at ``site`` (``None``: one skill)."""
    router = site.router
    if not router.needs_task_ids:
        return router(None)
    if task is None:
        raise ValueError(f"site {site.site_name!r} is routed by task: say which task to collapse (task=...)")
    tasks = router.n_tasks
    if tasks is not None and not 0 <= task < tasks:
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


def _factory(site: AdapterSite) -> dict[str, Any]:
    for tensor in site.projections.parameters():
        return {"device": tensor.device, "dtype": tensor.dtype}
    return {}


class Average(Merger):
    """The mean of the skills (per head, the same ``1/K``): MHR-mu / Poly-mu.

    Equals the model under the ``uniform`` router exactly; the result is one plain adapter.
    """

    def merge_site(self, site: AdapterSite) -> AdapterSite:
        return site.rebuild(site.mixed_weights(uniform_routing(site)))


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
    def merge_site(self, site: AdapterSite) -> AdapterSite:
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
            return site.rebuild(site.mixed_weights(routing))
        if per_head:
            raise ValueError("mode='delta' takes one weight per skill (the skills' whole updates are combined)")
        return delta_merge(site, rows[0], self.config.rank)


def delta_merge(site: AdapterSite, weights: Sequence[float], rank: int | None) -> AdapterSite:
    """A plain LoRA holding ``sum_k w_k A_k B_k`` exactly (rank ``K*r``) or by SVD at ``rank``."""
    if set(site.projections) != {"A", "B"}:
        raise ValueError(f"site {site.site_name!r}: mode='delta' needs a LoRA site, got {site.kind!r}")
    expected = site.expected_weights()
    a, b = concat_factors(expected["A"], expected["B"], weights)  # [d_in, K*r], [K*r, d_out]
    if rank is not None:
        a, b = truncate(a, b, rank)
    return lora_like(site, a, b)


def lora_like(site: AdapterSite, a: Tensor, b: Tensor) -> AdapterSite:
    """A single-skill site of ``site``'s kind and scale holding ``a[d_in, r']``, ``b[r', d_out]``."""
    rank = a.shape[1]
    config = attrs.evolve(site.config, r=rank, alpha=site.config.scale * rank)
    return site.rebuild({"A": a, "B": b}, config=config)


class Collapse(Merger):
    """One task's plain adapter: the routed site's eval weights for ``task``, fixed.

    Exact in eval. ``fold=true`` (LoRA on ``nn.Linear``) further folds it into the base
    weight (zero inference overhead) and keeps what :func:`unfold` needs to undo it.
    """

    @attrs.frozen
    class Config:
        task: int | None = attrs.field(default=None, validator=optional(non_negative))
        """The task's index in the router (the CLI also takes its name)."""
        fold: bool = False

    def merge_site(self, site: AdapterSite) -> AdapterSite | Folded:
        plain = site.rebuild(site.mixed_weights(task_routing(site, self.config.task)))
        return Folded(plain) if self.config.fold else plain


def unfold(model: nn.Module) -> nn.Module:
    """Undo ``collapse(fold=true)``: subtract each folded update and put the routed sites back
    (:func:`adapterkit.unmerge` of that merge). Restores the base weights up to float
    rounding of ``(W + d) - d``."""
    if not adapterkit.folded_sites(model):
        raise AdapterkitError("nothing to unfold: no layer was folded with merger 'collapse' (fold=true)")
    return adapterkit.unmerge(model)


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
