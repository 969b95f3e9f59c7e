"""Text-to-text objectives: ``causal-lm`` (a decoder) and ``seq2seq`` (an encoder-decoder).

An example's input is its ``text``, its target its ``target`` (or, on classification
data, its label word). ``causal-lm`` trains next-token prediction on ``prompt + target +
eos`` with the loss on the target span only (prompt and padding labelled -100);
``seq2seq`` feeds the prompt to the encoder and trains the decoder on ``target + eos``.
Evaluation: perplexity of the targets (teacher-forced), and generation (greedy, or beam
search with ``[eval] num_beams``) scored by exact match and, when the targets are class
words, accuracy and macro-F1. Routed recipes get each example's task id around every
forward and around ``generate`` (which repeats them for beams: ``adapterkit.route``).

The loss is the mean over a batch's target tokens; under DDP each rank averages over its
own tokens and DDP averages the ranks, which equals the single-process step when the
ranks hold as many target tokens (class-word targets: nearly so).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from adapterkit.plugin_api import (
    AdapterkitError,
    Backbone,
    BodyKind,
    Decoding,
    Encoded,
    Example,
    Objective,
    Predictions,
    WorkflowModel,
    device_of,
    eval_outputs,
    routing,
    task_indices,
)

IGNORE = -100  # label of positions without loss (prompt, padding)


def target_of(example: Example) -> str:
    return example.target if example.target is not None else example.label


class LanguageModel(WorkflowModel):
    """A transformers language model as a workflow model: ``body`` is the model (adapters
    attach there), no new head (``head`` is empty: the body's own output layer predicts);
    ``forward(**inputs) -> logits``. ``classes``: the class words generations are read as."""

    def __init__(self, backbone: Backbone, body: nn.Module, classes: Sequence[str] = ()) -> None:
        super().__init__()
        self.backbone = backbone
        self.body = body
        self.head = nn.Identity()
        self.classes = list(classes)

    def forward(self, **inputs: Tensor) -> Tensor:
        return self.body(**inputs, use_cache=False).logits  # type: ignore[no-any-return]


def _lengths(backbone: Backbone) -> tuple[int, int]:
    """Input and target tokens kept per example (the ``hf`` backbone's ``max_length``, ``target_length``)."""
    config = backbone.config
    return int(getattr(config, "max_length", 128)), int(getattr(config, "target_length", 16))


def _padded(rows: Sequence[Sequence[int]], value: int, *, left: bool = False) -> Tensor:
    """Rows of token ids as one tensor, padded with ``value`` on the right (or the left)."""
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), max(width, 1)), value, dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            start = width - len(row) if left else 0
            out[i, start : start + len(row)] = torch.tensor(row, dtype=torch.long)
    return out


