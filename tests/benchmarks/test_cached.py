"""The accuracy studies' cached backbones: a LoRA on the cached MiniLM tail uses the cached
output of the layer it wraps instead of recomputing it (the point of the cache)."""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from cached import CachedLinear, CachedMiniLM, full_features  # noqa: E402

import adapterkit  # noqa: E402
from adapterkit.recipe import Recipe  # noqa: E402
from adapterkit.zoo import Example  # noqa: E402


def test_lora_on_the_cached_tail_reads_the_cache() -> None:
    backbone = CachedMiniLM("mlp", cache="dense")
    tail = backbone.build()
    adapterkit.attach(tail, Recipe.from_dict({"seed": 0, "adapter": {"kind": "lora", "targets": ["layer.output.dense"],
                                                                     "r": 4}}))
    examples = [Example(label="neutral", text=t, task="t") for t in ("@united thanks", "flight delayed again")]
    inputs = backbone.encode(examples)
    (dense,) = [m for m in tail.modules() if isinstance(m, CachedLinear)]
    with torch.no_grad():
        dense.weight.fill_(float("nan"))  # a recomputed projection would turn every feature into NaN
        features = backbone.features(tail, inputs)
    # LoRA's B starts at zero: the adapted tail equals the full, unadapted model
    torch.testing.assert_close(features, full_features(backbone, examples))
