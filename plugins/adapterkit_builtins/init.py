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


@torch.no_grad()
def uniform_down(value: Tensor, heads: int, generator: torch.Generator) -> None:
    """``value[K, d_in, r]``: ``U(-b, b)`` with ``b = 1/sqrt(3 d_in)`` over the full input,
    whatever the heads (the Poly/MHR authors' A: mttl and polytropon; PEFT's per-head
    Kaiming init is ``sqrt(3 heads)`` times wider)."""
    bound = 1.0 / math.sqrt(3 * value.shape[1])
    value.uniform_(-bound, bound, generator=generator)
