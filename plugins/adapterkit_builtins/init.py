"""Initialisers shared by the built-in kinds."""

from __future__ import annotations

import math

import torch
from torch import Tensor


@torch.no_grad()
def kaiming_down(value: Tensor, heads: int, generator: torch.Generator) -> None:
    """``value[K, d_in, r]``: per skill and head, Kaiming-uniform (a=sqrt 5) on the
    ``(r, d_in/heads)`` view, transposed (nn.Linear's default; PEFT LoRA/Poly's A)."""
    skills, d_in, r = value.shape
    block = d_in // heads
    for k in range(skills):
        for h in range(heads):
            tmp = torch.empty(r, block)
            torch.nn.init.kaiming_uniform_(tmp, a=math.sqrt(5), generator=generator)
            value[k, h * block : (h + 1) * block].copy_(tmp.T)


@torch.no_grad()
def zeros(value: Tensor, heads: int, generator: torch.Generator) -> None:
    value.zero_()


@torch.no_grad()
def normal(value: Tensor, heads: int, generator: torch.Generator) -> None:
    """Standard normal (PEFT's ``lora_embedding_B``, whose ``A`` starts at zero)."""
    value.copy_(torch.randn(value.shape, generator=generator))
