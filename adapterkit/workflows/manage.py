"""``merge`` and ``eval`` on saved artifacts; ``merge`` of several experts into one adapter."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from ..attach import merge
from ..errors import AdapterkitError
from ..storage import AdapterInfo
from .artifacts import Artifact, check_trusted, load_artifact, read_artifact, save_artifact
from .config import DataConfig, ModelConfig
from .data import Corpus, check_task
from .evaluation import Row, evaluate
from .models import is_routed, resolve_objective
from .outputs import check_writable


def merge_artifact(
    src: str,
    dst: str,
    merger: str | None = None,
    args: Mapping[str, Any] | None = None,
    *,
    storage_options: Mapping[str, Any] | None = None,
    trust_file: bool = False,
) -> Artifact:
    """Load ``src``, merge every site (default: the recipe's merger), save to ``dst``.

    ``trust_file``: ``src`` may name a ``module:factory`` backbone to import and call
    (see :func:`~.artifacts.load_artifact`)."""
    check_writable(dst, "the merge target", storage_options)
    classifier, artifact = load_artifact(src, storage_options=storage_options, trust_file=trust_file)
    if artifact.stage == "merged":
        raise AdapterkitError(f"{src!r} is already merged")
    name = merger or artifact.config.recipe.merger.name
    merge_args = dict(args or {}) if merger else {**artifact.config.recipe.merger.args, **(args or {})}
    if isinstance(merge_args.get("task"), str):  # a task by name (--arg task=apple): its index in the inventory
        check_task(merge_args["task"], artifact.tasks, f"{src!r}")
        merge_args["task"] = artifact.tasks.index(merge_args["task"])
    merge(classifier.body, name, **merge_args)
    extra = dict(artifact.extra)
    task = merge_args.get("task")
    if isinstance(task, int) and 0 <= task < len(artifact.tasks):  # a per-task collapse serves that task only
        extra["task"] = artifact.tasks[task]
    merged = attrs.evolve(artifact, stage="merged", merger={"name": name, "args": merge_args}, extra=extra)
    save_artifact(classifier, merged, dst, storage_options=storage_options)
    return merged


def evaluation_data(
    artifact: Artifact, split: str, tasks: Sequence[str] = (), *, trust_file: bool = False, url: str = "the file",
    storage_options: Mapping[str, Any] | None = None, data: str | None = None,
) -> tuple[Any, list[str]]:
    """The artifact's own data (its dataset and selection), or the JSONL/CSV file ``data``
    (yours: every record is evaluated, labels among the run's classes, tasks among its
    tasks), restricted to ``tasks``.

    A registered dataset loads as it is; data URLs and paths the file (``url``) names are
    opened only with ``trust_file``."""
    config = artifact.config
    if data is not None:
        data_config = DataConfig("files", {"train": data, "test": data, "classes": list(artifact.classes)})
        config = attrs.evolve(config, data=data_config)
    else:
        check_trusted(config, url, trust_file=trust_file, data=True)
    needs_classes = resolve_objective(config.model).needs_classes
    corpus = Corpus.load(config.data, config.train.seed, storage_options=storage_options, needs_classes=needs_classes)
    adapted = artifact.extra.get("task")
    inventory = [adapted] if adapted else list(artifact.tasks)
    for task in tasks:
        check_task(task, inventory, "the adapter's tasks")
    if adapted:  # an adapted model routes its one task as task 0
        examples = [e for e in corpus.split(split) if e.task == adapted]  # type: ignore[arg-type]
    else:
        if data is not None and artifact.tasks and not corpus.tasks:
            raise AdapterkitError(f"{data}: the adapter routes by task ({', '.join(artifact.tasks)}); "
                                  "give every record a 'task'")
        if data is not None and corpus.tasks and not set(corpus.tasks) <= set(artifact.tasks):
            unknown = sorted(set(corpus.tasks) - set(artifact.tasks))
            raise AdapterkitError(f"{data}: tasks {unknown} are not among the adapter's ({', '.join(artifact.tasks)})")
        if data is None and corpus.tasks != artifact.tasks:
            raise AdapterkitError(f"the data's tasks {corpus.tasks} differ from the adapter's {artifact.tasks}")
        examples = corpus.split(split)  # type: ignore[arg-type]
    if tasks:
        examples = [e for e in examples if e.task in set(tasks)]
    return examples, inventory


def evaluate_artifact(
    url: str,
    *,
    split: str = "test",
    tasks: Sequence[str] = (),
    batch_size: int = 128,
    storage_options: Mapping[str, Any] | None = None,
    trust_file: bool = False,
    data: str | None = None,
    num_beams: int | None = None,
) -> list[Row]:
    """The metrics of the run saved at ``url`` (what fits its objective: accuracy and
    macro-F1; perplexity and generation metrics, decoded as its ``[eval]`` config says) on
    its own data, or on the JSONL/CSV file at ``data`` (``eval --data URL``: the same
    columns as the ``files`` dataset). ``num_beams`` overrides the run's ``[eval] num_beams``.

    ``trust_file``: the file may name a ``module:factory`` backbone to import and call and
    data URLs or paths to read; without it such a file is refused before anything runs."""
    artifact, _ = read_artifact(url, storage_options=storage_options)
    check_trusted(artifact.config, url, trust_file=trust_file, data=data is None)  # before the model is built
    classifier, artifact = load_artifact(url, storage_options=storage_options, trust_file=trust_file)
    examples, inventory = evaluation_data(
        artifact, split, tasks, trust_file=trust_file, url=url, storage_options=storage_options, data=data
    )
    objective = resolve_objective(artifact.config.model)
    decode = artifact.config.eval.decoding()
    if num_beams is not None:
        decode = attrs.evolve(decode, num_beams=num_beams)
    encoded = objective.encode(classifier.backbone, examples, artifact.classes, inventory)
    rows = evaluate(classifier, encoded, inventory, batch_size, is_routed(classifier), objective, decode)
    if tasks and len(inventory) > 1:
        rows = [r for r in rows if r.task in set(tasks) or r.task == "all"]
    return rows


def merge_adapters(
    sources: Sequence[str],
    dst: str,
    merger: str,
    args: Mapping[str, Any] | None = None,
    *,
    model: ModelConfig | None = None,
    storage_options: Mapping[str, Any] | None = None,
    trust_file: bool = False,
) -> AdapterInfo:
    """Merge several compatible adapter files (experts) into one adapter file at ``dst``.

    The experts are stacked onto a fresh base model as the skills of one site per target
    (:func:`adapterkit.stack`), merged with ``merger`` (e.g. ``ties``, ``task-arithmetic``),
    and the result saved as a plain adapter file. ``model`` names the base model (the
    user's own choice); without it, the first source's workflow metadata may name a
    registered backbone, or a ``module:factory`` one with ``trust_file``. Workflow heads are
    not merged (the result is the body's adapter alone)."""
    from ..attach import merge as merge_model
    from ..stack import stack
    from ..storage import inspect, save
    from .models import resolve_backbone

    if len(sources) < 2:
        raise AdapterkitError(f"merging experts needs at least two adapter files, got {len(sources)}")
    check_writable(dst, "the merge target", storage_options)
    if model is None:
        first = inspect(sources[0], storage_options=storage_options)
        if "workflow" not in first.metadata:
            raise AdapterkitError(f"{sources[0]!r} does not say its base model: give it with --model NAME")
        artifact, _ = read_artifact(sources[0], storage_options=storage_options)
        check_trusted(artifact.config, sources[0], trust_file=trust_file, data=False)
        model = artifact.config.model
    body = resolve_backbone(model, storage_options=storage_options).build_for(resolve_objective(model).body)
    stack(list(sources), body, storage_options=storage_options)
    merge_model(body, merger, **dict(args or {}))
    return save(body, dst, storage_options=storage_options)
