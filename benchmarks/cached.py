"""Backbones whose frozen, adapter-free prefix runs once: the accuracy studies' budget trick.

Adapters sit only in the last part of a frozen pretrained model; everything before the
first adapted module is frozen, adapter-free and (with the backbone's dropout off and
frozen batch norms in eval mode) deterministic, so its output for an example never
changes during training. These backbones compute that output once, in ``encode``, and
train on it: a training step costs only the adapted tail. The tail is the pretrained
model's own modules (the same objects, weights and names), so the math is the full
model's; ``check_cached`` in the studies' ``--quick`` runs compares the two.

* ``CachedEfficientNet``: EfficientNet-Lite0; the tail is MBConv blocks ``start..15``
  (their drop-connect rates as in the full model), the head convolution and pooling.
  Recipe targets: ``blocks.*`` (the tail's blocks, numbered from 0).
* ``CachedMiniLM``: MiniLM-L6 with dropout 0. ``tail="mlp"``: the tail is the last
  layer's MLP (see :class:`MLPTail`: its frozen outputs are cached for an adapter parallel
  to it, ``layer.output``, or for a LoRA on its output projection, ``layer.output.dense``).
  ``tail="layers"``: the last ``layers`` transformer layers (recipe targets
  ``layers.N.attention.self.query`` ...).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from adapterkit.zoo import Backbone, Example


class EfficientNetTail(nn.Module):
    """MBConv blocks ``start..`` + head convolution + pooling of a pretrained EfficientNet."""

    def __init__(self, body: nn.Module, start: int) -> None:
        super().__init__()
        n = len(body._blocks)
        rate = body._global_params.drop_connect_rate or 0.0
        self.blocks = nn.ModuleList(body._blocks[start:])
        self.rates = [rate * i / n for i in range(start, n)]  # as EfficientNet.extract_features
        self.conv_head, self.bn1, self.swish = body._conv_head, body._bn1, body._swish
        self.pool, self.dropout = body._avg_pooling, body._dropout

    def forward(self, x: Tensor) -> Tensor:
        for block, rate in zip(self.blocks, self.rates, strict=True):
            x = block(x, drop_connect_rate=rate)
        x = self.swish(self.bn1(self.conv_head(x)))
        return self.dropout(self.pool(x).flatten(1))  # type: ignore[no-any-return]


class CachedEfficientNet(Backbone):
    modality = "image"

    def __init__(self, start: int, image_size: int = 32) -> None:
        super().__init__(None)
        from adapterkit_zoo.vision import EfficientNetLite0

        self.inner = EfficientNetLite0(EfficientNetLite0.Config(image_size=image_size))
        self.start = start
        self.full = self.inner.build()
        for p in self.full.parameters():
            p.requires_grad_(False)

    def build(self) -> nn.Module:
        return EfficientNetTail(self.full, self.start).eval()

    @torch.no_grad()
    def encode(self, examples: Sequence[Example]) -> dict[str, Tensor]:
        body = self.full.eval()
        x = self.inner.encode(examples)["pixel_values"]
        h = body._swish(body._bn0(body._conv_stem(x)))
        for block in body._blocks[: self.start]:
            h = block(h)  # eval: no drop-connect
        return {"hidden": h}

    def features(self, body: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
        return body(inputs["hidden"])  # type: ignore[no-any-return]

    def feature_dim(self, body: nn.Module) -> int:
        return 1280


class CachedOutput(nn.Module):
    """Stands in for a frozen module whose output was cached: returns its first argument."""

    def forward(self, cached: Tensor, *args: Any) -> Tensor:
        return cached


class CachedLinear(nn.Linear):
    """A frozen ``nn.Linear`` whose output for the current batch was cached (``cached``, set
    by the tail before each call); without one it computes as usual. A LoRA on it adds its
    low-rank path to the cached base output: exactly the LoRA on the real layer."""

    cached: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        return self.cached if self.cached is not None else super().forward(x)


class MLPTail(nn.Module):
    """The last layer's MLP of a BERT: ``output(intermediate(h), h)``, then mean pooling.

    ``cache="output"``: the MLP's output is an input (``out``) and ``layer.output`` a
    :class:`CachedOutput` (for an adapter parallel to it). ``cache="dense"``: the
    intermediate activations and ``output.dense``'s output are inputs and ``output.dense``
    a :class:`CachedLinear` (for a LoRA on it)."""

    def __init__(self, layer: nn.Module, cache: str) -> None:
        super().__init__()
        self.layer = nn.Module()
        self.cache = cache
        if cache == "output":
            self.layer.output = CachedOutput()
            return
        output = copy.deepcopy(layer.output)
        dense = CachedLinear(output.dense.in_features, output.dense.out_features)
        dense.load_state_dict(output.dense.state_dict())
        output.dense = dense.requires_grad_(False)
        self.layer.output = output

    def forward(self, h: Tensor, mask: Tensor, out: Tensor, inter: Tensor | None = None) -> Tensor:
        if self.cache == "output":
            return mean_pool(self.layer.output(out, h), mask)
        # the CachedLinear itself: once a LoRA is attached, ``output.dense`` is the LoRA's site
        # wrapping it, and a cache set on the wrapper would go unused (the base recomputed)
        dense = next(m for m in self.layer.output.modules() if isinstance(m, CachedLinear))
        dense.cached = out
        try:
            y = self.layer.output(inter, h)
        finally:
            dense.cached = None
        return mean_pool(y, mask)


class LayersTail(nn.Module):
    """The last transformer layers of a BERT, then mean pooling."""

    def __init__(self, layers: Sequence[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, h: Tensor, mask: Tensor) -> Tensor:
        additive = additive_mask(mask, h.dtype)
        for layer in self.layers:
            out = layer(h, attention_mask=additive)
            h = out[0] if isinstance(out, tuple) else out
        return mean_pool(h, mask)


def additive_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    weights = mask.unsqueeze(-1).to(hidden.dtype)  # as MiniLM.features (sentence-transformers)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)


class CachedMiniLM(Backbone):
    modality = "text"

    def __init__(self, tail: str, *, layers: int = 2, cache: str = "output", max_length: int = 32,
                 share: CachedMiniLM | None = None) -> None:
        super().__init__(None)
        from adapterkit_zoo.minilm import MiniLM

        self.tail, self.layers, self.cache = tail, layers, cache
        if share is not None:  # the same pretrained model (loaded once), another tail
            self.inner, self.full = share.inner, share.full
            return
        self.inner = MiniLM(MiniLM.Config(max_length=max_length, dropout=0.0))
        self.full = self.inner.build()
        for p in self.full.parameters():
            p.requires_grad_(False)

    def build(self) -> nn.Module:
        blocks = self.full.encoder.layer
        if self.tail == "mlp":
            return MLPTail(blocks[-1], self.cache).eval()
        return LayersTail(blocks[-self.layers :]).eval()

    @torch.no_grad()
    def encode(self, examples: Sequence[Example]) -> dict[str, Tensor]:
        body = self.full.eval()
        tok = self.inner.encode(examples)
        mask = tok["attention_mask"]
        additive = additive_mask(mask, torch.float32)
        blocks = body.encoder.layer
        keep = len(blocks) - (1 if self.tail == "mlp" else self.layers)
        parts: dict[str, list[Tensor]] = {}
        for start in range(0, len(mask), 256):  # chunks: bounded memory
            h = body.embeddings(input_ids=tok["input_ids"][start : start + 256])
            piece = additive[start : start + 256]
            for layer in blocks[:keep]:
                h = _layer(layer, h, piece)
            if self.tail == "mlp":
                last = blocks[-1]
                h = last.attention(h, piece)[0]
                inter = last.intermediate(h)
                out = last.output(inter, h) if self.cache == "output" else last.output.dense(inter)
                parts.setdefault("out", []).append(out)
                if self.cache == "dense":
                    parts.setdefault("inter", []).append(inter)
            parts.setdefault("hidden", []).append(h)
        return {"mask": mask, **{key: torch.cat(values) for key, values in parts.items()}}

    def features(self, body: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
        if self.tail == "mlp":
            return body(inputs["hidden"], inputs["mask"], inputs["out"], inputs.get("inter"))  # type: ignore[no-any-return]
        return body(inputs["hidden"], inputs["mask"])  # type: ignore[no-any-return]

    def feature_dim(self, body: nn.Module) -> int:
        return int(self.full.config.hidden_size)


def _layer(layer: nn.Module, h: Tensor, additive: Tensor) -> Tensor:
    out = layer(h, attention_mask=additive)
    return out[0] if isinstance(out, tuple) else out  # type: ignore[no-any-return]


@torch.no_grad()
def full_features(backbone: Backbone, examples: Sequence[Example]) -> Tensor:
    """The unadapted full model's features (no cache), to check a cached backbone against."""
    inner = backbone.inner  # type: ignore[attr-defined]
    return inner.features(backbone.full.eval(), inner.encode(examples))  # type: ignore[no-any-return]


@torch.no_grad()
def check_cached(backbone: Backbone, examples: Sequence[Example]) -> float:
    """Largest difference between the cached tail's and the full model's features (no adapters)."""
    tail = backbone.build()
    cached = backbone.features(tail, backbone.encode(examples))
    return float((cached - full_features(backbone, examples)).abs().max())
