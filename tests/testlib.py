"""Helpers shared by several test areas (each area's ``*lib.py`` adds its own)."""

from __future__ import annotations

import torch
from torch import nn

T5_VOCAB = 100  # the small random T5 of the ``t5_base`` fixture (tests/conftest.py)


def t5_inputs(batch: int = 5, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, T5_VOCAB, (batch, 7), generator=g),
            "decoder_input_ids": torch.randint(0, T5_VOCAB, (batch, 4), generator=g)}


def minilm_inputs(batch: int = 5, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 20000, (batch, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0  # some padding: the attention mask path is exercised too
    return {"input_ids": ids, "attention_mask": mask}


def randomize(model: nn.Module, markers: tuple[str, ...], seed: int, std: float = 0.3) -> None:
    """Random non-zero values (N(0, std^2)) for every parameter whose name holds a marker."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(m in name for m in markers):
                p.copy_(torch.randn(p.shape, generator=g) * std)
