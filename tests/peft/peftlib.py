"""Helpers of the PEFT folder tests: inputs, outputs, random non-zero adapter weights."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import adapterkit

T5_VOCAB = 100
TOL = 1e-5
# a PEFT SEQ_CLS LoRA (PEFT adds the head to modules_to_save) with per-module ranks and alphas
SEQ_CLS: dict[str, Any] = {
    "task_type": "SEQ_CLS", "r": 4, "lora_alpha": 8, "target_modules": ["query", "value"],
    "rank_pattern": {"layer.1.attention.self.query": 8, "layer.3.attention.self.value": 2},
    "alpha_pattern": {"value": 2, "layer.5.attention.self.query": 16},
}


def minilm_inputs(batch: int = 4, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 20000, (batch, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0  # some padding: the attention mask path is exercised too
    return {"input_ids": ids, "attention_mask": mask}


def t5_inputs(batch: int = 4, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, T5_VOCAB, (batch, 7), generator=g),
            "decoder_input_ids": torch.randint(0, T5_VOCAB, (batch, 4), generator=g)}


@torch.no_grad()
def output(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def randomize(model: nn.Module, markers: tuple[str, ...], seed: int, std: float = 0.1) -> None:
    """Random non-zero values (N(0, std^2)) for every parameter whose name holds a marker."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(m in name for m in markers):
                p.copy_(torch.randn(p.shape, generator=g) * std)


def randomize_trainable(model: nn.Module, seed: int, std: float = 0.1) -> None:
    """Random values for every trainable tensor of an attached model (adapters and modules to save)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)
    assert adapterkit.is_attached(model)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()
