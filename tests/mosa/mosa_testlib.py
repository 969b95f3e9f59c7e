"""Helpers for the MoSA tests (a uniquely named module: every test area has a conftest)."""

from __future__ import annotations

from typing import Any

import attrs
import torch
from torch import Tensor, nn

from adapterkit.roles import Router

VOCAB, HIDDEN, LAYERS = 50, 32, 2


def tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=2,
        intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return BertModel(config)


def mosa_recipe(
    *, kind: str = "bottleneck", n_cells: int = 4, share: str = "down", splitter: str = "mosa",
    sampler: dict[str, Any] | None = None, splitter_args: dict[str, Any] | None = None, **adapter: Any,
) -> dict[str, Any]:
    if kind == "bottleneck":
        base: dict[str, Any] = {"kind": "bottleneck", "targets": ["encoder.layer.*.output"], "input_arg": 1, "r": 8,
                                "dropout": 0.0}
    else:
        base = {"kind": "lora", "targets": ["query", "value"], "r": 4}
    base.update(adapter)
    split: dict[str, Any] = {"name": splitter, "share": share}
    split.update({"n_cells": n_cells} if splitter == "mosa" else {})
    split.update(splitter_args or {})
    return {
        "seed": 0,
        "adapter": base,
        "splitter": split,
        "sampler": sampler or {"name": splitter},
        "merger": {"name": "mosa"},
    }


def loss_of(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**batch).last_hidden_state
    return (out * torch.linspace(-1, 1, out.shape[-1])).sum()  # touches every output unit


def split_modules(model: nn.Module) -> list[Any]:
    """Every cell-split projection (``SparseDelta``) of an attached model, in site order."""
    from adapterkit_mosa import SparseDelta

    return [m for m in model.modules() if isinstance(m, SparseDelta)]


def active_cell(module: Any) -> int:
    """The one cell a training forward used (and clear the mark)."""
    cells = module.touched.nonzero().flatten().tolist()
    assert len(cells) == 1, cells
    module.touched.zero_()
    return int(cells[0])


@torch.no_grad()
def randomize_deltas(model: nn.Module, seed: int = 0) -> None:
    """Give every trainable adapter tensor random values, as if trained."""
    generator = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)


# chi-square critical values at p = 0.001 (the draws are seeded, so the tests are deterministic)
CHI2_999 = {3: 16.27, 9: 27.88}


def chi2_uniform(draws: Tensor, n: int) -> float:
    counts = torch.bincount(draws, minlength=n).double()
    expected = len(draws) / n
    return float(((counts - expected) ** 2 / expected).sum())


def chi2_independent(a: Tensor, b: Tensor, n: int) -> float:
    table = torch.zeros(n, n, dtype=torch.float64)
    table.index_put_((a, b), torch.ones(len(a), dtype=torch.float64), accumulate=True)
    expected = table.sum(1, keepdim=True) * table.sum(0, keepdim=True) / table.sum()
    return float(((table - expected) ** 2 / expected).sum())


class TaskMix(Router):
    """A fixed per-task mixture of skills (test router for MoSA over skill inventories)."""

    needs_task_ids = True

    @attrs.frozen
    class Config:
        pass

    def __init__(self, config: Any, *, heads: int, skills: int, generator: torch.Generator) -> None:
        super().__init__(config, heads=heads, skills=skills, generator=generator)
        self.register_buffer("table", torch.softmax(torch.randn(3, skills, generator=generator), -1))

    def forward(self, task_ids: Tensor | None) -> Tensor:
        assert task_ids is not None
        return self.table[task_ids].unsqueeze(1)
