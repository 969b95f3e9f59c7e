"""The training loop shared by ``train`` and ``adapt``.

A method is a recipe and a task is an objective: the loop knows neither by name. The
objective (:class:`~adapterkit.objectives.Objective`) gives the loss of a forward's
output. The loop builds AdamW with the router parameter groups
(:func:`adapterkit.optim.adamw`, exact for cell-sparse parameters), routes task ids
when the model has routed sites, reports training progress to samplers
(``Sampler.set_progress``), and adds the loss term the config names (``[train] loss``,
from the ``loss`` registry, e.g. MoSA's ``consistency``). Data order, sampler draws and
noise derive from ``(seed, step)``, so a resumed run is bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import Callable, Generator, Mapping
from typing import Any, TypeAlias

import attrs
import torch
from torch import Tensor, nn

from ..attach import folded_sites, merge, recipe_of, sites
from ..errors import AdapterkitError
from ..objectives import Classification, Decoding, Objective
from ..plugins import get_host
from ..progress import progress
from ..recipe import build_config
from ..roles import LossTerm
from ..task_ids import route
from ..training import freeze_norm_statistics, set_progress
from ..zoo import WorkflowModel
from .checkpoint import load_checkpoint, save_checkpoint
from .config import CheckpointConfig, OptimConfig, TrainConfig
from .data import Encoded, batch_plan
from .distributed import Dist, Streams, derive_seed
from .evaluation import evaluate
from .models import is_routed, shared_copy
from .stream import Plan, TrainStream, position

TrainData: TypeAlias = Encoded | TrainStream  # encoded in memory, or streamed

Echo = Callable[[str], None]


def lr_factor(step: int, total: int, warmup: float, schedule: str) -> float:
    """Linear warm-up (``warmup`` steps, or that fraction of ``total`` when < 1), then decay."""
    warm = int(warmup) if warmup >= 1 else int(round(warmup * total))
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 1.0


def make_optimizer(model: nn.Module, optim: OptimConfig) -> torch.optim.Optimizer:
    from ..optim import adamw

    if not any(p.requires_grad for p in model.parameters()):
        raise AdapterkitError("nothing to train: every parameter is frozen")
    return adamw(
        model, lr=optim.lr, weight_decay=optim.weight_decay, router_lr=optim.router_lr, eps=optim.eps,
        no_decay=optim.no_decay,
    )


def merged_copy(classifier: WorkflowModel, enabled: bool = True) -> tuple[WorkflowModel, str | None]:
    """A copy merged with the recipe's merger (the deployed model), or the copy unmerged
    and the reason when the recipe's merger cannot merge this model (or ``enabled`` is off)."""
    copy = shared_copy(classifier)
    if not enabled:
        return copy, "[output] merge = false"
    try:
        merge(copy.body)
    except AdapterkitError as exc:
        return shared_copy(classifier), str(exc)
    return copy, None


def merge_changed(merged: WorkflowModel, trained: WorkflowModel) -> bool:
    """Did the merge change the model (an ``identity`` merge leaves the same sites and recipe)?"""
    return recipe_of(merged.body) != recipe_of(trained.body) or bool(folded_sites(merged.body))


def make_loss_term(table: Mapping[str, Any] | None) -> LossTerm | None:
    """The loss term a ``[train] loss`` table names (``None``: the task loss alone)."""
    if table is None:
        return None
    args = {k: v for k, v in table.items() if k != "name"}
    name = table["name"]
    cls = get_host().losses[name]
    return cls(build_config(cls, args, f"loss term {name!r}"))  # type: ignore[no-any-return]


