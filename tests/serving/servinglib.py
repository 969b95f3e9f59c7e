"""Small models and adapters for the named-adapter and mixed-batch tests."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import adapterkit

VOCAB = 96
ATOL = dict(rtol=0.0, atol=1e-5)


def llama() -> nn.Module:
    """A 2-layer Llama causal LM built from a config (no download), in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def gpt2() -> nn.Module:
    """A 2-layer GPT-2 LM (Conv1D projections, tied embeddings) built from a config."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel(config).eval()


def lora(targets: list[str], r: int, alpha: float | None = None, **extra: Any) -> dict[str, Any]:
    return {"adapter": {"kind": "lora", "targets": targets, "r": r, "alpha": alpha, **extra}}


@torch.no_grad()
def randomize(model: nn.Module, seed: int, std: float = 0.2) -> None:
    """Non-zero values in every parameter of the active adapter (B starts at zero)."""
    g = torch.Generator().manual_seed(seed)
    for site in adapterkit.sites(model).values():
        for p in site.adapter_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    return model(input_ids=ids, **kwargs).logits  # type: ignore[no-any-return]
