"""``train``: one config in, a trained (and merged) adapter and an evaluation table out."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import torch

from ..attach import state_of
from ..errors import AdapterkitError
from ..objectives import Objective
from ..plugins import PluginHost
from ..wording import plural
from ..zoo import WorkflowModel
from .artifacts import Artifact, save_artifact
from .config import WorkflowConfig
from .data import Corpus
from .distributed import Dist, check_device, setup, teardown
from .evaluation import Row, evaluate
from .loop import Echo, TrainData, Trainer, epoch_evaluator, merge_changed, merged_copy
from .models import build_model, is_routed, recipe_for_tasks, resolve_backbone, resolve_objective
from .outputs import check_writable
from .stream import Encoder, TrainStream


@attrs.frozen
class TrainResult:
    classifier: WorkflowModel  # the objective's model: a Classifier, a language model, ...
    config: WorkflowConfig
    classes: list[str]
    tasks: list[str]
    steps: int
    results: dict[str, list[Row]]
    history: list[dict[str, Any]]
    stopped: bool = False


def prepare(
    config: WorkflowConfig, host: PluginHost | None = None, storage_options: Mapping[str, Any] | None = None
) -> tuple[WorkflowConfig, Corpus, WorkflowModel]:
    """Load the data and build the objective's model (recipe's router tasks filled from the data)."""
    objective = resolve_objective(config.model, host)
    corpus = Corpus.load(config.data, config.train.seed, host, storage_options, needs_classes=objective.needs_classes)
    # the router's task count against the data's before the backbone is built (a Poly
    # router declaring 3 tasks must not train silently on single-task data)
    recipe = recipe_for_tasks(config.recipe, len(corpus.tasks), host)
    config = attrs.evolve(config, recipe=recipe)
    backbone = resolve_backbone(config.model, host, seed=config.train.seed, storage_options=storage_options)
    if backbone.modality != corpus.dataset.modality:
        raise AdapterkitError(
            f"backbone {config.model.backbone!r} takes {backbone.modality} but dataset "
            f"{config.data.dataset!r} holds {corpus.dataset.modality}"
        )
    classifier = build_model(
        objective, backbone, recipe, corpus.classes, seed=config.train.seed, probe=corpus.probe(), host=host
    )
    return config, corpus, classifier


def train(
    config: WorkflowConfig,
    *,
    resume: str | bool = False,
    stop_at: int | None = None,
    progress: bool = True,
    echo: Echo = print,
    host: PluginHost | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> TrainResult:
    """Train ``config``; on torchrun (or inside an initialised process group) data-parallel.

    ``resume``: ``True`` continues from ``[checkpoint] url``, a string from that URL.
    ``stop_at``: stop after that global step, writing a checkpoint (a preemptible slice).
    ``storage_options``: fsspec options for the checkpoint and output URLs.
    """
    if stop_at is not None and config.checkpoint.url is None:
        raise AdapterkitError("--stop-at needs [checkpoint] url (or --checkpoint URL) to save the run")
    check_run(config, resume=resume, stop_at=stop_at, storage_options=storage_options)
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    dist = setup(config.train.device)
    try:
        return _train(config, dist, resume, stop_at, progress, echo, host, storage_options)
    finally:
        teardown(dist)


def check_run(
    config: WorkflowConfig,
    *,
    resume: str | bool = False,
    stop_at: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> None:
    """What can fail without doing the work, checked before it: the device, and every URL
    the run writes (outputs; the checkpoint when the run saves one)."""
    check_device(config.train.device)
    if resume is True and config.checkpoint.url is None:
        raise AdapterkitError("--resume needs [checkpoint] url in the config (or --checkpoint URL)")
    for what, url in (("output.adapter", config.output.adapter), ("output.merged", config.output.merged)):
        if url is not None:
            check_writable(url, what, storage_options)
    if config.checkpoint.url is not None and (config.checkpoint.every or stop_at is not None):
        check_writable(config.checkpoint.url, "checkpoint.url", storage_options)


def _train(
    config: WorkflowConfig,
    dist: Dist,
    resume: str | bool,
    stop_at: int | None,
    progress: bool,
    echo: Echo,
    host: PluginHost | None,
    storage_options: Mapping[str, Any] | None = None,
) -> TrainResult:
    config, corpus, classifier = prepare(config, host, storage_options)
    classifier.to(dist.device)
    objective: Objective = resolve_objective(config.model, host)
    backbone = classifier.backbone
    train_data: TrainData
    if corpus.stream is not None:
        encoder = Encoder(objective, backbone, corpus.classes, corpus.tasks)
        data = config.data
        train_data = TrainStream(corpus.stream, encoder, data.workers, data.shuffle_buffer, config.train.seed)
    else:
        train_data = objective.encode(backbone, corpus.train, corpus.classes, corpus.tasks)
    test_data = objective.encode(backbone, corpus.test, corpus.classes, corpus.tasks)
    decode = config.eval.decoding()
    history: list[dict[str, Any]] = []
    say = echo if dist.main else (lambda _: None)
    summary = state_of(classifier.body).summary
    say(
        f"{_model(config)} + {config.recipe.kind} ({_method(config)}): "
        f"{summary.trainable if summary else 0:,} adapter parameters"
        + (" + head" if any(True for _ in classifier.head.parameters()) else "")
        + f"; data {config.data.dataset}: {len(train_data)} train"
        + (f" (streamed, {plural(config.data.workers, 'worker')})" if corpus.stream is not None else "")
        + f" / {len(test_data)} test, "
        f"{plural(len(corpus.classes), 'class', 'classes') if corpus.classes else 'free-form targets'}"
        + (f", {plural(len(corpus.tasks), 'task')}" if corpus.tasks else "")
        + (f"; {dist.world} processes" if dist.world > 1 else "")
    )
    trainer = Trainer(
        classifier,
        config.optim,
        config.train,
        dist,
        echo=say,
        progress=progress,
        checkpoint=config.checkpoint,
        config_dict=config.to_dict(),
        storage_options=storage_options,
        on_epoch=epoch_evaluator(
            test_data, corpus.tasks, config.eval.batch_size, dist, say, history, config.output.merge, objective, decode
        )
        if config.eval.every_epoch
        else None,
        objective=objective,
    )
    trainer.setup(len(train_data), streamed=corpus.stream is not None)
    start = 0
    if resume:
        url = resume if isinstance(resume, str) else config.checkpoint.url
        if url is None:
            raise AdapterkitError("--resume needs [checkpoint] url in the config (or --checkpoint URL)")
        start = trainer.resume(url)
        say(f"resumed from {url} at step {start} of {trainer.total}")
    step = trainer.fit(train_data, start=start, stop_at=stop_at)
    results: dict[str, list[Row]] = {}
    stopped = step < trainer.total
    if stopped:
        say(f"stopped at step {step} of {trainer.total}; checkpoint at {config.checkpoint.url}")
    elif dist.main:
        artifact = Artifact(config, corpus.classes, corpus.tasks)
        if config.output.adapter:
            save_artifact(classifier, artifact, config.output.adapter, storage_options=storage_options)
            say(f"saved adapter to {config.output.adapter}")
        results["trained"] = evaluate(
            classifier, test_data, corpus.tasks, config.eval.batch_size, is_routed(classifier), objective, decode
        )
        merged, reason = merged_copy(classifier, config.output.merge)
        if reason is None:
            if merge_changed(merged, classifier):  # an identity merge is the trained model: evaluated once
                results[f"merged ({config.recipe.merger.name})"] = evaluate(
                    merged, test_data, corpus.tasks, config.eval.batch_size, is_routed(merged), objective, decode
                )
            if config.output.merged:
                merger = {"name": config.recipe.merger.name, "args": dict(config.recipe.merger.args)}
                save_artifact(
                    merged,
                    attrs.evolve(artifact, stage="merged", merger=merger),
                    config.output.merged,
                    storage_options=storage_options,
                )
                say(f"saved merged adapter to {config.output.merged}")
        elif config.output.merge:
            say(f"not merged: {reason}")
    dist.barrier()
    return TrainResult(classifier, config, corpus.classes, corpus.tasks, step, results, history, stopped)


def _model(config: WorkflowConfig) -> str:
    """The model in a status line: the backbone, or the model folder, and a non-default objective."""
    name = config.model.backbone
    if name == "hf":
        name = str(config.model.args.get("path", name))
    objective = config.model.objective_name
    return name if objective == "classification" else f"{name} ({objective})"


def _method(config: WorkflowConfig) -> str:
    r = config.recipe
    parts = [
        f"{role} {r.role(role).name}"
        for role in ("splitter", "sampler", "router", "merger")
        if r.role(role).name not in ("dense", "all", "none", "identity")
    ]
    return ", ".join(parts) or "dense"
