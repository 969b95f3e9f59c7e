"""Sample third-party plugin: a ``stripes`` splitter, a ``one_stripe`` sampler and a ``prune`` merger.

``stripes`` cuts each bottleneck projection into ``n_cells`` contiguous stripes, of rows
(``by = "rows"``) or of elements in row-major order (``by = "elements"``); biases stay
whole. ``one_stripe`` activates one stripe per forward in training (uniformly, drawn
on the device) and uses the expectation ``1/n_cells`` per stripe in eval. ``prune``
(written against ``adapterkit.plugin_api`` alone) deploys each single-skill site as a plain
adapter of its eval weights with the smallest-magnitude ``1 - keep`` of each weight zeroed.
"""

from __future__ import annotations

import math

import attrs
import click
import torch
from torch import Tensor

from adapterkit.plugin_api import (
    AdapterkitError,
    AdapterSite,
    Merger,
    Partition,
    ProjectionSpec,
    Registry,
    Sampler,
    Splitter,
    hookimpl,
    one_of,
    positive,
)


class Stripes(Splitter):
    """Contiguous stripes of rows or of elements: cell ``i`` holds the ``i``-th ``1/n`` slice."""

    @attrs.frozen
    class Config:
        n_cells: int = attrs.field(default=2, validator=positive)
        by: str = attrs.field(default="rows", validator=one_of("rows", "elements"))

    def split(self, spec: ProjectionSpec, skills: int, generator: torch.Generator) -> Partition:
        if spec.side is None:  # biases are not split
            return Partition()
        n, shape = self.config.n_cells, spec.shape
        length = shape[0] if self.config.by == "rows" else math.prod(shape)
        if length < n:
            raise ValueError(f"projection {spec.name!r}: {length} {self.config.by} cannot make {n} stripes")
        stripe = torch.arange(length) * n // length
        if self.config.by == "rows":
            cell_ids = stripe.view(-1, *([1] * (len(shape) - 1))).expand(shape).clone()
        else:
            cell_ids = stripe.view(shape)
        return Partition(n_cells=n, cell_ids=cell_ids.to(torch.uint8))


class OneStripe(Sampler):
    """One stripe per forward in training; the activation probability ``1/n`` in eval."""

    def gates(self, partition: Partition, training: bool, device: torch.device) -> Tensor | None:
        n = partition.n_cells
        if n == 1:
            return None
        if not training:
            return torch.full((n,), 1.0 / n, device=device)
        pick = torch.randint(n, (1,), device=device)
        return (torch.arange(n, device=device) == pick).float()


def _fraction(instance: object, attribute: attrs.Attribute, value: float) -> None:  # type: ignore[type-arg]
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{attribute.name} must be in (0, 1], got {value!r}")


class Prune(Merger):
    """Magnitude pruning of each single-skill site's eval weights (keep the largest ``keep``)."""

    @attrs.frozen
    class Config:
        keep: float = attrs.field(default=0.5, validator=_fraction)

    def merge_site(self, site: AdapterSite) -> AdapterSite:
        if site.skills != 1:
            raise ValueError(f"site {site.site_name!r}: prune takes single-skill sites, got {site.skills} skills")
        pruned = {}
        for name, weight in site.mixed_weights().items():
            k = max(1, round(self.config.keep * weight.numel()))
            threshold = weight.abs().flatten().kthvalue(weight.numel() - k + 1).values
            pruned[name] = torch.where(weight.abs() >= threshold, weight, torch.zeros_like(weight))
        return site.rebuild(pruned)


@hookimpl
def adapterkit_register_splitters(registry: Registry[Splitter]) -> None:
    registry.add("stripes", Stripes)


@hookimpl
def adapterkit_register_mergers(registry: Registry[Merger]) -> None:
    registry.add("prune", Prune)


@hookimpl
def adapterkit_register_samplers(registry: Registry[Sampler]) -> None:
    registry.add("one_stripe", OneStripe)


@click.command("stripes-show")
@click.option("--rows", type=int, required=True)
@click.option("--cols", type=int, required=True)
@click.option("--cells", type=int, default=2, show_default=True)
def stripes_show(rows: int, cols: int, cells: int) -> None:
    """Print the cell id of every element of a rows x cols projection."""
    spec = ProjectionSpec("w", (rows, cols), "down", 0, lambda value, heads, generator: None)
    try:
        partition = Stripes(Stripes.Config(n_cells=cells)).split(spec, 1, torch.Generator())
    except ValueError as exc:  # bad user input: one line, via the CLI's error handling
        raise AdapterkitError(str(exc)) from None
    assert partition.cell_ids is not None
    for row in partition.cell_ids.tolist():
        click.echo(" ".join(map(str, row)))


@hookimpl
def adapterkit_register_commands(cli: click.Group) -> None:
    cli.add_command(stripes_show)
