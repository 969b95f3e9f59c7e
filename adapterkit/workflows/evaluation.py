"""Evaluation: accuracy and macro-F1, overall and per task, as a table or JSON."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import torch
from torch import Tensor

from ..attach import route
from ..zoo import Classifier
from .data import Encoded


@attrs.frozen
class Row:
    task: str
    n: int
    accuracy: float
    macro_f1: float

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


def macro_f1(y_true: Tensor, y_pred: Tensor) -> float:
    """Unweighted mean of per-class F1 over the classes present in truth or prediction
    (scikit-learn's ``f1_score(average="macro")``)."""
    labels = torch.unique(torch.cat([y_true, y_pred]))
    scores = []
    for c in labels:
        tp = int(((y_pred == c) & (y_true == c)).sum())
        fp = int(((y_pred == c) & (y_true != c)).sum())
        fn = int(((y_pred != c) & (y_true == c)).sum())
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return float(sum(scores) / len(scores)) if scores else 0.0


@torch.no_grad()
def predict(classifier: Classifier, data: Encoded, batch_size: int, routed: bool) -> Tensor:
    """Class predictions, in eval mode, with task ids routed when the model needs them."""
    device = classifier.head.weight.device
    training = classifier.training
    classifier.eval()
    preds = []
    for start in range(0, len(data), batch_size):
        part = data.take(torch.arange(start, min(start + batch_size, len(data))))
        inputs = {k: v.to(device) for k, v in part.inputs.items()}
        if routed:
            with route(classifier.body, part.tasks.to(device)):
                logits = classifier(**inputs)
        else:
            logits = classifier(**inputs)
        preds.append(logits.argmax(-1).cpu())
    classifier.train(training)
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)


def report(labels: Tensor, preds: Tensor, tasks: Tensor, task_names: Sequence[str]) -> list[Row]:
    """Rows per task (when there are several) and one ``all`` row."""
    rows = []
    if len(task_names) > 1:
        for i, name in enumerate(task_names):
            mask = tasks == i
            if mask.any():
                rows.append(_row(name, labels[mask], preds[mask]))
    rows.append(_row("all", labels, preds))
    return rows


def _row(name: str, labels: Tensor, preds: Tensor) -> Row:
    accuracy = float((labels == preds).float().mean()) if len(labels) else 0.0
    return Row(name, int(len(labels)), accuracy, macro_f1(labels, preds))


def evaluate(
    classifier: Classifier, data: Encoded, task_names: Sequence[str], batch_size: int, routed: bool
) -> list[Row]:
    return report(data.labels, predict(classifier, data, batch_size, routed), data.tasks, task_names)


def table(results: Mapping[str, Sequence[Row]]) -> str:
    """A plain-text table: one block of rows per model (e.g. trained, merged)."""
    lines = [f"{'model':<20} {'task':<14} {'n':>6} {'accuracy':>9} {'macro-F1':>9}"]
    for model, rows in results.items():
        for row in rows:
            lines.append(f"{model:<20} {row.task:<14} {row.n:>6} {row.accuracy:>9.4f} {row.macro_f1:>9.4f}")
    return "\n".join(lines)


def as_json(results: Mapping[str, Sequence[Row]]) -> dict[str, list[dict[str, Any]]]:
    return {model: [row.to_dict() for row in rows] for model, rows in results.items()}
