"""``adapt``: few-shot learning of a new task from a trained skill inventory.

Modes come from the ``adapt_mode`` registry (``adapterkit plugins``); the Poly/MHR plugin
provides ``poly``/``mhr`` (a new routing row; skills and row train), ``mhr-z`` (skills
frozen, only the row trains: the head is frozen too, so the per-task state is the row
alone) and ``mhr-mu``/``poly-mu`` (skills averaged into one plain LoRA, which trains). Each seed
draws its own balanced few-shot set (``k`` examples per class) and trains from the
same inventory; the table reports every seed and the mean.

With ``output``, each seed's adapted model is saved as
``<output>/<task>-<mode>-k<k>-seed<seed>.safetensors``; a mode with a compact per-task
state (``AdaptMode.compact_state``: ``mhr-z``'s routing rows) also writes it beside,
``...-seed<seed>.routing.safetensors``, which reproduces the adapted model when loaded onto
the inventory prepared with the same mode (the head is frozen in mhr-z, so the
inventory's own head serves).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from ..attach import adapt as adapt_model
from ..errors import AdapterkitError
from ..plugins import get_host
from ..storage import save_tensors
from .artifacts import Artifact, check_trusted, load_artifact, read_artifact, save_artifact
from .config import OptimConfig, TrainConfig
from .data import Corpus, check_task, few_shot
from .distributed import Dist
from .evaluation import METRICS, Row, evaluate
from .loop import Echo, Trainer
from .models import is_routed, resolve_objective
from .outputs import check_writable_prefix

DEFAULT_ROUTER_LR = 0.1
"""Router learning rate of ``adapt`` when neither the call nor the inventory names one (the
Poly/MHR reference code trains routing logits at 0.1)."""


@attrs.frozen
class AdaptRun:
    seed: int
    trainable: int
    rows: list[Row]
    url: str | None
    routing_url: str | None = None  # mhr-z: the routing-only per-task file
    routing_bytes: int | None = None


def adapt(
    url: str,
    task: str,
    mode: str,
    *,
    k: int = 8,
    seeds: Sequence[int] = (0,),
    steps: int = 50,
    lr: float = 5e-3,
    router_lr: float | None = None,
    batch_size: int = 32,
    init: str = "uniform",
    train_head: bool | None = None,
    output: str | None = None,
    progress: bool = True,
    echo: Echo = print,
    storage_options: Mapping[str, Any] | None = None,
    trust_file: bool = False,
) -> list[AdaptRun]:
    """Adapt the inventory at ``url`` to ``task`` with ``mode``, one run per seed.

    ``trust_file``: the inventory may name a ``module:factory`` backbone to import and
    call and data URLs or paths to read; without it such a file is refused before
    anything is imported or opened. ``output`` is checked writable before any work.
    ``router_lr`` (routing logits, no weight decay) defaults to the rate the inventory
    was trained with (its ``[optim] router_lr``), else :data:`DEFAULT_ROUTER_LR`."""
    mode_cls = get_host().adapt_modes[mode]
    takes_init = "init" in {f.name for f in attrs.fields(mode_cls.Config)}
    mode_args: dict[str, Any] = {"init": _row_init(init)} if takes_init else {}
    if not seeds:
        raise AdapterkitError("adapt needs at least one seed")
    if output:
        check_writable_prefix(output, f"{task}-{mode}-k{k}-seed{seeds[0]}.safetensors", "--output", storage_options)
    artifact, _ = read_artifact(url, storage_options=storage_options)
    if artifact.stage != "trained" or not artifact.tasks:
        raise AdapterkitError(
            f"{url!r} is not a trained multi-task inventory (stage {artifact.stage!r}, {len(artifact.tasks)} tasks)"
        )
    check_trusted(artifact.config, url, trust_file=trust_file, data=True)
    if router_lr is None:  # the reference trains routing logits at 0.1 whatever the adapters' rate
        router_lr = artifact.config.optim.router_lr or DEFAULT_ROUTER_LR
    # Reload the inventory's dataset with all its tasks: the new task is usually held out.
    args = {key: value for key, value in artifact.config.data.args.items() if key != "tasks"}
    # few-shot draws pick examples by class from the whole split: read into memory, not streamed
    data_config = attrs.evolve(artifact.config.data, args=args, train_per_task=0, stream=False)
    objective = resolve_objective(artifact.config.model)
    corpus = Corpus.load(
        data_config, artifact.config.train.seed, storage_options=storage_options, needs_classes=objective.needs_classes
    )
    check_task(task, corpus.tasks, f"dataset {data_config.dataset!r}")
    if task in artifact.tasks:
        echo(f"note: task {task!r} is in the trained inventory; adapting it anyway")
    test_examples = [e for e in corpus.test if e.task == task]
    train_head = mode_cls.train_head if train_head is None else train_head
    runs = []
    for seed in seeds:
        classifier, _ = load_artifact(url, storage_options=storage_options, trust_file=trust_file)
        prepared = adapt_model(classifier.body, mode, seed=seed, **mode_args)
        classifier.head.requires_grad_(train_head)
        trainable = sum(p.numel() for p in classifier.parameters() if p.requires_grad)
        shots = few_shot(corpus.train, task, k, seed, corpus.classes)
        data = objective.encode(classifier.backbone, shots, corpus.classes, [task])
        test = objective.encode(classifier.backbone, test_examples, corpus.classes, [task])
        trainer = Trainer(
            classifier,
            OptimConfig(lr=lr, router_lr=router_lr, warmup=0.0, schedule="constant"),
            TrainConfig(steps=steps, batch_size=min(batch_size, len(data)), seed=seed),
            Dist(),
            echo=echo,
            progress=progress,
            objective=objective,
        )
        trainer.setup(len(data))
        trainer.fit(data)
        rows = evaluate(
            classifier, test, [task], artifact.config.eval.batch_size, is_routed(classifier), objective,
            artifact.config.eval.decoding(),
        )
        target = routing = size = None
        if output:
            stem = f"{output.rstrip('/')}/{task}-{mode}-k{k}-seed{seed}"
            target = f"{stem}.safetensors"
            adapted = Artifact(
                attrs.evolve(artifact.config, data=data_config),
                artifact.classes,
                [task],
                "adapted",
                extra={"task": task, "mode": mode, "k": k, "seed": seed},
            )
            save_artifact(classifier, adapted, target, storage_options=storage_options)
            compact = prepared.compact_state(classifier.body)
            if compact is not None:
                routing = f"{stem}.routing.safetensors"
                meta = {"content": "per-task state", "mode": mode}
                size = save_tensors(compact, routing, metadata=meta, storage_options=storage_options).file_size
        echo(
            f"seed {seed}: {trainable:,} trainable parameters; {task} {rows[-1].describe()}"
            + (f"; saved {target}" if target else "")
        )
        if routing:
            note = "" if not train_head else " (the head trained too: it is only in the full file)"
            echo(f"seed {seed}: routing rows alone ({size:,} bytes) saved to {routing}{note}")
        runs.append(AdaptRun(seed, trainable, rows, target, routing, size))
    return runs


def summary(runs: Sequence[AdaptRun]) -> dict[str, float]:
    """The mean and standard deviation over seeds of each metric the runs report
    (``accuracy``, ``accuracy_std``, ``macro_f1``, ...)."""
    out: dict[str, float] = {}
    for name in METRICS:
        values = [v for r in runs if (v := getattr(r.rows[-1], name)) is not None]
        if values:
            out[name] = statistics.fmean(values)
            out[f"{name}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return out


def _row_init(value: str) -> str | int:
    """``--init``: a name, or a trained task id given as digits."""
    return int(value) if value.isdigit() else value
