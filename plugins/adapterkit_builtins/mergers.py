"""Built-in mergers: ``identity`` (keep the site) and ``fold`` (a single-skill site into its base weight)."""

from __future__ import annotations

from adapterkit.plugin_api import AdapterSite, Folded, Merger


class Identity(Merger):
    """Keeps every site as it is (its eval forward already is the method's expectation)."""

    def merge_site(self, site: AdapterSite) -> AdapterSite:
        return site


class Fold(Merger):
    """Folds a single-skill site (a LoRA on ``nn.Linear``) into its base weight:
    ``W += scale * (A B)^T``, from the eval-mode weights, so a split (MoSA) LoRA folds its
    expectation. The model is left with the plain base layer: inference costs exactly
    the bare model's; ``adapterkit.detach`` unfolds it.
    """

    def merge_site(self, site: AdapterSite) -> Folded:
        site.delta_weight()  # raises with the reason when this site cannot fold
        return Folded(site)