@attrs.define
class Trainer:
    """Runs optimizer steps over an encoded training set on one or many processes
    (``classifier``: the objective's wrapped model, whatever the objective)."""

    classifier: WorkflowModel
    optim: OptimConfig
    train: TrainConfig
    dist: Dist
    echo: Echo = print
    progress: bool = True
    checkpoint: CheckpointConfig = attrs.field(factory=CheckpointConfig)
    config_dict: dict[str, Any] = attrs.field(factory=dict)
    on_epoch: Callable[[int, WorkflowModel], None] | None = None
    storage_options: Mapping[str, Any] | None = None  # fsspec options of the checkpoint URL
    objective: Objective = attrs.field(factory=Classification)
    optimizer: torch.optim.Optimizer = attrs.field(init=False)
    scheduler: Any = attrs.field(init=False)
    total: int = attrs.field(init=False, default=0)
    batch: int = attrs.field(init=False, default=0)
    per_epoch: int = attrs.field(init=False, default=0)
    routed: bool = attrs.field(init=False, default=False)
    loss_term: LossTerm | None = attrs.field(init=False, default=None)
    streamed: bool = attrs.field(init=False, default=False)

    def setup(self, n_train: int, *, streamed: bool = False) -> tuple[int, int]:
        """``streamed``: the data is a :class:`~.stream.TrainStream` (checkpoints record its position)."""
        self.streamed = streamed
        self.batch, self.per_epoch = batch_plan(n_train, self.train.batch_size, self.dist.world)
        self.total = self.train.steps or self.train.epochs * self.per_epoch
        self.optimizer = make_optimizer(self.classifier, self.optim)
        factor = lambda step: lr_factor(step, self.total, self.optim.warmup, self.optim.schedule)  # noqa: E731
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)
        self.routed = is_routed(self.classifier)
        self.loss_term = make_loss_term(self.train.loss)
        return self.batch, self.per_epoch

    def resume(self, url: str) -> int:
        return load_checkpoint(
            url, self.classifier, self.optimizer, self.scheduler, config=self.config_dict,
            storage_options=self.storage_options, stream=self._stream_position if self.streamed else None,
        )

    def _stream_position(self, step: int) -> dict[str, int]:
        return position(step, self.plan)

    def save(self, step: int) -> None:
        if self.checkpoint.url is None:
            return
        if self.dist.main:
            save_checkpoint(
                self.checkpoint.url,
                self.classifier,
                self.optimizer,
                self.scheduler,
                step=step,
                world=self.dist.world,
                config=self.config_dict,
                storage_options=self.storage_options,
                stream=self._stream_position(step) if self.streamed else None,
            )
        self.dist.barrier()

    def _order(self, epoch: int, n: int) -> Tensor:
        generator = torch.Generator().manual_seed(derive_seed(self.train.seed, "order", epoch))
        return torch.randperm(n, generator=generator)

    @property
    def plan(self) -> Plan:
        return Plan(self.batch, self.per_epoch, self.total, self.dist.rank, self.dist.world)

    def _parts(self, data: TrainData, start: int, end: int) -> Generator[tuple[int, Encoded], None, None]:
        """``(step, this rank's part of the step's batch)`` for steps ``start .. end - 1``: indexed
        from the encoded tensors in the epoch's ``(seed, epoch)`` order, or drawn from the stream."""
        if isinstance(data, TrainStream):
            yield from data.batches(attrs.evolve(self.plan, total=end), start)
            return
        for step in range(start, end):
            epoch, position = divmod(step, self.per_epoch)
            index = self._order(epoch, len(data))[position * self.batch : (position + 1) * self.batch]
            yield step, data.take(index.view(self.dist.world, -1)[self.dist.rank])

    def _wrapped(self, data: TrainData) -> nn.Module:
        if self.dist.world == 1:
            return self.classifier
        import torch.distributed as torch_dist
        from torch.nn.parallel import DistributedDataParallel

        # find_unused_parameters walks the autograd graph at every step; without it DDP
        # fails when a trainable parameter gets no gradient. Which parameters a step
        # reaches does not depend on the batch here: skills are stacked and mixed by the
        # router, a sampler gates cells of one dense delta (values change, not which
        # parameters are in the graph); what leaves one out is structure, e.g. a target
        # the backbone's forward never calls. So one probe forward on this rank's first
        # batch decides, and any rank's unreached parameter turns it on for every rank.
        unreached = torch.tensor([float(bool(self._unreached(data)))], device=self.dist.device)
        torch_dist.all_reduce(unreached, op=torch_dist.ReduceOp.MAX)
        device_ids = [self.dist.device.index] if self.dist.device.type == "cuda" else None
        return DistributedDataParallel(
            self.classifier, device_ids=device_ids, find_unused_parameters=bool(unreached.item())
        )

    def _unreached(self, data: TrainData) -> list[str]:
        """Trainable parameters a training forward on this rank's first batch leaves out
        of the autograd graph (walked from the output to its leaves; no backward). The
        RNG and the buffers (MoSA's touched cells) are restored: the run is unchanged."""
        if isinstance(data, TrainStream):
            part = data.first(self.plan)
        else:
            part = data.take(self._order(0, len(data))[: self.batch].view(self.dist.world, -1)[self.dist.rank])
        device = self.dist.device
        saved = {name: b.clone() for name, b in self.classifier.named_buffers()}
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            self.classifier.train()
            freeze_norm_statistics(self.classifier)
            with route(self.classifier.body, part.tasks.to(device)) if self.routed else contextlib.nullcontext():
                out = self.classifier(**{k: v.to(device) for k, v in part.inputs.items()})
        with torch.no_grad():
            for name, b in self.classifier.named_buffers():
                if name in saved:
                    b.copy_(saved[name])
        reached: set[int] = set()
        seen: set[Any] = set()
        stack = [out.grad_fn]
        while stack:
            fn = stack.pop()
            if fn is None or fn in seen:
                continue
            seen.add(fn)
            if hasattr(fn, "variable"):  # AccumulateGrad: a leaf, i.e. a parameter
                reached.add(id(fn.variable))
            stack.extend(next_fn for next_fn, _ in fn.next_functions)
        return [n for n, p in self.classifier.named_parameters() if p.requires_grad and id(p) not in reached]

    def _loss(self, model: nn.Module, inputs: dict[str, Tensor], labels: Tensor) -> Tensor:
        def task_loss(outputs: Tensor) -> Tensor:
            return self.objective.loss(outputs, labels)

        if self.loss_term is None:
            return task_loss(model(**inputs))
        # DDP allows one forward per backward through its wrapper; a second pass goes
        # through the module itself and its gradient still reaches the same parameters.
        passes = itertools.chain([model], itertools.repeat(self.classifier))
        return self.loss_term(lambda: next(passes)(**inputs), task_loss)

    def _set_progress(self, step: int) -> None:
        set_progress(self.classifier.body, step / max(1, self.total))

    def fit(self, data: TrainData, *, start: int = 0, stop_at: int | None = None) -> int:
        """Train from step ``start`` to the end (or ``stop_at``); returns the last step."""
        device = self.dist.device
        model = self._wrapped(data)
        samplers = [s.sampler for s in sites(self.classifier.body).values()]
        bar = progress(self.total, initial=start, desc="train", unit="step", enabled=self.progress and self.dist.main)
        step = start
        parts = self._parts(data, start, self.total if stop_at is None else min(self.total, stop_at))
        with Streams(samplers, self.train.seed, self.dist.rank, device) as streams, contextlib.closing(parts):
            for drawn, part in parts:
                assert drawn == step, (drawn, step)  # the pipeline hands batches back in step order
                epoch = step // self.per_epoch
                inputs = {k: v.to(device) for k, v in part.inputs.items()}
                labels = part.labels.to(device)
                streams.begin_step(step)
                self._set_progress(step)
                self.classifier.train()
                freeze_norm_statistics(self.classifier)
                started = time.perf_counter()
                with route(self.classifier.body, part.tasks.to(device)) if self.routed else contextlib.nullcontext():
                    loss = self._loss(model, inputs, labels)
                    loss.backward()
                if self.optim.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(
                        [p for p in self.classifier.parameters() if p.requires_grad], self.optim.grad_clip
                    )
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                step += 1
                if step % self.train.log_every == 0 or step == self.total:
                    rate = self.batch / max(time.perf_counter() - started, 1e-9)
                    bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.4f}", ex_s=f"{rate:.1f}", refresh=False)
                bar.update(1)
                if self.checkpoint.every and step % self.checkpoint.every == 0:
                    self.save(step)
                if step % self.per_epoch == 0 and self.on_epoch is not None:
                    bar.clear()
                    self.on_epoch(step // self.per_epoch, self.classifier)
        bar.close()
        if stop_at is not None and step < self.total:
            self.save(step)
        return step


def epoch_evaluator(
    test: Encoded, tasks: list[str], batch_size: int, dist: Dist, echo: Echo, history: list[dict[str, Any]],
    merge: bool = True, objective: Objective | None = None, decoding: Decoding | None = None,
) -> Callable[[int, WorkflowModel], None]:
    """End-of-epoch evaluation on the main rank, with merged weights where the method merges
    (unless ``merge`` is off: ``[output] merge = false``)."""

    def on_epoch(epoch: int, classifier: WorkflowModel) -> None:
        if dist.main:
            evaluated, reason = merged_copy(classifier, merge)
            rows = evaluate(evaluated, test, tasks, batch_size, is_routed(evaluated), objective, decoding)
            what = "merged" if reason is None else "unmerged"
            echo(f"epoch {epoch}: test {rows[-1].describe()} ({what})")
            history.append({"epoch": epoch, "merged": reason is None, "rows": [r.to_dict() for r in rows]})
        dist.barrier()

    return on_epoch
