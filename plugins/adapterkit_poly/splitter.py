"""The ``mhr`` splitter: Multi-Head Routing cuts each projection into H heads.

Head ``h`` owns the input rows ``h*d_in/H ...`` of the down projection (LoRA A) and the
output columns ``h*d_out/H ...`` of the up projection (LoRA B); a router then gives each
head its own skill weights. The rank-r bottleneck stays shared (not block-diagonal):
``hid = sum_h x[..., I_h] A_h``, ``dy[..., J_h] = hid B_h``.
"""

from __future__ import annotations

import attrs
import torch

from adapterkit.plugin_api import Partition, ProjectionSpec, Splitter, positive


class MHRSplitter(Splitter):
    """``heads`` equal blocks along each projection's ``head_axis`` (biases stay whole)."""

    @attrs.frozen
    class Config:
        heads: int = attrs.field(default=1, validator=positive)

    def split(self, spec: ProjectionSpec, skills: int, generator: torch.Generator) -> Partition:
        heads = self.config.heads
        if spec.head_axis is None or heads == 1:
            return Partition()
        size = spec.shape[spec.head_axis]
        if size % heads:
            side = {"down": "input", "up": "output"}.get(spec.side or "", "head-axis")
            raise ValueError(
                f"mhr heads={heads} must divide the {side} size {size} of projection {spec.name!r} "
                f"(shape {tuple(spec.shape)}); pick heads among the divisors of {size}"
            )
        return Partition(heads=heads, head_axis=spec.head_axis)
