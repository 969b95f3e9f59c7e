"""Helpers of the arrow tests: small bases, LoRA experts with a chosen spectrum, a reference
per-token Arrow in plain torch, libraries on memory://."""

from __future__ import annotations

import copy
import uuid
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

import adapterkit

TARGETS = ["query", "value"]


def tiny_bert(seed: int = 0) -> nn.Module:
    """A 2-layer BERT (hidden 32) built from a config: a PreTrainedModel PEFT takes."""
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    torch.manual_seed(seed)
    return BertModel(config, add_pooling_layer=False).eval()


def bert_inputs(batch: int = 3, length: int = 7, seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8)).eval()


def factors(d_in: int, d_out: int, r: int, seed: int, gap: float | None = 0.4, size: float = 1.0) -> tuple[
        Tensor, Tensor]:
    """``A [d_in, r]``, ``B [r, d_out]``: with ``gap``, ``A B`` has singular values
    ``size * gap**i`` (a clear top direction, so PEFT's 15 power iterations converge);
    without, plain Gaussian factors."""
    g = torch.Generator().manual_seed(seed)
    if gap is None:
        return torch.randn(d_in, r, generator=g) * size / d_in ** 0.5, torch.randn(r, d_out, generator=g) * size
    q_in = torch.linalg.qr(torch.randn(d_in, r, generator=g, dtype=torch.float64))[0]
    q_out = torch.linalg.qr(torch.randn(d_out, r, generator=g, dtype=torch.float64))[0]
    s = size * gap ** torch.arange(r, dtype=torch.float64)
    # spread the singular values over both factors
    return (q_in * s.sqrt()).float(), (s.sqrt()[:, None] * q_out.T).float()


def expert(base: nn.Module, targets: Sequence[str], r: int, seed: int, *, alpha: float | None = None,
           gap: float | None = 0.4, size: float = 1.0) -> nn.Module:
    """``base`` (copied) with one LoRA whose factors come from :func:`factors`, site by site."""
    model = adapterkit.attach(copy.deepcopy(base), {
        "adapter": {"kind": "lora", "targets": list(targets), "r": r, **({"alpha": alpha} if alpha else {})}})
    with torch.no_grad():
        for i, site in enumerate(adapterkit.sites(model).values()):
            a, b = factors(site.base.in_features, site.base.out_features, r, 1000 * seed + i, gap, size)
            site.projections["A"].weight[0].copy_(a)
            site.projections["B"].weight[0].copy_(b)
    return model.eval()


def memory_url(tag: str = "arrow") -> str:
    return f"memory://adapterkit-arrow-tests/{tag}-{uuid.uuid4().hex[:10]}"


def new_library(tag: str = "lib") -> Any:
    return adapterkit.Library.init(memory_url(tag))


def dense_update(a: Tensor, b: Tensor, scale: float = 1.0) -> Tensor:
    """``ΔW = scale (A B)^T`` in float64, shaped like ``base.weight`` (``d_out x d_in``)."""
    return (scale * (a.double() @ b.double())).T


def top_right(delta: Tensor) -> Tensor:
    return torch.linalg.svd(delta.double(), full_matrices=False)[2][0]


def reference_arrow(x: Tensor, base: nn.Linear, a: Sequence[Tensor], b: Sequence[Tensor], scales: Sequence[float],
                    protos: Tensor, top_k: int, temperature: float) -> Tensor:
    """Arrow by its definition, one token and one expert at a time, in float64."""
    flat = x.reshape(-1, x.shape[-1]).double()
    out = base(x).reshape(-1, base.out_features).double().clone()
    k = min(top_k, len(a))
    for t in range(flat.shape[0]):
        h = flat[t]
        scores = (protos.double() @ h).abs()
        top = scores.topk(k)
        weights = torch.softmax(top.values / temperature, dim=0)
        for w, e in zip(weights, top.indices, strict=True):
            out[t] += w * scales[e] * (h @ a[e].double()) @ b[e].double()
    return out.view(*x.shape[:-1], base.out_features)
