"""Backbones and datasets: the models and corpora the workflows (``adapterkit train``) use.

Both are plugin roles, registered like splitters or routers (hooks
``adapterkit_register_backbones`` and ``adapterkit_register_datasets``). A
:class:`Backbone` builds a frozen pretrained body plus its preprocessing and says how to
get one feature vector per example; the workflows add a new classification head
(:class:`Classifier`) and attach adapters to the body, so recipe targets name the
body's own modules (``query``, ``_blocks.*``). A :class:`Dataset` yields labelled
:class:`Example` s, optionally tagged with a task, split into train and test.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Literal

import attrs
import numpy as np
import torch
from torch import Tensor, nn

from .errors import AdapterkitError
from .roles import Configurable

Modality = Literal["text", "image"]
Split = Literal["train", "test"]


@attrs.frozen
class Example:
    """One labelled example. ``label`` is a class name (see :meth:`Dataset.classes`).

    ``image`` is a float array ``[H, W]`` or ``[H, W, C]`` with values in ``[0, 1]``;
    ``task`` names the example's task for multi-task data (``None``: single task);
    ``target`` is the text to generate from ``text`` for text-to-text objectives
    (``None``: the label is the target). Text-to-text data with class-word targets sets
    ``label`` to the target too, so classification, balanced subsets and few-shot sets
    work on it unchanged.
    """

    label: str
    text: str | None = None
    image: np.ndarray | None = attrs.field(default=None, eq=False)
    task: str | None = None
    target: str | None = None


class Dataset(Configurable):
    """A labelled classification corpus, optionally split into tasks.

    Subclasses define ``Config`` (attrs), :attr:`modality`, :meth:`classes`,
    :meth:`tasks` and :meth:`examples`. Splits must be deterministic given the config.
    """

    modality: Modality = "text"

    def classes(self) -> list[str]:
        """Class names; an example's ``label`` is one of them."""
        raise NotImplementedError

    def tasks(self) -> list[str]:
        """Task names (domains); empty for single-task data."""
        return []

    def examples(self, split: Split) -> list[Example]:
        """The examples of ``split`` (``"train"`` or ``"test"``)."""
        raise NotImplementedError

    # A dataset that can stream its training split (``[data] stream = true``) also defines
    # ``stream(split) -> RecordStream``; after that call its ``classes``, ``tasks`` and
    # test examples must come without reading the training split into memory.


class RecordStream:
    """A training split read lazily (``[data] stream = true``): the workflows' data
    pipeline (:mod:`adapterkit.workflows.stream`) iterates :meth:`records` in every
    DataLoader worker and rank, and parses only the records that worker takes with
    :meth:`example`. So :meth:`records` must be cheap (no parsing: e.g. a file's raw
    lines), deterministic (the same order every pass) and the object picklable."""

    def records(self) -> Iterator[tuple[int, Any]]:
        """``(number, raw record)`` in a fixed order; ``number`` names it in errors."""
        raise NotImplementedError

    def example(self, number: int, record: Any) -> Example:
        raise NotImplementedError

    def count(self) -> int:
        """How many records (one pass unless the stream knows)."""
        return sum(1 for _ in self.records())


class Backbone(Configurable):
    """A pretrained model for classification: body, preprocessing and feature extraction.

    Subclasses define ``Config``, :attr:`modality`, :meth:`build` (the body, weights
    loaded, in eval mode), :meth:`encode` (examples -> input tensors batched on dim 0)
    and :meth:`features` (body + inputs -> ``[batch, feature_dim]``).
    """

    modality: Modality = "text"

    def build(self) -> nn.Module:
        raise NotImplementedError

    def build_for(self, kind: str) -> nn.Module:
        """The body an objective needs (:attr:`adapterkit.objectives.Objective.body`):
        ``encoder`` is :meth:`build`; ``causal-lm`` and ``seq2seq`` are language models,
        which backbones that have one (a Hugging Face model folder) provide with
        :meth:`tokenizer`."""
        if kind == "encoder":
            return self.build()
        raise AdapterkitError(
            f"backbone {type(self).__name__} has no {kind} model: give [model] path = a Hugging Face model folder"
        )

    def tokenizer(self) -> Any:
        """The tokenizer of a text backbone (a ``transformers`` tokenizer)."""
        raise AdapterkitError(f"backbone {type(self).__name__} has no tokenizer")

    def encode(self, examples: Sequence[Example]) -> dict[str, Tensor]:
        raise NotImplementedError

    def features(self, body: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def feature_dim(self, body: nn.Module) -> int:
        """Size of the feature vector, by default from a one-example dry run."""
        probe = Example(label="", text="a", image=np.zeros((8, 8), dtype=np.float32))
        with torch.no_grad():
            return int(self.features(body, self.encode([probe])).shape[-1])


class WorkflowModel(nn.Module):
    """What an objective wraps a body into (:meth:`adapterkit.objectives.Objective.wrap`):
    ``body`` (adapters attach there), ``head`` (what a run trains and saves besides the
    adapters; an empty module when the body predicts by itself) and ``backbone``."""

    backbone: Backbone
    body: nn.Module
    head: nn.Module


class Classifier(WorkflowModel):
    """A backbone's body plus a new linear head: ``forward(**inputs) -> logits``.

    Adapters attach to :attr:`body` (``adapterkit.attach(classifier.body, recipe)``);
    the head is trained and saved with them.
    """

    def __init__(self, backbone: Backbone, body: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.body = body
        self.head = nn.Linear(backbone.feature_dim(body), num_classes)
        param = next(body.parameters(), None)
        if param is not None:
            self.head.to(device=param.device, dtype=param.dtype)

    def forward(self, **inputs: Tensor) -> Tensor:
        return self.head(self.backbone.features(self.body, inputs))  # type: ignore[no-any-return]

