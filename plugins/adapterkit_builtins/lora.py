"""LoRA on ``nn.Linear``: ``y = W x + scale * (dropout(x) A) B`` with skills and cells."""

from __future__ import annotations

from typing import Any

import attrs
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from adapterkit.plugin_api import AdapterSite, ProjectionSpec, batched_linear, one_of, positive, probability

from .init import kaiming_down, uniform_down, zeros

A_INITS = {"kaiming": kaiming_down, "uniform": uniform_down}


class LoRA(AdapterSite):
    """Low-rank update of a linear layer; ``A: [K, d_in, r]`` (down), ``B: [K, r, d_out]`` (up).

    ``scale = alpha / r``: ``alpha`` defaults to ``r`` (scale 1); Poly/MHR use ``alpha = 1``
    (scale exactly ``1/r``). ``init_a``: ``kaiming`` (PEFT's, and ``nn.Linear``'s:
    Kaiming-uniform per skill and head) or ``uniform`` (the Poly/MHR authors':
    ``U(±1/sqrt(3 d_in))`` over the full input, ``sqrt(3 H)`` times narrower).
    """

    kind = "lora"

    @attrs.frozen
    class Config:
        r: int = attrs.field(default=8, validator=positive)
        alpha: float | None = None
        dropout: float = attrs.field(default=0.0, validator=probability)
        init_a: str = attrs.field(default="kaiming", validator=one_of(*A_INITS))

        @property
        def scale(self) -> float:
            return (self.alpha if self.alpha is not None else self.r) / self.r

    def __init__(self, base: nn.Module, config: Any, **kwargs: Any) -> None:
        super().__init__(base, config, **kwargs)
        self.dropout = nn.Dropout(self.config.dropout) if self.config.dropout else nn.Identity()
        self.scale = self.config.scale

    @classmethod
    def projection_specs(cls, base: nn.Module, config: Any) -> list[ProjectionSpec]:
        if not isinstance(base, nn.Linear):
            raise ValueError(f"LoRA adapts nn.Linear, got {type(base).__name__}")
        return [
            ProjectionSpec("A", (base.in_features, config.r), "down", 0, A_INITS[config.init_a]),
            ProjectionSpec("B", (config.r, base.out_features), "up", 1, zeros),
        ]

    def input_features(self) -> int:
        assert isinstance(self.base, nn.Linear)  # (projection_specs checked it)
        return self.base.in_features  # routers with needs_inputs: per-token output mixing (_token_routed)

    @torch.no_grad()
    def delta_weight(self) -> Tensor:
        """``scale * (A B)^T``, shaped like ``base.weight`` (eval weights: a split LoRA gives its expectation)."""
        if type(self.base) is not nn.Linear:
            raise ValueError(f"site {self.site_name!r}: only a LoRA on nn.Linear folds into its base layer")
        if self.router.needs_task_ids or self.skills != 1:
            raise ValueError(
                f"site {self.site_name!r} holds {self.skills} routed skills; collapse it to one task first"
            )
        w = self.mixed_weights()
        return (self.scale * (w["A"] @ w["B"])).T

    def forward(self, x: Tensor) -> Tensor:
        w = self.weights(x.shape[0])
        a, b = w["A"], w["B"]
        if self.router.needs_inputs:
            return self._token_routed(x, a, b)
        base = self.base
        if (
            a.dim() == 2 and not torch.is_grad_enabled() and type(base) is nn.Linear
            and not (self.training and self.config.dropout)
            and x.numel() // x.shape[-1] * (a.shape[0] + b.shape[1]) > a.shape[0] * b.shape[1]
        ):
            # Shared weights, no autograd, many tokens: folding the update into W for this
            # call (d_in*d_out*r MACs) is cheaper than the side path (tokens*(d_in+d_out)*r).
            return F.linear(x, torch.addmm(base.weight, b.mT, a.mT, alpha=self.scale), base.bias)
        hidden = batched_linear(self.dropout(x), a)
        if self.scale != 1.0:
            hidden = hidden * self.scale  # on the r-wide hidden, not the d_out-wide output
        return batched_linear(hidden, b, add_to=base(x))

    def _token_routed(self, x: Tensor, a: Tensor, b: Tensor) -> Tensor:
        """Output mixing per token: ``W x + scale * sum_k w_k(x) (x A_k) B_k`` with the router's
        ``token_weights(x) [..., K]``, as three batched ops for all K skills (no loop):
        ``x @ [A_1 .. A_K]`` once, each token's r-wide blocks weighted, then ``@ [B_1; ..; B_K]``."""
        skills, d_in, r = a.shape
        coeff = self.router.token_weights(x)  # [..., K]
        if self.scale != 1.0:
            coeff = coeff * self.scale
        hidden = self.dropout(x) @ a.transpose(0, 1).reshape(d_in, skills * r)  # [..., K * r]
        hidden = (hidden.unflatten(-1, (skills, r)) * coeff.unsqueeze(-1)).flatten(-2)
        return batched_linear(hidden, b.reshape(skills * r, -1), add_to=self.base(x))
