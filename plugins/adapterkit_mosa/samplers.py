"""Samplers ``mosa`` and ``hierarchical``: which cell of each split projection trains.

Both draw on the device with torch ops only (no host sync, no Python branch on the
draw), once per split projection and per forward call, so layers and projections draw
independently and the whole batch shares a draw. In eval they return the per-cell
activation probability ``p``, so the eval forward is the merged expectation
``W0 + p * D``.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import torch
from torch import Tensor, nn

from adapterkit.plugin_api import Partition, Sampler

SCHEDULES = ("fixed", "coarse-to-fine")


class MoSASampler(Sampler):
    """One cell per split projection, uniform over its ``n`` cells; eval gates ``1/n``."""

    def gates(self, partition: Partition, training: bool, device: torch.device) -> Tensor | None:
        n = partition.n_cells
        if n == 1:
            return None
        if not training:
            return torch.full((n,), 1.0 / n, device=device)
        index = torch.randint(n, (), device=device)
        return (torch.arange(n, device=device) == index).float()


def _mix(value: Sequence[float] | None) -> tuple[float, ...] | None:
    return None if value is None else tuple(float(v) for v in value)


def _check_mix(instance: object, attribute: attrs.Attribute, value: tuple[float, ...] | None) -> None:  # type: ignore[type-arg]
    if value is not None and (not value or any(v < 0 for v in value) or sum(value) <= 0):
        raise ValueError(f"mix must be non-negative level weights with a positive sum, got {list(value)}")


class HierarchicalSampler(Sampler, nn.Module):
    """Pick a level of a nested partition, then one of its cells uniformly.

    ``schedule = "fixed"``: levels drawn with probabilities ``mix`` (normalised; default
    uniform). ``schedule = "coarse-to-fine"``: the level mix moves linearly from the
    coarsest level (progress 0) through each level to the finest (progress 1); the
    training loop reports progress with :func:`adapterkit_mosa.set_progress`. The
    activation probability of every element is ``sum_l mix_l / n_l``: the eval gates,
    and so the merge. On a plain ``mosa`` partition it behaves like the ``mosa`` sampler.
    """

    @attrs.frozen
    class Config:
        mix: tuple[float, ...] | None = attrs.field(default=None, converter=_mix, validator=_check_mix)
        schedule: str = attrs.field(default="fixed")

        @schedule.validator
        def _check_schedule(self, attribute: attrs.Attribute, value: str) -> None:  # type: ignore[type-arg]
            if value not in SCHEDULES:
                raise ValueError(f"schedule must be one of {', '.join(map(repr, SCHEDULES))}, got {value!r}")
            if value == "coarse-to-fine" and self.mix is not None:
                raise ValueError("give either mix (a fixed level mix) or schedule = 'coarse-to-fine', not both")

    progress: Tensor

    def __init__(self, config: Config | None = None) -> None:
        Sampler.__init__(self, config)
        nn.Module.__init__(self)
        # Fraction of training done, for the schedule. A buffer of the sampler module (which
        # every site holds): saved with the adapter, so a loaded coarse-to-fine model
        # evaluates at the progress it was saved at, and moved with the model's device.
        self.register_buffer("progress", torch.zeros(()))

    def set_progress(self, fraction: float) -> None:
        """Training progress in ``[0, 1]`` (in place: compiled graphs see it without recompiling)."""
        self.progress.fill_(min(max(float(fraction), 0.0), 1.0))

    @staticmethod
    def levels(partition: Partition) -> tuple[int, ...]:
        return tuple(partition.meta.get("levels", (partition.n_cells,)))

    def check(self, partition: Partition) -> None:
        levels = self.levels(partition)
        if partition.n_cells > 1 and self.config.mix is not None and len(self.config.mix) != len(levels):
            raise ValueError(
                f"sampler 'hierarchical': mix has {len(self.config.mix)} weights but the partition has levels "
                f"{list(levels)}"
            )

    def level_mix(self, levels: Sequence[int], device: torch.device) -> Tensor:
        """Probability of each level for the next draw, shape ``(L,)``."""
        n_levels = len(levels)
        if self.config.schedule == "coarse-to-fine":
            position = self.progress.to(device) * (n_levels - 1)
            lower = position.floor().clamp(max=n_levels - 1)
            frac = position - lower
            index = torch.arange(n_levels, device=device)
            return (index == lower) * (1 - frac) + (index == (lower + 1).clamp(max=n_levels - 1)) * frac
        mix = self.config.mix or (1.0,) * n_levels
        if len(mix) != n_levels:
            raise ValueError(
                f"sampler 'hierarchical': mix has {len(mix)} weights but the partition has levels {list(levels)}"
            )
        weights = torch.tensor(mix, device=device)
        return weights / weights.sum()

    def gates(self, partition: Partition, training: bool, device: torch.device) -> Tensor | None:
        n = partition.n_cells
        if n == 1:
            return None
        levels = self.levels(partition)
        mix = self.level_mix(levels, device)
        counts = torch.tensor(levels, device=device, dtype=torch.float32)
        if not training:
            return ((mix / counts).sum()).expand(n).clone()
        # Tensor ops only, no indexing by a drawn value (that would need its value on the host).
        u = torch.rand(2, device=device)
        level = (u[0] > mix.cumsum(0)[:-1]).sum()  # inverse CDF
        count = (counts * (torch.arange(len(levels), device=device) == level)).sum()  # cells at that level
        cell = torch.minimum((u[1] * count).floor(), count - 1)  # u < 1, but float rounding
        group = n / count  # finest cells per cell of that level (exact: levels nest)
        return (torch.div(torch.arange(n, device=device), group, rounding_mode="floor") == cell).float()
