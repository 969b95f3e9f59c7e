"""The ``arrow`` router: zero-shot routing of each token to the experts whose prototype it
is most aligned with (Ostapenko et al. 2024; PEFT's ``ArrowLoraLinearLayer``).

Per site, ``prototypes [K, d_in]`` holds each expert's top right singular vector of its
update ``ΔW_k``; a token ``h`` scores ``|<h, p_k>|`` (the sign of a singular vector is
arbitrary), keeps its ``top_k`` experts, and weighs them by a softmax with temperature.
The LoRA kind mixes the experts' outputs with these weights, token by token.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import attrs
import torch
from torch import Tensor

import adapterkit
from adapterkit.plugin_api import Router, positive, positive_number


def _digests(value: Iterable[str]) -> tuple[str, ...]:
    if isinstance(value, str) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"general must be a list of adapter digests (strings), got {value!r}")
    return tuple(value)


class NotReady(adapterkit.RoutingError):
    """An arrow site without prototypes (stacked with ``router = "arrow"`` but never given any)."""


class ArrowRouter(Router):
    """Per-token top-k routing over K experts by prototype alignment; no parameters.

    ``prototypes`` is a buffer (saved with the model, so a saved arrow model reloads
    without recomputing); :func:`adapterkit_arrow.arrow` fills it from the library's stored
    prototypes, computing only the missing ones.
    """

    needs_inputs = True

    @attrs.frozen
    class Config:
        top_k: int = attrs.field(default=3, validator=positive)
        """Experts kept per token (PEFT's default 3); more than K means all K."""
        temperature: float = attrs.field(default=1.0, validator=positive_number)
        """Softmax temperature over the kept experts' scores (PEFT's ``router_temperature``)."""
        general: tuple[str, ...] = attrs.field(default=(), converter=_digests)
        """Digests of the general adapters subtracted from the experts (GenKnowSub), as
        recorded by :func:`adapterkit_arrow.arrow`: provenance only, not used to route."""

    prototypes: Tensor

    def __init__(self, config: Any, *, heads: int, skills: int, generator: torch.Generator) -> None:
        super().__init__(config, heads=heads, skills=skills, generator=generator)
        self.register_buffer("prototypes", torch.zeros(skills, 0))
        self.ready = False  # a Python flag (not a tensor): checking it costs no host sync

    def check(self, skills: int) -> None:
        if self.heads != 1:
            raise ValueError("the arrow router routes whole experts per token: it takes no heads (dense splitter)")

    def setup_inputs(self, features: int) -> None:
        if tuple(self.prototypes.shape) != (self.skills, features):
            self.prototypes = self.prototypes.new_zeros(self.skills, features)
            self.ready = False

    @torch.no_grad()
    def set_prototypes(self, prototypes: Tensor) -> None:
        """Install ``prototypes [K, d_in]`` (unit vectors; finite)."""
        if tuple(prototypes.shape) != tuple(self.prototypes.shape):
            raise ValueError(f"prototypes of shape {list(prototypes.shape)} do not fit this site's "
                             f"{list(self.prototypes.shape)} (experts x input features)")
        if not bool(torch.isfinite(prototypes).all()):
            raise ValueError("prototypes must be finite")
        self.prototypes.copy_(prototypes)
        self.ready = True

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "prototypes" in state_dict:
            self.ready = True  # a saved arrow model carries its prototypes

    def forward(self, task_ids: Tensor | None) -> Tensor | None:
        raise ValueError("the arrow router weighs experts per token on the layer input: it has no per-task "
                         "weights to collapse; merge the experts instead (task-arithmetic, ties, average)")

    def token_weights(self, inputs: Tensor) -> Tensor:
        if not self.ready:
            raise NotReady("this arrow site has no prototypes: build the model with adapterkit_arrow.arrow(...), "
                           "or compute them with adapterkit_arrow.compute_prototypes(model)")
        scores = (inputs @ self.prototypes.to(inputs.dtype).T).abs()  # [..., K], sign-free
        k = min(self.config.top_k, self.skills)
        if k < self.skills:  # the others get -inf: weight 0 after the softmax
            top, index = scores.topk(k, dim=-1)
            scores = torch.full_like(scores, float("-inf")).scatter(-1, index, top)
        return torch.softmax(scores / self.config.temperature, dim=-1)
