"""The merger plugins: ``task-arithmetic``, ``ties``, ``dare-linear``, ``dare-ties``, ``magnitude-prune``.

Each combines the K skills of a site (a stack of experts from :func:`adapterkit.stack`,
or a trained inventory) into one plain adapter of the same kind.

``form = "delta"`` (default; kinds with a weight update, LoRA): the method runs on the
experts' updates ``ΔW_k = scale * (A_k B_k)^T`` (shaped like ``base.weight``, exactly
PEFT's task tensors). The result is a LoRA holding the merged ``ΔW``: for the linear
``task-arithmetic``, exactly, as concatenated factors of rank ``sum_k r_k``; otherwise
as an SVD at full rank ``min(d_in, d_out)`` (exact up to float rounding). ``rank = n``
re-factorises either to its best rank-``n`` approximation.

``form = "separate"``: the method runs on the factors themselves, PEFT's
``add_weighted_adapter`` without SVD (``linear``, ``ties``, ...): LoRA ``A`` with weights
``sign(w_k s_k) sqrt|w_k s_k|`` and ``B`` with ``sqrt|w_k s_k|``, result scale 1. The
product of merged factors carries cross-terms ``A_j B_k`` (``j != k``), so it is not the
merged update. For kinds without a weight update (bottleneck adapters, which are
nonlinear) this parameter-space merge of every weight with ``w_k`` is the only form.

Random draws (DARE) come from one generator seeded with ``seed``, drawn site by site in
the model's order, expert by expert (``A`` before ``B`` when separate): the same
sequence as ``torch.manual_seed(seed)`` followed by PEFT's ``merge_utils`` calls in that order.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import attrs
import torch
from torch import Tensor

from adapterkit.plugin_api import (
    AdapterSite,
    Merger,
    concat_factors,
    factorize,
    non_negative,
    one_of,
    optional,
    positive,
    truncate,
)

from . import methods
from .updates import Update, update_of, with_rank

FORMS = ("delta", "separate")


def _as_weights(value: Any) -> tuple[float, ...] | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"weights must be a list of numbers, one per expert, got {value!r}")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"weights must be a list of finite numbers, one per expert, got {list(value)!r}")
        out.append(float(v))
    if not out:
        raise ValueError("weights must not be empty")
    return tuple(out)


def _density(instance: Any, attribute: Any, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"density must be in (0, 1] (the fraction of each expert kept), got {value!r}")


def _weights_field() -> Any:
    return attrs.field(default=None, converter=_as_weights, kw_only=True)


def _rank_field() -> Any:
    return attrs.field(default=None, validator=optional(positive), kw_only=True)


def _form_field() -> Any:
    return attrs.field(default="delta", validator=one_of(*FORMS), kw_only=True)


def _sign_field() -> Any:
    return attrs.field(default="total", validator=one_of(*methods.SIGN_METHODS), kw_only=True)


class TaskMerger(Merger):
    """Shared machinery: weights per skill, the two forms, the result's rank.

    Subclasses set :attr:`linear` (the method is linear in the task tensors: exact
    concatenated factors) and implement :meth:`combine` on ``tensors[K, *shape]``.
    """

    linear: ClassVar[bool] = False
    name: ClassVar[str] = ""

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        seed = getattr(self.config, "seed", None)
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self._rank: tuple[str, int] | None = None  # (first site, its result rank): one recipe, one rank

    def combine(self, tensors: Tensor, weights: list[float]) -> Tensor:
        raise NotImplementedError

    def weights(self, site: AdapterSite) -> list[float]:
        given = self.config.weights
        if given is None:
            return [1.0] * site.skills
        if len(given) != site.skills:
            raise ValueError(f"site {site.site_name!r} holds {site.skills} experts (skills) but "
                             f"{len(given)} weights were given")
        return list(given)

    @torch.no_grad()
    def merge_site(self, site: AdapterSite) -> AdapterSite:
        weights = self.weights(site)
        if self.config.form == "separate":
            if self.config.rank is not None:
                raise ValueError("rank applies to form='delta' only (form='separate' keeps the rank)")
            return self._separate(site, weights)
        update = update_of(site)
        expected = site.expected_weights()
        a, b = expected[update.down], expected[update.up]  # [K, p, r], [K, r, q]
        p, q = a.shape[1], b.shape[2]
        if self.linear:
            fa, fb = concat_factors(a, b, weights, drop_padding=True)
            if self.config.rank is not None:
                fa, fb = truncate(fa, fb, self.config.rank)
        else:
            merged = self.combine(update.deltas(expected), weights)
            fa, fb = factorize(update.product(merged, p, q), self.config.rank)
        fa, fb = self._uniform_rank(site, fa, fb)
        return with_rank(site, update, fa, fb)

    def _uniform_rank(self, site: AdapterSite, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """Pad to the rank of the first merged site: a merged model's sites share one recipe."""
        rank = a.shape[1]
        if self._rank is None:
            self._rank = (site.site_name, rank)
            return a, b
        first, want = self._rank
        if rank > want:
            raise ValueError(f"site {site.site_name!r} needs rank {rank} to hold its merged update exactly but site "
                             f"{first!r} needs {want}, and one merged model holds one rank: pass rank={rank}")
        if rank < want:
            a = torch.cat([a, a.new_zeros(a.shape[0], want - rank)], dim=1)
            b = torch.cat([b, b.new_zeros(want - rank, b.shape[1])], dim=0)
        return a, b

    def _separate(self, site: AdapterSite, weights: list[float]) -> AdapterSite:
        expected = site.expected_weights()
        try:
            update: Update | None = update_of(site)
        except ValueError:
            update = None
        if update is None:  # parameter space: every weight of the kind with w_k
            merged = {name: self.combine(value, weights) for name, value in expected.items()}
            return site.rebuild(merged)
        scaled = [w * update.scale for w in weights]  # PEFT: sqrt split, scale folded, result scale 1
        weights_a = [math.sqrt(abs(x)) * (1 if x >= 0 else -1) for x in scaled]
        weights_b = [math.sqrt(abs(x)) for x in scaled]
        a = self.combine(expected[update.down], weights_a)
        b = self.combine(expected[update.up], weights_b)
        return with_rank(site, update, a, b, scale=1.0)


