"""Objectives: what a workflow trains a model to do (``[model] objective``).

A plugin role like backbones and datasets (hook ``adapterkit_register_objectives``;
``adapterkit plugins`` lists them). An :class:`Objective` says which model the backbone
builds (:attr:`Objective.body`: an encoder giving features, a causal language model, an
encoder-decoder), wraps it (:meth:`~Objective.wrap`: e.g. a new classification head),
encodes examples into tensors (:meth:`~Objective.encode`), computes the training loss from
a forward's output (:meth:`~Objective.loss`) and predicts for evaluation
(:meth:`~Objective.predict`); the workflows turn predictions into per-task metrics.

A wrapped model has ``body`` (adapters attach there; routed sites get task ids through
``adapterkit.route(model.body, ids)``), ``head`` (what a run trains and saves besides the
adapters: a new linear layer, or an empty module when the body predicts by itself) and
``backbone``; ``model(**encoded.inputs)`` returns what :meth:`~Objective.loss` takes with
``encoded.labels``. :class:`Classification` is today's path: body features, a new head,
cross-entropy, accuracy and macro-F1.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar, Literal

import attrs
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .roles import Configurable
from .task_ids import route
from .zoo import Backbone, Classifier, Example, WorkflowModel

BodyKind = Literal["encoder", "causal-lm", "seq2seq"]


@attrs.frozen
class Encoded:
    """Examples as tensors batched on dim 0: ``inputs`` for the model, ``labels`` for the
    loss (class indices, or token ids with -100 where no loss is taken), ``tasks`` (task
    indices) and ``extra``: what evaluation needs beyond the loss (prompts to generate
    from, targets), indexed along with the rest."""

    inputs: dict[str, Tensor]
    labels: Tensor
    tasks: Tensor
    extra: dict[str, Tensor] = attrs.field(factory=dict)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def take(self, index: Tensor) -> Encoded:
        return Encoded(
            {k: v[index] for k, v in self.inputs.items()}, self.labels[index], self.tasks[index],
            {k: v[index] for k, v in self.extra.items()},
        )

    def batches(self, size: int) -> list[Encoded]:
        """Consecutive batches of at most ``size`` examples (evaluation order)."""
        return [self.take(torch.arange(i, min(i + size, len(self)))) for i in range(0, len(self), size)]


@attrs.frozen
class Decoding:
    """How generative objectives decode in evaluation (``[eval] num_beams``, ``max_new_tokens``)."""

    num_beams: int = 1
    max_new_tokens: int = 16


@attrs.frozen
class Predictions:
    """What an objective predicted for each example; absent fields do not apply to it.

    ``predicted``/``expected``: class indices (predicted ``-1``: a generation that is none
    of the classes); ``exact``: the generated text equals the target; ``nll`` and
    ``tokens``: the summed negative log-likelihood of the target tokens and their count
    (perplexity is ``exp(sum nll / sum tokens)``)."""

    predicted: Tensor | None = None
    expected: Tensor | None = None
    exact: Tensor | None = None
    nll: Tensor | None = None
    tokens: Tensor | None = None


class Objective(Configurable):
    """A training objective; see the module docstring for the contract.

    ``body``: which model the backbone builds (:meth:`adapterkit.zoo.Backbone.build_for`);
    ``needs_classes``: the data must declare its classes (generative objectives also take
    free-form targets: then only exact match and perplexity are reported)."""

    body: ClassVar[BodyKind] = "encoder"
    needs_classes: ClassVar[bool] = True

    def wrap(self, backbone: Backbone, body: nn.Module, classes: Sequence[str]) -> WorkflowModel:
        raise NotImplementedError

    def encode(
        self, backbone: Backbone, examples: Sequence[Example], classes: Sequence[str], tasks: Sequence[str]
    ) -> Encoded:
        raise NotImplementedError

    def loss(self, outputs: Any, labels: Tensor) -> Tensor:
        raise NotImplementedError

    def predict(
        self, model: WorkflowModel, data: Encoded, batch_size: int, routed: bool, decoding: Decoding
    ) -> Predictions:
        raise NotImplementedError


def device_of(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def routing(model: WorkflowModel, task_ids: Tensor, routed: bool) -> contextlib.AbstractContextManager[Any]:
    """``adapterkit.route(model.body, task_ids)`` when the model routes, else nothing."""
    return route(model.body, task_ids) if routed else contextlib.nullcontext()  # type: ignore[arg-type]


def eval_outputs(
    model: WorkflowModel, data: Encoded, batch_size: int, routed: bool
) -> Iterator[tuple[Encoded, Tensor]]:
    """Each batch of ``data`` with the model's eval-mode output on it (routed by the batch's
    tasks); the model's train/eval mode is restored afterwards. What every ``predict`` starts from."""
    device, training = device_of(model), model.training
    model.eval()
    try:
        for part in data.batches(batch_size):
            with routing(model, part.tasks.to(device), routed):
                outputs = model(**{k: v.to(device) for k, v in part.inputs.items()})
            yield part, outputs
    finally:
        model.train(training)


def task_indices(examples: Sequence[Example], tasks: Sequence[str]) -> Tensor:
    """Each example's task index (0 for single-task data and tasks outside ``tasks``)."""
    index = {t: i for i, t in enumerate(tasks)}
    return torch.tensor([index.get(e.task, 0) if e.task is not None else 0 for e in examples], dtype=torch.long)


class Classification(Objective):
    """``classification``: the body's features, a new linear head, cross-entropy; scored by
    accuracy and macro-F1."""

    body: ClassVar[BodyKind] = "encoder"

    def wrap(self, backbone: Backbone, body: nn.Module, classes: Sequence[str]) -> WorkflowModel:
        return Classifier(backbone, body, len(classes))

    def encode(
        self, backbone: Backbone, examples: Sequence[Example], classes: Sequence[str], tasks: Sequence[str],
        *, chunk: int = 1024,
    ) -> Encoded:
        class_index = {c: i for i, c in enumerate(classes)}
        parts = [backbone.encode(examples[i : i + chunk]) for i in range(0, len(examples), chunk)]
        inputs = {key: torch.cat([p[key] for p in parts]) for key in parts[0]} if parts else {}
        labels = torch.tensor([class_index[e.label] for e in examples], dtype=torch.long)
        return Encoded(inputs, labels, task_indices(examples, tasks))

    def loss(self, outputs: Tensor, labels: Tensor) -> Tensor:
        return F.cross_entropy(outputs, labels)

    @torch.no_grad()
    def predict(
        self, model: WorkflowModel, data: Encoded, batch_size: int, routed: bool, decoding: Decoding
    ) -> Predictions:
        preds = [logits.argmax(-1).cpu() for _, logits in eval_outputs(model, data, batch_size, routed)]
        return Predictions(torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long), data.labels)