class TextToText(Objective):
    """What both language-model objectives share: tokenizing targets, generation scoring."""

    needs_classes: ClassVar[bool] = False

    def wrap(self, backbone: Backbone, body: nn.Module, classes: Sequence[str]) -> WorkflowModel:
        return LanguageModel(backbone, body, classes)

    def _tokens(self, backbone: Backbone, examples: Sequence[Example]) -> tuple[list[list[int]], list[list[int]]]:
        """Prompt token ids (with the tokenizer's special tokens) and target ids + eos."""
        tokenizer = backbone.tokenizer()
        if tokenizer.eos_token_id is None:
            raise AdapterkitError("the model's tokenizer has no eos token: text-to-text targets end with it")
        max_length, target_length = _lengths(backbone)
        prompts = tokenizer([e.text or "" for e in examples], truncation=True, max_length=max_length)["input_ids"]
        targets = tokenizer(
            [target_of(e) for e in examples], add_special_tokens=False, truncation=True, max_length=target_length
        )["input_ids"]
        return [list(p) for p in prompts], [list(t) + [tokenizer.eos_token_id] for t in targets]

    def _class_ids(self, examples: Sequence[Example], classes: Sequence[str]) -> dict[str, Tensor]:
        if not classes:
            return {}
        index = {c: i for i, c in enumerate(classes)}
        return {"class_ids": torch.tensor([index.get(target_of(e), -1) for e in examples], dtype=torch.long)}

    def _score(self, model: WorkflowModel, generated: Tensor, part: Encoded) -> tuple[Tensor, Tensor | None]:
        """Exact match of each generation with its target and, with classes, the class it names (-1: none)."""
        tokenizer = model.backbone.tokenizer()
        classes: list[str] = model.classes  # type: ignore[assignment]
        said = [t.strip() for t in tokenizer.batch_decode(generated, skip_special_tokens=True)]
        wanted = [
            tokenizer.decode([i for i in row.tolist() if i != IGNORE], skip_special_tokens=True).strip()
            for row in part.extra["target_ids"]
        ]
        exact = torch.tensor([a == b for a, b in zip(said, wanted, strict=True)])
        if not classes:
            return exact, None
        index = {c.strip().lower(): i for i, c in enumerate(classes)}
        return exact, torch.tensor([index.get(text.lower(), -1) for text in said], dtype=torch.long)

    def loss(self, outputs: Tensor, labels: Tensor) -> Tensor:
        logits, labels = self._aligned(outputs, labels)
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE)

    def _nll(self, logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        per_token = F.cross_entropy(logits.transpose(1, 2).float(), labels, ignore_index=IGNORE, reduction="none")
        return per_token.sum(1).cpu(), (labels != IGNORE).sum(1).cpu()

    def _generate(self, model: WorkflowModel, part: Encoded, routed: bool, decoding: Decoding) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def predict(
        self, model: WorkflowModel, data: Encoded, batch_size: int, routed: bool, decoding: Decoding
    ) -> Predictions:
        nll, tokens, exact, predicted = [], [], [], []
        for part, logits in eval_outputs(model, data, batch_size, routed):
            summed, count = self._nll(*self._aligned(logits, part.labels.to(logits.device)))
            nll.append(summed)
            tokens.append(count)
            match, named = self._score(model, self._generate(model, part, routed, decoding).cpu(), part)
            exact.append(match)
            if named is not None:
                predicted.append(named)
        return Predictions(
            predicted=torch.cat(predicted) if predicted else None,
            expected=data.extra.get("class_ids") if predicted else None,
            exact=torch.cat(exact) if exact else torch.zeros(0, dtype=torch.bool),
            nll=torch.cat(nll) if nll else torch.zeros(0),
            tokens=torch.cat(tokens) if tokens else torch.zeros(0, dtype=torch.long),
        )

    def _aligned(self, logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Logits and the labels they predict (the same positions; causal-lm shifts by one)."""
        return logits, labels


class CausalLM(TextToText):
    """``causal-lm``: a decoder trained on ``prompt + target + eos``, loss on the target only."""

    body: ClassVar[BodyKind] = "causal-lm"

    def encode(
        self, backbone: Backbone, examples: Sequence[Example], classes: Sequence[str], tasks: Sequence[str]
    ) -> Encoded:
        pad = backbone.tokenizer().pad_token_id
        prompts, targets = self._tokens(backbone, examples)
        sequences = [p + t for p, t in zip(prompts, targets, strict=True)]
        labels = [[IGNORE] * len(p) + t for p, t in zip(prompts, targets, strict=True)]
        input_ids = _padded(sequences, pad)
        extra = {
            "prompt_ids": _padded(prompts, pad, left=True),  # left-padded: generation continues every row
            "prompt_mask": _padded([[1] * len(p) for p in prompts], 0, left=True),
            "target_ids": _padded(targets, IGNORE),
            **self._class_ids(examples, classes),
        }
        inputs = {"input_ids": input_ids, "attention_mask": _padded([[1] * len(s) for s in sequences], 0)}
        return Encoded(inputs, _padded(labels, IGNORE), task_indices(examples, tasks), extra)

    def _aligned(self, logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Position i predicts token i + 1."""
        return logits[:, :-1], labels[:, 1:]

    def _generate(self, model: WorkflowModel, part: Encoded, routed: bool, decoding: Decoding) -> Tensor:
        device = device_of(model)
        prompt = part.extra["prompt_ids"].to(device)
        tokenizer = model.backbone.tokenizer()
        with routing(model, part.tasks.to(device), routed):  # a routed generate repeats them per beam
            out = model.body.generate(  # type: ignore[operator]
                input_ids=prompt, attention_mask=part.extra["prompt_mask"].to(device),
                **_generation_args(tokenizer, decoding),
            )
        return out[:, prompt.shape[1] :]  # type: ignore[no-any-return]


class Seq2Seq(TextToText):
    """``seq2seq``: an encoder-decoder; the prompt is the encoder's input, the decoder learns ``target + eos``."""

    body: ClassVar[BodyKind] = "seq2seq"

    def encode(
        self, backbone: Backbone, examples: Sequence[Example], classes: Sequence[str], tasks: Sequence[str]
    ) -> Encoded:
        tokenizer = backbone.tokenizer()
        pad = tokenizer.pad_token_id
        start = getattr(backbone.hf_config(), "decoder_start_token_id", None)  # type: ignore[attr-defined]
        start = pad if start is None else start
        prompts, targets = self._tokens(backbone, examples)
        inputs = {
            "input_ids": _padded(prompts, pad),
            "attention_mask": _padded([[1] * len(p) for p in prompts], 0),
            "decoder_input_ids": _padded([[start] + t[:-1] for t in targets], pad),
            "decoder_attention_mask": _padded([[1] * len(t) for t in targets], 0),
        }
        extra = {"target_ids": _padded(targets, IGNORE), **self._class_ids(examples, classes)}
        return Encoded(inputs, _padded(targets, IGNORE), task_indices(examples, tasks), extra)

    def _generate(self, model: WorkflowModel, part: Encoded, routed: bool, decoding: Decoding) -> Tensor:
        device = device_of(model)
        ids, mask = part.inputs["input_ids"].to(device), part.inputs["attention_mask"].to(device)
        body: Any = model.body
        # a routed generate routes the encoder per example and repeats the ids per beam for the decoder
        with routing(model, part.tasks.to(device), routed):
            args = _generation_args(model.backbone.tokenizer(), decoding)
            out = body.generate(input_ids=ids, attention_mask=mask, **args)
        return out  # type: ignore[no-any-return]


def _generation_args(tokenizer: Any, decoding: Decoding) -> dict[str, Any]:
    return {
        "max_new_tokens": decoding.max_new_tokens,
        "num_beams": decoding.num_beams,
        "do_sample": False,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