class TaskArithmetic(TaskMerger):
    """``sum_k w_k ΔW_k`` (task vectors added; a negative weight subtracts an expert)."""

    linear = True

    @attrs.frozen
    class Config:
        weights: tuple[float, ...] | None = _weights_field()
        rank: int | None = _rank_field()
        form: str = _form_field()

    def combine(self, tensors: Tensor, weights: list[float]) -> Tensor:
        return methods.task_arithmetic(tensors, weights)


class MagnitudePrune(TaskMerger):
    """Each expert keeps its ``density`` largest-magnitude entries, then ``sum_k w_k``."""

    @attrs.frozen
    class Config:
        density: float = attrs.field(validator=_density, kw_only=True)
        weights: tuple[float, ...] | None = _weights_field()
        rank: int | None = _rank_field()
        form: str = _form_field()

    def combine(self, tensors: Tensor, weights: list[float]) -> Tensor:
        return methods.magnitude_prune(tensors, weights, self.config.density)


class Ties(TaskMerger):
    """TIES: trim to ``density`` by magnitude, elect a sign per entry, disjoint mean."""

    @attrs.frozen
    class Config:
        density: float = attrs.field(validator=_density, kw_only=True)
        weights: tuple[float, ...] | None = _weights_field()
        majority_sign_method: str = _sign_field()
        rank: int | None = _rank_field()
        form: str = _form_field()

    def combine(self, tensors: Tensor, weights: list[float]) -> Tensor:
        return methods.ties(tensors, weights, self.config.density, self.config.majority_sign_method)


class DareLinear(TaskMerger):
    """DARE: drop each entry with probability ``1 - density``, rescale by ``1/density``, sum."""

    @attrs.frozen
    class Config:
        density: float = attrs.field(validator=_density, kw_only=True)
        weights: tuple[float, ...] | None = _weights_field()
        seed: int = attrs.field(default=0, validator=non_negative, kw_only=True)
        rank: int | None = _rank_field()
        form: str = _form_field()

    def combine(self, tensors: Tensor, weights: list[float]) -> Tensor:
        return methods.dare_linear(tensors, weights, self.config.density, generator=self.generator)


class DareTies(TaskMerger):
    """DARE's drop and rescale, then TIES' sign election and disjoint mean."""

    @attrs.frozen
    class Config:
        density: float = attrs.field(validator=_density, kw_only=True)
        weights: tuple[float, ...] | None = _weights_field()
        majority_sign_method: str = _sign_field()
        seed: int = attrs.field(default=0, validator=non_negative, kw_only=True)
        rank: int | None = _rank_field()
        form: str = _form_field()

    def combine(self, tensors: Tensor, weights: list[float]) -> Tensor:
        return methods.dare_ties(tensors, weights, self.config.density, self.config.majority_sign_method,
                                 generator=self.generator)


MERGERS: dict[str, type[TaskMerger]] = {
    "task-arithmetic": TaskArithmetic,
    "ties": Ties,
    "dare-linear": DareLinear,
    "dare-ties": DareTies,
    "magnitude-prune": MagnitudePrune,
}
