"""Merger ``mosa``: collapse the cells into the expectation of the training-time weight.

Each split projection becomes ``W0 + p * D`` with ``p`` the per-element activation
probability under the site's sampler (its eval gates: ``1/N`` for ``mosa``, so the
official "mean of the N modules"; ``sum_l mix_l / n_l`` for ``hierarchical``). A
single-skill site becomes a plain dense adapter of the same kind (inference costs
exactly a standard adapter's); a site with ``K`` routed skills keeps its skills and
router and loses only the cells, so routed mergers (e.g. ``average``) can follow.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from adapterkit.roles import Merger, Sampler, SingleSkill, Splitter
from adapterkit.site import AdapterSite


@torch.no_grad()
def expected_weights(site: AdapterSite) -> dict[str, Tensor]:
    """Every projection's ``[K, *shape]`` weight under the sampler's eval gates (``W0 + p * D``)."""
    out = {}
    for name, module in site.projections.items():
        partition = site.partition(name)
        gates = site.sampler.gates(partition, False, module.delta.device) if partition.n_cells > 1 else None
        training = module.training
        module.eval()  # eval forwards never mark cells as used
        out[name] = module(gates).detach().clone()
        module.train(training)
    return out


class MoSAMerger(Merger):
    """``W0 + p * D`` per projection; see the module docstring."""

    @torch.no_grad()
    def merge_site(self, site: AdapterSite) -> nn.Module:
        weights = expected_weights(site)
        if site.skills == 1 and isinstance(site.router, SingleSkill):
            return site.dense_copy({name: w[0] for name, w in weights.items()})
        return _uncelled_copy(site, weights)


def _uncelled_copy(site: AdapterSite, weights: dict[str, Tensor]) -> AdapterSite:
    """A site of the same kind, skills and router, with every projection a plain weight."""
    router = site.router
    generator = torch.Generator()
    new = type(site)(
        site.base, site.config, name=site.site_name, skills=site.skills, splitter=Splitter(), sampler=Sampler(),
        make_router=lambda heads: router, routing=site.routing, generator=generator,
    )
    for name, value in weights.items():
        new.projections[name].weight.copy_(value)  # type: ignore[operator]
    extras = {k: v for k, v in site.state_dict().items() if not k.startswith(("base.", "projections.", "router."))}
    new.load_state_dict(extras, strict=False)
    new.train(site.training)
    return new
