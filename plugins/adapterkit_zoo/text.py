"""What every tokenizer-based text backbone shares: padded token ids in, the
attention-masked mean of the last hidden states out (as in sentence-transformers)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from adapterkit.plugin_api import Backbone, Example


class TextEncoder(Backbone):
    """A text backbone with :meth:`tokenizer` and ``config.max_length`` (input tokens kept)."""

    modality = "text"

    def tokenizer(self) -> Any:
        raise NotImplementedError

    def encode(self, examples: Sequence[Example]) -> dict[str, Tensor]:
        texts = [e.text if e.text is not None else "" for e in examples]
        tok = self.tokenizer()(
            texts, padding="max_length", truncation=True, max_length=self.config.max_length, return_tensors="pt"
        )
        return {"input_ids": tok["input_ids"], "attention_mask": tok["attention_mask"]}

    def features(self, body: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
        mask = inputs["attention_mask"]
        hidden = body(input_ids=inputs["input_ids"], attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)  # type: ignore[no-any-return]
