"""Data for the workflows: resolve a dataset, check it, subsample it, encode it once.

Examples are encoded once by the objective (:meth:`adapterkit.objectives.Objective.encode`:
the backbone's tokenised text or resized images, token labels for language models) into
tensors batched on dim 0 (:class:`~adapterkit.objectives.Encoded`), so a training step
only indexes them. With ``[data] stream = true`` the train split is instead a
:class:`~adapterkit.zoo.RecordStream` that :mod:`.stream` reads and encodes batch by batch;
the test split stays in memory.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import numpy as np

from ..errors import AdapterkitError
from ..objectives import Classification, Encoded
from ..plugins import PluginHost, get_host
from ..recipe import build_config
from ..zoo import Backbone, Dataset, Example, RecordStream, Split
from .config import DataConfig


class DataError(AdapterkitError):
    """The data cannot be used: empty, labels outside the classes, unknown task, ..."""


def resolve_dataset(
    config: DataConfig, host: PluginHost | None = None, storage_options: Mapping[str, Any] | None = None
) -> Dataset:
    """The dataset a config names. ``storage_options`` (the CLI's ``-o``) reach a dataset that
    reads URLs (its config has a ``storage_options`` field) unless the config sets its own."""
    host = host or get_host()
    cls = host.datasets[config.dataset]
    args = dict(config.args)
    if storage_options and "storage_options" not in args and "storage_options" in config_fields(cls):
        args["storage_options"] = dict(storage_options)
    return cls(build_config(cls, args, f"dataset {config.dataset!r}"))


def config_fields(cls: type) -> set[str]:
    """The field names of a plugin class's attrs ``Config`` (none without one)."""
    config = getattr(cls, "Config", None)
    return {f.name for f in attrs.fields(config)} if config is not None and attrs.has(config) else set()


def check_examples(examples: Sequence[Example], classes: Sequence[str], tasks: Sequence[str], what: str) -> None:
    """One-line errors for an empty split, labels outside the classes (when the data has
    classes: free-form text-to-text targets have none), unknown tasks."""
    if not examples:
        raise DataError(f"the {what} split is empty")
    known, task_set = set(classes), set(tasks)
    for number, example in enumerate(examples, 1):
        if known and example.label not in known:
            raise DataError(
                f"{what} example {number}: label {example.label!r} is not one of the classes ({', '.join(classes)})"
            )
        if tasks and example.task not in task_set:
            raise DataError(
                f"{what} example {number}: task {example.task!r} is not one of the tasks ({', '.join(tasks)})"
            )


def check_task(task: str, tasks: Sequence[str], what: str = "the data") -> None:
    if task not in tasks:
        listed = ", ".join(tasks) if tasks else "none: single-task data"
        raise DataError(f"task {task!r} is not in {what}; tasks: {listed}")


def subsample(examples: Sequence[Example], per_task: int, *, balanced: bool, seed: int) -> list[Example]:
    """At most ``per_task`` examples of every task (seeded). ``balanced`` draws the classes
    round-robin, so minority classes are kept whole before majority ones are cut."""
    if per_task <= 0:
        return list(examples)
    rng = np.random.default_rng(seed)
    by_task: dict[str | None, list[int]] = defaultdict(list)
    for i, example in enumerate(examples):
        by_task[example.task].append(i)
    chosen: list[int] = []
    for task in sorted(by_task, key=repr):
        members = by_task[task]
        if not balanced:
            picked = [members[j] for j in rng.permutation(len(members))[:per_task]]
        else:
            picked = _round_robin(examples, members, per_task, rng)
        chosen += picked
    return [examples[i] for i in sorted(chosen)]


def _round_robin(examples: Sequence[Example], members: list[int], n: int, rng: np.random.Generator) -> list[int]:
    by_class: dict[str, list[int]] = defaultdict(list)
    for i in members:
        by_class[examples[i].label].append(i)
    queues = [[by_class[c][j] for j in rng.permutation(len(by_class[c]))] for c in sorted(by_class)]
    picked: list[int] = []
    depth = 0
    while len(picked) < n and any(depth < len(q) for q in queues):
        picked += [q[depth] for q in queues if depth < len(q)][: n - len(picked)]
        depth += 1
    return picked


def few_shot(examples: Sequence[Example], task: str | None, k: int, seed: int, classes: Sequence[str]) -> list[Example]:
    """A balanced few-shot set: exactly ``k`` examples of every class of ``task`` (seeded);
    ``k`` examples of the task when the data has no classes (free-form targets)."""
    pool: dict[str, list[int]] = defaultdict(list)
    for i, example in enumerate(examples):
        if example.task == task:
            pool[example.label if classes else ""].append(i)
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for label in classes or [""]:
        members = pool.get(label, [])
        if len(members) < k:
            where = f"task {task!r}" if task is not None else "the data"
            of = f" of class {label!r}" if classes else ""
            raise DataError(f"{where} has {len(members)} training examples{of}; k = {k} needs {k}")
        chosen += [members[j] for j in rng.permutation(len(members))[:k]]
    return [examples[i] for i in chosen]


def encode(
    backbone: Backbone, examples: Sequence[Example], classes: Sequence[str], tasks: Sequence[str], *, chunk: int = 1024
) -> Encoded:
    """Encode examples for classification (the backbone's preprocessing; labels and tasks
    become indices); other objectives encode with :meth:`~adapterkit.objectives.Objective.encode`."""
    return Classification().encode(backbone, examples, classes, tasks, chunk=chunk)


@attrs.define
class Corpus:
    """A dataset resolved for one run: classes, tasks and the (subsampled) splits."""

    dataset: Dataset
    classes: list[str]
    tasks: list[str]
    train: list[Example]  # empty when streamed
    test: list[Example]
    stream: RecordStream | None = None  # the train split, streamed (``[data] stream = true``)

    @classmethod
    def load(
        cls, config: DataConfig, seed: int, host: PluginHost | None = None,
        storage_options: Mapping[str, Any] | None = None, *, needs_classes: bool = True,
    ) -> Corpus:
        """``needs_classes``: refuse data that declares none (classification; generative
        objectives also take free-form targets)."""
        dataset = resolve_dataset(config, host, storage_options)
        stream = open_stream(dataset, config.dataset) if config.stream else None
        classes, tasks = dataset.classes(), dataset.tasks()
        if not classes and needs_classes:
            raise DataError(f"dataset {config.dataset!r} declares no classes")
        splits: dict[str, list[Example]] = {"train": []}
        for split, per_task in (("train", config.train_per_task), ("test", config.test_per_task)):
            if split == "train" and stream is not None:
                continue  # the dataset checked every record when it opened the stream
            examples = dataset.examples(split)  # type: ignore[arg-type]
            check_examples(examples, classes, tasks, split)
            splits[split] = subsample(examples, per_task, balanced=config.balanced, seed=seed)
        return cls(dataset, classes, tasks, splits["train"], splits["test"], stream)

    def split(self, name: Split) -> list[Example]:
        if name == "train" and self.stream is not None:
            raise DataError(
                "the train split is streamed ([data] stream = true), not held in memory; use the test split"
            )
        return self.train if name == "train" else self.test

    def probe(self) -> Example:
        """One training example (the first): what a model's feature size is measured on."""
        if self.stream is None:
            return self.train[0]
        records = self.stream.records()
        try:
            return self.stream.example(*next(records))
        finally:
            getattr(records, "close", lambda: None)()  # a generator: close its file now


def open_stream(dataset: Dataset, name: str) -> RecordStream:
    """The dataset's train split as a :class:`~adapterkit.zoo.RecordStream`."""
    stream = getattr(dataset, "stream", None)
    if stream is None:
        raise DataError(
            f"dataset {name!r} cannot stream ([data] stream = true): stream your own files "
            "([data] train = URL, test = URL) or drop data.stream"
        )
    return stream("train")  # type: ignore[no-any-return]


def batch_plan(n: int, batch_size: int, world: int) -> tuple[int, int]:
    """``(global batch, steps per epoch)``: the last partial batch is dropped so every
    step sees a full batch that splits evenly across ranks."""
    batch = min(batch_size, n)
    if batch % world:
        raise DataError(f"batch size {batch} does not split evenly across {world} processes")
    return batch, max(1, n // batch) if batch else 0
