"""Bottleneck adapters: ``s * up(dropout(act(down(norm(h)))))`` beside or after a module.

``placement="parallel"`` (AdaptFormer / He et al.): ``out = module(*args) + s * adapter(h)``
with ``h`` the module input named by ``input_arg``. ``placement="sequential"``
(Houlsby / Pfeiffer): ``out = y + s * adapter(y)`` with ``y = module(*args)``.
Tuple outputs (as from Hugging Face layers) are adapted on their first element. Feature
sizes are read from the module's first and last sized layer (``nn.Linear``, transformers'
``Conv1D``, convolutions, norms), which fits the common Hugging Face blocks (BERT's
``BertOutput``/``BertSelfOutput``, GPT-2's ``GPT2MLP``/``GPT2Attention``, ``LlamaMLP``,
T5's ``T5LayerFF``); elsewhere set ``d_in``/``d_out``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
import torch
from torch import Tensor, nn

from adapterkit.plugin_api import (
    ADAPTER_DTYPES,
    AdapterSite,
    ProjectionSpec,
    batched_linear,
    factory_kwargs,
    one_of,
    optional,
    positive,
    probability,
)

from .init import kaiming_down, zeros
from .layers import Conv1D

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh, "identity": nn.Identity}


def feature_dims(module: nn.Module) -> tuple[int | None, int | None]:
    """Best-effort ``(d_in, d_out)`` of a module from its first and last sized layer."""
    sized: list[tuple[int, int]] = []
    for m in module.modules():
        if isinstance(m, nn.Linear):
            sized.append((m.in_features, m.out_features))
        elif Conv1D.matches(m):  # transformers' (GPT-2): weight [in, out]
            sized.append(Conv1D(m).dims())
        elif isinstance(m, nn.modules.conv._ConvNd):
            sized.append((m.in_channels, m.out_channels))
        elif isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1:
            sized.append((m.normalized_shape[0],) * 2)
        elif isinstance(m, nn.modules.batchnorm._NormBase):
            sized.append((m.num_features, m.num_features))
    if not sized:
        return None, None
    return sized[0][0], sized[-1][1]


class Bottleneck(AdapterSite):
    """A two-layer bottleneck adapter; ``down: [K, d_in, r]``, ``up: [K, r, d_out]`` (+ biases)."""

    kind = "bottleneck"

    @attrs.frozen
    class Config:
        r: int = attrs.field(default=16, validator=positive)
        placement: str = attrs.field(default="parallel", validator=one_of("parallel", "sequential"))
        scale: float | None = None  # 0.1 parallel (AdaptFormer), 1.0 sequential
        act: str = attrs.field(default="gelu", validator=one_of(*ACTIVATIONS))
        dropout: float = attrs.field(default=0.1, validator=probability)
        norm: bool = False  # a trainable LayerNorm on the adapter input
        bias: bool = True
        input_arg: int | str = 0  # parallel: the positional index or keyword feeding the adapter
        channel_dim: int = -1  # 1 for NCHW feature maps
        d_in: int | None = attrs.field(default=None, validator=optional(positive))
        d_out: int | None = attrs.field(default=None, validator=optional(positive))
        dtype: str = attrs.field(default="float32", validator=one_of(*ADAPTER_DTYPES))  # over a bf16/fp16 base

    def __init__(self, base: nn.Module, config: Any, **kwargs: Any) -> None:
        super().__init__(base, config, **kwargs)
        cfg = self.config
        d_in, _ = self.dims(base, cfg)
        self.norm = nn.LayerNorm(d_in) if cfg.norm else nn.Identity()
        self.act = ACTIVATIONS[cfg.act]()
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()
        self.scale = cfg.scale if cfg.scale is not None else (0.1 if cfg.placement == "parallel" else 1.0)
        self.norm.to(**factory_kwargs(base, cfg.dtype))

    @classmethod
    def dims(cls, base: nn.Module, config: Any) -> tuple[int, int]:
        inferred_in, inferred_out = feature_dims(base)
        d_out = config.d_out or inferred_out
        follows = config.placement == "sequential" or config.input_arg != 0
        if follows:
            inferred_in = d_out  # the adapter reads the output, or a residual-stream input
        d_in = config.d_in or inferred_in
        if d_in is None or d_out is None:
            unset = "d_out" if follows or d_in is not None else "d_in" if d_out is not None else "d_in and d_out"
            raise ValueError(f"cannot infer the feature sizes of {type(base).__name__} (it holds no Linear, Conv1D, "
                             f"convolution or norm layer); set {unset} in [adapter]")
        return d_in, d_out

    @classmethod
    def projection_specs(cls, base: nn.Module, config: Any) -> list[ProjectionSpec]:
        d_in, d_out = cls.dims(base, config)
        specs = [
            ProjectionSpec("down", (d_in, config.r), "down", 0, kaiming_down),
            ProjectionSpec("up", (config.r, d_out), "up", 1, zeros),
        ]
        if config.bias:
            specs += [
                ProjectionSpec("down_bias", (config.r,), None, None, zeros, bias_of="down"),
                ProjectionSpec("up_bias", (d_out,), None, 0, zeros, bias_of="up"),
            ]
        return specs

    @torch.no_grad()
    def serving_weights(self) -> dict[str, Tensor]:
        """The eval weights with the output scale folded into ``up`` (and its bias): zero-padded
        hidden units add nothing, whatever the activation, as their ``up`` rows are zero."""
        if self.router.needs_task_ids or self.skills != 1:
            raise ValueError(f"site {self.site_name!r} holds {self.skills} routed skills; serve its tasks one by one")
        if self.config.norm:
            raise ValueError(f"site {self.site_name!r}: a bottleneck adapter with norm = true keeps a LayerNorm of "
                             "its own, which mixed-adapter batches cannot select per example")
        w = self.mixed_weights()
        return {k: v * self.scale if k.startswith("up") else v for k, v in w.items()}

    @classmethod
    def serving_config(cls, configs: Sequence[Any]) -> Any:
        """The largest size at scale 1 (dropout off); every other field must agree."""
        free = {"r", "scale", "dropout", "dtype"}
        first = configs[0]
        for config in configs[1:]:
            differ = [f.name for f in attrs.fields(type(first))
                      if f.name not in free and getattr(config, f.name) != getattr(first, f.name)]
            if differ:
                raise ValueError(f"bottleneck adapters that differ in {differ[0]!r} cannot share a site")
        dtype = "float32" if any(c.dtype == "float32" for c in configs) else "base"
        return attrs.evolve(first, r=max(c.r for c in configs), scale=1.0, dropout=0.0, dtype=dtype)

    def adapter(self, h: Tensor) -> Tensor:
        channels_first = self.config.channel_dim != -1 and h.dim() > 2
        if channels_first:
            h = h.movedim(self.config.channel_dim, -1)
        w = self.weights(h.shape[0])
        h = h.to(w["down"].dtype)  # the adapter's precision (float32 over a bf16 base by default)
        z = batched_linear(self.norm(h), w["down"], w.get("down_bias"))
        z = batched_linear(self.dropout(self.act(z)), w["up"], w.get("up_bias")) * self.scale
        return z.movedim(-1, self.config.channel_dim) if channels_first else z

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.base(*args, **kwargs)
        y = out[0] if isinstance(out, tuple) else out
        if self.config.placement == "parallel":
            key = self.config.input_arg
            h = args[key] if isinstance(key, int) else kwargs[key]
            y = y + self.adapter(h).to(y.dtype)
        else:
            y = y + self.adapter(y).to(y.dtype)
        return (y, *out[1:]) if isinstance(out, tuple) else y
