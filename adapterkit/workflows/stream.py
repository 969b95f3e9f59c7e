"""Streamed training data (``[data] stream = true``): a ``torch.utils.data`` pipeline
reads the train split lazily and tokenizes it batch by batch, so memory does not grow
with the file.

The dataset gives a :class:`~adapterkit.zoo.RecordStream` (``files``: the raw lines of a
JSONL file, the rows of a CSV or Parquet file). One pass over it is an epoch:

- **order**: the raw records go through a seeded shuffle buffer (``[data]
  shuffle_buffer`` records, seed ``(train.seed, epoch)``; 0 keeps file order), then are
  cut into global batches of ``train.batch_size`` (a last partial batch is dropped, as
  in memory). Global batch ``j`` of epoch ``e`` is step ``e * per_epoch + j``.
- **sharding**: rank ``r`` of ``W`` parses and encodes only its slice of every global
  batch (examples ``r*B/W .. (r+1)*B/W``, the slice the in-memory path gives it), and
  DataLoader worker ``k`` of ``K`` only the steps ``k, k+K, ...`` of its rank. The
  DataLoader hands the workers' batches back round-robin, i.e. in step order. Every
  worker scans the raw records (cheap: no parsing) to find its own; what it parses,
  tokenizes and sends is disjoint from every other worker's and rank's.
- **resume**: the step (and the examples consumed, recorded in the checkpoint) fixes
  the epoch and the position in it; the stream replays that epoch's shuffled order and
  skips the consumed records unparsed, so a resumed run sees the batches an
  uninterrupted one would, bit for bit.

Tokenization (:meth:`~adapterkit.objectives.Objective.encode`) runs in the workers; a
batch is padded to its own longest example.
"""

from __future__ import annotations

import itertools
import os
import random
from collections.abc import Iterator, Sequence
from typing import Any

import attrs
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..errors import AdapterkitError
from ..objectives import Encoded, Objective
from ..zoo import Backbone, Example, RecordStream
from .distributed import derive_seed


class StreamError(AdapterkitError):
    """A streamed split changed under a run (fewer records than counted)."""


@attrs.frozen
class Plan:
    """Which batches a rank takes: the loop's batch plan (global ``batch``, ``per_epoch``
    steps, ``total`` steps) and the rank's place among ``world``."""

    batch: int
    per_epoch: int
    total: int
    rank: int = 0
    world: int = 1


def shuffled(records: Iterator[Any], size: int, seed: int) -> Iterator[Any]:
    """``records`` in a seeded buffer-shuffled order: each arriving record replaces a
    random one of ``size`` held, which leaves; the buffer is emptied in random order at
    the end. The same ``(records, size, seed)`` always give the same order."""
    if size <= 1:
        yield from records
        return
    rng = random.Random(seed)
    buffer: list[Any] = []
    for record in records:
        if len(buffer) < size:
            buffer.append(record)
            continue
        i = rng.randrange(size)
        yield buffer[i]
        buffer[i] = record
    rng.shuffle(buffer)
    yield from buffer


@attrs.frozen
class Encoder:
    """Examples to the objective's tensors (what a worker runs per batch)."""

    objective: Objective
    backbone: Backbone
    classes: Sequence[str]
    tasks: Sequence[str]

    def __call__(self, examples: Sequence[Example]) -> Encoded:
        return self.objective.encode(self.backbone, examples, self.classes, self.tasks)


class StepBatches(IterableDataset[tuple[int, Encoded]]):
    """``(step, this rank's encoded part of that step's batch)`` from ``start`` on, split
    across DataLoader workers by step (see the module docstring)."""

    def __init__(self, source: RecordStream, encoder: Encoder, plan: Plan, start: int, shuffle: int, seed: int) -> None:
        self.source, self.encoder, self.plan = source, encoder, plan
        self.start, self.shuffle, self.seed = start, shuffle, seed

    def global_batches(self) -> Iterator[tuple[int, list[tuple[int, Any]]]]:
        """``(step, raw records of the global batch)`` from ``start`` to the plan's total."""
        plan, step = self.plan, self.start
        epoch, position = divmod(step, plan.per_epoch)
        while step < plan.total:
            records = self.source.records()
            batches = _chunks(shuffled(records, self.shuffle, derive_seed(self.seed, "stream", epoch)), plan.batch)
            before = step
            try:  # (the consumed batches of this epoch: read, not parsed)
                for group in itertools.islice(batches, position, plan.per_epoch):
                    if step >= plan.total or len(group) < plan.batch:
                        break
                    yield step, group
                    step += 1
            finally:
                getattr(records, "close", lambda: None)()  # a generator over a file: closed now
            if step == before and step < plan.total:
                raise StreamError(f"the training stream ended at step {step}: it holds fewer records than it did")
            epoch, position = epoch + 1, 0

    def __iter__(self) -> Iterator[tuple[int, Encoded]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        share = self.plan.batch // self.plan.world
        for step, group in self.global_batches():
            if (step - self.start) % workers == worker:
                mine = group[self.plan.rank * share : (self.plan.rank + 1) * share]
                yield step, self.encoder([self.source.example(number, raw) for number, raw in mine])


def _chunks(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    while chunk := list(itertools.islice(items, size)):
        yield chunk


def _as_is(item: Any) -> Any:
    return item


@attrs.define
class TrainStream:
    """A streamed train split as the training loop takes it (``len``: the records;
    :meth:`batches`: each step's part for this rank, through ``workers`` processes)."""

    source: RecordStream
    encoder: Encoder
    workers: int = 1
    shuffle: int = 10_000
    seed: int = 0
    _count: int | None = None

    def __len__(self) -> int:
        if self._count is None:
            self._count = self.source.count()
        return self._count

    def batches(self, plan: Plan, start: int = 0, *, workers: int | None = None) -> Iterator[tuple[int, Encoded]]:
        workers = self.workers if workers is None else workers
        steps = StepBatches(self.source, self.encoder, plan, start, self.shuffle, self.seed)
        if workers == 0:
            yield from steps
            return
        # forked workers would find the tokenizer's thread pool used and warn; they tokenize one batch each anyway
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        loader = DataLoader(steps, batch_size=None, num_workers=workers, collate_fn=_as_is, prefetch_factor=2)
        iterator = iter(loader)
        try:
            yield from iterator
        finally:
            del iterator  # stops the worker processes when the loop stops early (--stop-at)

    def first(self, plan: Plan) -> Encoded:
        """This rank's part of step 0 (in this process): what the DDP probe runs."""
        return next(self.batches(plan, 0, workers=0))[1]


def position(step: int, plan: Plan) -> dict[str, int]:
    """Where a stream stands after ``step`` steps (a checkpoint records it): the epoch,
    the records consumed in it and in all."""
    epoch, batches = divmod(step, plan.per_epoch)
    return {"epoch": epoch, "epoch_examples": batches * plan.batch, "examples": step * plan.batch}
