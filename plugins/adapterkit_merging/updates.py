"""A site's weight update ΔW as its factors make it, and back: the exact-ΔW side of merging.

A kind whose update is linear in its input (LoRA) implements ``delta_weight()``: the
update ``ΔW`` it adds to ``base.weight``, shaped like it. Its skills hold factors
``A_k [p, r]`` (the ``down`` projection) and ``B_k [r, q]`` (``up``), and
``ΔW_k = scale * L(A_k B_k)`` for a layout ``L`` the kind chooses: the transpose for
``nn.Linear`` (``[d_out, d_in]``), the product itself for a ``Conv1D``-style weight, a
reshape of either for a convolution kernel. :func:`update_of` finds ``L`` and ``scale``
from the kind's own ``delta_weight()`` on probe factors (so a kind or base layer added
later merges without a change here) and refuses, in one line, a kind whose update is not
of that form.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import torch
from torch import Tensor

from adapterkit.plugin_api import AdapterSite

PROBE_SEED = 0x5EED  # probe factors come from their own generator: no global RNG is touched


@attrs.frozen
class Update:
    """How a site's update is made of its factors: ``ΔW = scale * L(down @ up)``."""

    down: str
    up: str
    scale: float
    transposed: bool  # L: (A B)^T reshaped (nn.Linear) or A B reshaped
    shape: tuple[int, ...]  # the shape of ΔW (base.weight)

    def deltas(self, weights: Mapping[str, Tensor]) -> Tensor:
        """``ΔW_k`` of every skill, ``[K, *shape]``, from ``weights[name][K, ...]``."""
        product = weights[self.down] @ weights[self.up]  # [K, p, q]
        scaled = self.scale * product
        if self.transposed:
            scaled = scaled.transpose(-1, -2)
        return scaled.reshape(product.shape[0], *self.shape)

    def product(self, delta: Tensor, p: int, q: int) -> Tensor:
        """``A B`` (``[p, q]``) that gives ``delta`` (the inverse of :meth:`deltas` for one skill)."""
        if self.transposed:
            return (delta.reshape(q, p) / self.scale).T
        return delta.reshape(p, q) / self.scale


def no_update(site: AdapterSite) -> str:
    return (f"site {site.site_name!r}: kind {site.kind!r} has no weight update ΔW (its adapter is not a "
            "linear map of its input), so its experts cannot merge in ΔW space; merge their weights in "
            "parameter space with form='separate'")


@torch.no_grad()
def update_of(site: AdapterSite) -> Update:
    """The :class:`Update` of ``site``'s kind on its base layer, or ``ValueError`` (one line)."""
    if type(site).delta_weight is AdapterSite.delta_weight:
        raise ValueError(no_update(site))
    specs = type(site).projection_specs(site.base, site.config)
    down = [s for s in specs if s.side == "down"]
    up = [s for s in specs if s.side == "up"]
    if len(down) != 1 or len(up) != 1 or len(specs) != 2 or len(down[0].shape) != 2 or len(up[0].shape) != 2:
        names = ", ".join(s.name for s in specs)
        raise ValueError(f"site {site.site_name!r}: kind {site.kind!r} is not a product of two factors "
                         f"(projections {names}); merge with form='separate'")
    (p, r), (_, q) = down[0].shape, up[0].shape
    generator = torch.Generator().manual_seed(PROBE_SEED)
    dtype = next((t.dtype for t in site.projections.state_dict().values() if t.is_floating_point()), torch.float32)
    a, b = (torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype) for shape in ((p, r), (r, q)))
    probe = site.rebuild({down[0].name: a, up[0].name: b})
    delta = probe.delta_weight().detach()
    product = a.to(delta) @ b.to(delta)
    scale = getattr(site, "scale", None)
    for transposed in (True, False):
        layout = product.T if transposed else product
        if layout.numel() != delta.numel():
            continue
        layout = layout.reshape(delta.shape)
        found = float(scale) if isinstance(scale, (int, float)) else _fit(delta, layout)
        if torch.allclose(delta, found * layout, rtol=1e-4, atol=1e-6 * float(delta.abs().max())):
            return Update(down[0].name, up[0].name, found, transposed, tuple(delta.shape))
    raise ValueError(f"site {site.site_name!r}: kind {site.kind!r} has an update that is not scale·(A B) in any "
                     "layout this merger knows; merge with form='separate'")


def _fit(delta: Tensor, layout: Tensor) -> float:
    return float((delta.double() * layout.double()).sum() / layout.double().square().sum().clamp_min(1e-300))


def with_rank(site: AdapterSite, update: Update, a: Tensor, b: Tensor, *, scale: float | None = None) -> AdapterSite:
    """A single-skill site of ``site``'s kind holding factors ``a[p, R]``, ``b[R, q]`` with
    rank ``R`` and the update's scale (or ``scale``): ``r = R`` and, for kinds with an
    ``alpha`` (LoRA: ``scale = alpha / r``), ``alpha = scale * R``."""
    rank = a.shape[1]
    changes: dict[str, Any] = {}
    fields = {f.name for f in attrs.fields(type(site.config))}
    if "r" in fields:
        changes["r"] = rank
    elif rank != update_rank(site, update):
        raise ValueError(f"site {site.site_name!r}: kind {site.kind!r} has no rank argument 'r' to change")
    if "alpha" in fields:
        changes["alpha"] = (update.scale if scale is None else scale) * rank
    config = attrs.evolve(site.config, **changes)
    return site.rebuild({update.down: a, update.up: b}, config=config)


def update_rank(site: AdapterSite, update: Update) -> int:
    return int(site.expected_weights()[update.down].shape[-1])
