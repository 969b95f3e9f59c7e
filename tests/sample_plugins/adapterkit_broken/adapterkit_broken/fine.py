"""A healthy plugin shipped next to broken ones: it must still load."""

from __future__ import annotations

from torch import nn

from adapterkit import Merger, Registry, hookimpl
from adapterkit.site import AdapterSite


class Keep(Merger):
    def merge_site(self, site: AdapterSite) -> nn.Module:
        return site


@hookimpl
def adapterkit_register_mergers(registry: Registry[Merger]) -> None:
    registry.add("keep", Keep)
