"""Helpers of the PEFT folder tests: inputs, outputs, random non-zero adapter weights."""

from __future__ import annotations

import functools
from typing import Any

import testlib
import torch
from torch import nn

import adapterkit

TOL = 1e-5
# a PEFT SEQ_CLS LoRA (PEFT adds the head to modules_to_save) with per-module ranks and alphas
SEQ_CLS: dict[str, Any] = {
    "task_type": "SEQ_CLS", "r": 4, "lora_alpha": 8, "target_modules": ["query", "value"],
    "rank_pattern": {"layer.1.attention.self.query": 8, "layer.3.attention.self.value": 2},
    "alpha_pattern": {"value": 2, "layer.5.attention.self.query": 16},
}


# the shared helpers at this area's sizes: 4 examples, small random values
minilm_inputs = functools.partial(testlib.minilm_inputs, batch=4)
t5_inputs = functools.partial(testlib.t5_inputs, batch=4)
randomize = functools.partial(testlib.randomize, std=0.1)


@torch.no_grad()
def output(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


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
