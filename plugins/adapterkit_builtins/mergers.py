"""Built-in mergers: ``identity`` (keep the site) and ``fold`` (LoRA into the base weight)."""

from __future__ import annotations

import torch
from torch import nn

from adapterkit.roles import Merger
from adapterkit.site import AdapterSite

from .lora import LoRA


class Identity(Merger):
    """Keeps every site as it is (its eval forward already is the method's expectation)."""

    def merge_site(self, site: AdapterSite) -> nn.Module:
        return site


class Fold(Merger):
    """Folds a single-skill LoRA into its ``nn.Linear``: ``W += scale * (A B)^T``.

    Uses the eval-mode weights, so a split (MoSA) LoRA folds its expectation. Returns the
    plain base layer: inference costs exactly the bare model's.
    """

    @torch.no_grad()
    def merge_site(self, site: AdapterSite) -> nn.Module:
        if not isinstance(site, LoRA):
            raise ValueError(f"site {site.site_name!r}: fold needs a LoRA site, got {site.kind!r}")
        if site.router.needs_task_ids or site.skills != 1:
            raise ValueError(
                f"site {site.site_name!r} holds {site.skills} routed skills; collapse it to one task first"
            )
        training = site.training
        site.eval()
        w = site.weights(1)
        site.train(training)
        base: nn.Linear = site.base  # type: ignore[assignment]
        base.weight += (site.scale * (w["A"] @ w["B"])).T.to(base.weight.dtype)
        return base
