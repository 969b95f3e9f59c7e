"""LoRA: ``y = base(x) + scale * up(down(dropout(x), A), B)`` with skills and cells, on
``nn.Linear``, transformers' ``Conv1D``, ``nn.Embedding`` and ``nn.Conv2d`` (:mod:`.layers`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from adapterkit.plugin_api import ADAPTER_DTYPES, AdapterSite, ProjectionSpec, one_of, positive, probability

from .init import kaiming_down, normal, uniform_down, zeros
from .layers import Embedding, Layer, layer_of

A_INITS = {"kaiming": kaiming_down, "uniform": uniform_down}


class LoRA(AdapterSite):
    """Low-rank update of a layer; ``A: [K, p, r]`` (down), ``B: [K, r, q]`` (up).

    ``p``/``q`` are the layer's input/output sizes (``in_channels·kh·kw`` for a convolution's
    per-kernel LoRA); :mod:`adapterkit_builtins.layers` gives each layer's layout of the update
    ``ΔW`` and the PEFT tensors it matches (``A = lora_A.flatten(1).T``, ``B = lora_B.flatten(1).T``).
    ``scale = alpha / r``: ``alpha`` defaults to ``r`` (scale 1); Poly/MHR use ``alpha = 1``
    (scale exactly ``1/r``). ``dtype``: ``"float32"`` (default) keeps ``A``/``B`` in float32
    over a float16/bfloat16 base, ``"base"`` matches the base. Every layer routes by task;
    mixing skills per token (routers on the layer input) needs ``nn.Linear`` or ``Conv1D``.
    ``init_a``: ``kaiming`` (PEFT's, and ``nn.Linear``'s: Kaiming-uniform per skill and head)
    or ``uniform`` (the Poly/MHR authors': ``U(±1/sqrt(3 p))`` over the full input,
    ``sqrt(3 H)`` times narrower).
    """

    kind = "lora"

    @attrs.frozen
    class Config:
        r: int = attrs.field(default=8, validator=positive)
        alpha: float | None = None
        dropout: float = attrs.field(default=0.0, validator=probability)
        dtype: str = attrs.field(default="float32", validator=one_of(*ADAPTER_DTYPES))
        init_a: str = attrs.field(default="kaiming", validator=one_of(*A_INITS))

        @property
        def scale(self) -> float:
            return (self.alpha if self.alpha is not None else self.r) / self.r

    def __init__(self, base: nn.Module, config: Any, **kwargs: Any) -> None:
        super().__init__(base, config, **kwargs)
        self.layer: Layer = layer_of(base)
        if self.router.needs_task_ids and getattr(base, "max_norm", None) is not None:
            raise ValueError(f"LoRA on an nn.Embedding with max_norm takes no routing by task (router "
                             f"{type(self.router).__name__}): its rows are renormalised in place")
        self.dropout = nn.Dropout(self.config.dropout) if self.config.dropout else nn.Identity()
        self.scale = self.config.scale

    @classmethod
    def projection_specs(cls, base: nn.Module, config: Any) -> list[ProjectionSpec]:
        layer = layer_of(base)
        p, q = layer.dims()
        if isinstance(layer, Embedding):  # PEFT's embedding init: A zero, B normal (A's rows see few tokens)
            return [ProjectionSpec("A", (p, config.r), "down", 0, zeros),
                    ProjectionSpec("B", (config.r, q), "up", 1, normal)]
        return [
            ProjectionSpec("A", (p, config.r), "down", 0, A_INITS[config.init_a]),
            ProjectionSpec("B", (config.r, q), "up", 1, zeros),
        ]

    def input_features(self) -> int | None:
        layer = layer_of(self.base)  # (called while the site is built)
        return layer.dims()[0] if layer.per_token else None  # per-token output mixing (_token_routed)

    @torch.no_grad()
    def delta_weight(self) -> Tensor:
        """``scale * A B`` in the base layer's layout, shaped like ``base.weight`` (eval weights: a
        split LoRA gives its expectation); computed in float32 at least, whatever the adapter dtype."""
        if self.router.needs_task_ids or self.skills != 1:
            raise ValueError(
                f"site {self.site_name!r} holds {self.skills} routed skills; collapse it to one task first"
            )
        w = self.mixed_weights()
        dtype = torch.promote_types(w["A"].dtype, torch.float32)
        return self.layer.delta(self.scale * (w["A"].to(dtype) @ w["B"].to(dtype)))

    @torch.no_grad()
    def serving_weights(self) -> dict[str, Tensor]:
        """The eval ``A`` and ``scale * B``: rank-padded with zeros they add nothing, so adapters
        of different ranks and alphas share one site (see :meth:`serving_config`)."""
        if self.router.needs_task_ids or self.skills != 1:
            raise ValueError(f"site {self.site_name!r} holds {self.skills} routed skills; serve its tasks "
                             "one by one (adapterkit.serve expands a routed adapter into its tasks)")
        w = self.mixed_weights()
        return {"A": w["A"], "B": w["B"] * self.scale}

    @classmethod
    def serving_config(cls, configs: Sequence[Any]) -> Any:
        """The largest rank at scale 1, float32 if any adapter is (dropout off: serving is eval)."""
        r = max(c.r for c in configs)
        dtype = "float32" if any(c.dtype == "float32" for c in configs) else "base"
        return attrs.evolve(configs[0], r=r, alpha=None, dropout=0.0, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        w = self.weights(x.shape[0])
        a, b = w["A"], w["B"]
        if self.router.needs_inputs:
            return self._token_routed(x, a, b)
        base = self.base
        if (
            a.dim() == 2 and not torch.is_grad_enabled() and type(base) is nn.Linear and a.dtype == base.weight.dtype
            and not (self.training and self.config.dropout)
            and x.numel() // x.shape[-1] * (a.shape[0] + b.shape[1]) > a.shape[0] * b.shape[1]
        ):
            # Shared weights, no autograd, many tokens: folding the update into W for this
            # call (d_in*d_out*r MACs) is cheaper than the side path (tokens*(d_in+d_out)*r).
            return F.linear(x, torch.addmm(base.weight, b.mT, a.mT, alpha=self.scale), base.bias)
        inputs = self.dropout(x.to(a.dtype)) if self.layer.float_input else x
        hidden = self.layer.down(inputs, a)
        if self.scale != 1.0:
            hidden = hidden * self.scale  # on the r-wide hidden, not the d_out-wide output
        return self._add_up(hidden, b, base(x))

    def _add_up(self, hidden: Tensor, b: Tensor, out: Tensor) -> Tensor:
        """``out + up(hidden, B)``: fused into one GEMM when the dtypes agree (also under
        autocast, which casts both); else the update, made in the adapter dtype, is cast to
        the base output's."""
        if hidden.dtype == out.dtype:
            return self.layer.up(hidden, b, add_to=out)
        return out + self.layer.up(hidden, b).to(out.dtype)

    def _token_routed(self, x: Tensor, a: Tensor, b: Tensor) -> Tensor:
        """Output mixing per token: ``W x + scale * sum_k w_k(x) (x A_k) B_k`` with the router's
        ``token_weights(x) [..., K]``, as three batched ops for all K skills (no loop):
        ``x @ [A_1 .. A_K]`` once, each token's r-wide blocks weighted, then ``@ [B_1; ..; B_K]``."""
        skills, d_in, r = a.shape
        inputs = x.to(a.dtype)
        coeff = self.router.token_weights(inputs)  # [..., K]
        if self.scale != 1.0:
            coeff = coeff * self.scale
        hidden = self.dropout(inputs) @ a.transpose(0, 1).reshape(d_in, skills * r)  # [..., K * r]
        hidden = (hidden.unflatten(-1, (skills, r)) * coeff.unsqueeze(-1)).flatten(-2)
        return self._add_up(hidden, b.reshape(skills * r, -1), self.base(x))
