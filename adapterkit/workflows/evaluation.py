"""Evaluation: per task and overall, what fits the objective, as a table or JSON.

Classification: accuracy and macro-F1. Generative objectives: perplexity on the target
tokens, exact match of the generated text, and accuracy and macro-F1 when the targets are
class words (a generation that is none of them counts as wrong).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import torch
from torch import Tensor

from ..objectives import Classification, Decoding, Encoded, Objective, Predictions
from ..zoo import WorkflowModel

METRICS = ("accuracy", "macro_f1", "exact_match", "perplexity")
LABELS = {"accuracy": "accuracy", "macro_f1": "macro-F1", "exact_match": "exact", "perplexity": "perplexity"}


@attrs.frozen
class Row:
    task: str
    n: int
    accuracy: float | None
    macro_f1: float | None
    exact_match: float | None = None
    perplexity: float | None = None

    def metrics(self) -> dict[str, float]:
        """The metrics this row has, by name (:data:`METRICS` order)."""
        return {name: value for name in METRICS if (value := getattr(self, name)) is not None}

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "n": self.n, **self.metrics()}

    def describe(self) -> str:
        """``accuracy 0.8125 macro-F1 0.7990`` (and ``exact 0.8 perplexity 1.93`` where they apply)."""
        return " ".join(f"{LABELS[name]} {value:.4f}" for name, value in self.metrics().items())


def macro_f1(y_true: Tensor, y_pred: Tensor) -> float:
    """Unweighted mean of per-class F1 over the classes present in truth or prediction
    (scikit-learn's ``f1_score(average="macro")``); a prediction of ``-1`` (a generation
    that is none of the classes) is a miss, not a class."""
    labels = torch.unique(torch.cat([y_true, y_pred[y_pred >= 0]]))
    scores = []
    for c in labels:
        tp = int(((y_pred == c) & (y_true == c)).sum())
        fp = int(((y_pred == c) & (y_true != c)).sum())
        fn = int(((y_pred != c) & (y_true == c)).sum())
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return float(sum(scores) / len(scores)) if scores else 0.0


@torch.no_grad()
def predict(classifier: WorkflowModel, data: Encoded, batch_size: int, routed: bool) -> Tensor:
    """Class predictions of a classifier, in eval mode, with task ids routed when it needs them."""
    predicted = Classification().predict(classifier, data, batch_size, routed, Decoding()).predicted
    assert predicted is not None
    return predicted


def report(labels: Tensor, preds: Tensor, tasks: Tensor, task_names: Sequence[str]) -> list[Row]:
    """Classification rows per task (when there are several) and one ``all`` row."""
    return report_predictions(Predictions(preds, labels), tasks, task_names)


def report_predictions(predictions: Predictions, tasks: Tensor, task_names: Sequence[str]) -> list[Row]:
    """Rows per task (when there are several) and one ``all`` row, from what an objective predicted."""
    rows = []
    if len(task_names) > 1:
        for i, name in enumerate(task_names):
            mask = tasks == i
            if mask.any():
                rows.append(_row(name, predictions, mask))
    rows.append(_row("all", predictions, torch.ones_like(tasks, dtype=torch.bool)))
    return rows


def _row(name: str, p: Predictions, mask: Tensor) -> Row:
    n = int(mask.sum())
    accuracy = f1 = exact = perplexity = None
    if p.predicted is not None and p.expected is not None:
        truth, preds = p.expected[mask], p.predicted[mask]
        accuracy = float((truth == preds).float().mean()) if n else 0.0
        f1 = macro_f1(truth, preds)
    if p.exact is not None:
        exact = float(p.exact[mask].float().mean()) if n else 0.0
    if p.nll is not None and p.tokens is not None:
        tokens = float(p.tokens[mask].sum())
        perplexity = math.exp(float(p.nll[mask].sum()) / tokens) if tokens else float("nan")
    return Row(name, n, accuracy, f1, exact, perplexity)


def evaluate(
    model: WorkflowModel, data: Encoded, task_names: Sequence[str], batch_size: int, routed: bool,
    objective: Objective | None = None, decoding: Decoding | None = None,
) -> list[Row]:
    """Rows of ``model`` on ``data`` under ``objective`` (default: classification)."""
    objective = objective or Classification()
    predictions = objective.predict(model, data, batch_size, routed, decoding or Decoding())
    return report_predictions(predictions, data.tasks, task_names)


def table(results: Mapping[str, Sequence[Row]]) -> str:
    """A plain-text table: one block of rows per model (e.g. trained, merged); the metric
    columns are those any row has."""
    rows = [row for block in results.values() for row in block]
    columns = [name for name in METRICS if any(getattr(row, name) is not None for row in rows)]
    width = {c: max(9, len(LABELS[c])) for c in columns}
    lines = [f"{'model':<20} {'task':<14} {'n':>6}" + "".join(f" {LABELS[c]:>{width[c]}}" for c in columns)]
    for model, block in results.items():
        for row in block:
            cells = "".join(
                f" {'-':>{width[c]}}" if getattr(row, c) is None else f" {getattr(row, c):>{width[c]}.4f}"
                for c in columns
            )
            lines.append(f"{model:<20} {row.task:<14} {row.n:>6}" + cells)
    return "\n".join(lines)


def as_json(results: Mapping[str, Sequence[Row]]) -> dict[str, list[dict[str, Any]]]:
    return {model: [row.to_dict() for row in rows] for model, rows in results.items()}
