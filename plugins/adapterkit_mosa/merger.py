"""Merger ``mosa``: collapse the cells into the expectation of the training-time weight.

Each split projection becomes ``W0 + p * D`` with ``p`` the per-element activation
probability under the site's sampler (its eval gates: ``1/N`` for ``mosa``, so the
official "mean of the N modules"; ``sum_l mix_l / n_l`` for ``hierarchical``):
``site.expected_weights()``. A single-skill site becomes a plain dense adapter of the
same kind (inference costs exactly a standard adapter's); a site with ``K`` routed
skills keeps its skills and router and loses only the cells, so routed mergers (e.g.
``average``) can follow.
"""

from __future__ import annotations

from adapterkit.plugin_api import AdapterSite, Merger, SingleSkill


class MoSAMerger(Merger):
    """``W0 + p * D`` per projection; see the module docstring."""

    def merge_site(self, site: AdapterSite) -> AdapterSite:
        weights = site.expected_weights()
        if site.skills == 1 and isinstance(site.router, SingleSkill):
            return site.rebuild({name: w[0] for name, w in weights.items()})
        return site.rebuild(weights, router=site.router)
