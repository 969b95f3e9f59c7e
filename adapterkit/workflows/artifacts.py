"""Run artifacts: a trained (or merged, or adapted) model as one adapter file.

An artifact is a real adapter file (:func:`adapterkit.save`): the body's adapter state
as the model holds it (the recipe of its sites after any merge or adaptation, folded
sites' factors, the step history), so ``adapterkit inspect``/``ls`` show its kind and
method, ``adapterkit.load(url, backbone_model)`` reproduces the body on a fresh backbone
and ``adapterkit export`` converts it to PEFT when PEFT can express it. Beside the
adapter, as extra tensors: the new head (``head.weight``, ``head.bias``). The
``workflow`` metadata carries the workflow config (backbone, data, recipe as trained;
never storage options or credentials), the class and task names, the stage
(``trained``/``merged``/``adapted``) and, for merged files, the merger.

A file is untrusted input (DESIGN.md §4): rebuilding the run it describes never imports
the ``module:factory`` backbone it names, nor opens a data (or model argument) URL or
path it names, unless the caller trusts the file (``trust_file=True``, ``--trust-file``
on the command line); registered backbones and datasets (installed plugins) need no
trust. Reading the metadata itself (:func:`read_artifact`) imports and opens nothing.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import torch

from ..errors import AdapterkitError
from ..storage import AdapterInfo, inspect, load, load_tensors, save
from ..storage.errors import printable
from ..storage.format import MAX_JSON_DEPTH, loads_bounded
from ..zoo import WorkflowModel
from . import config as cfg
from .models import build_model, resolve_backbone, resolve_objective

KEY = "workflow"
STAGES = ("trained", "merged", "adapted")
TRUST_HINT = "rerun with --trust-file if you trust this file (Python: trust_file=True)"


class UntrustedFileError(AdapterkitError):
    """A file names code to import or a URL/path to open, and the caller did not trust it."""


def quoted(text: str, limit: int = 200) -> str:
    """A string from a file, quoted on one printable line (cut at ``limit`` characters)."""
    return repr(printable(text, limit))


def _looks_like_location(value: str) -> bool:
    """Could this string be a URL or a path (``s3://b/k``, ``simplecache::...``,
    ``data/train.jsonl``, ``train.jsonl``, ``~/x``, ``C:\\x``)? Registered names
    (``digits``, task names) carry no ``:``, ``/``, ``\\`` or ``.``."""
    return any(ch in value for ch in ":/\\.") or value.startswith("~")


def _locations(value: Any) -> list[str]:
    """The strings in a config table (nested tables and lists too) that may be URLs or paths."""
    if isinstance(value, str):
        return [value] if _looks_like_location(value) else []
    if isinstance(value, Mapping):
        return [loc for item in value.values() for loc in _locations(item)]
    if isinstance(value, (list, tuple)):
        return [loc for item in value for loc in _locations(item)]
    return []


def file_named(config: cfg.WorkflowConfig, *, data: bool) -> list[str]:
    """What rebuilding ``config`` (from a file) would import or open that the file names:
    a ``module:factory`` backbone, URL-like model arguments and, with ``data``, the data's
    URLs and paths. Registered backbone and dataset names are not listed."""
    named = []
    if ":" in config.model.backbone:
        named.append(f"the model factory {quoted(config.model.backbone)} (code to import and call)")
    args = dict(config.model.args)
    if isinstance(args.get("path"), str):  # a Hugging Face model folder ([model] path)
        named.append(f"the model folder {quoted(args.pop('path'))} (a URL or path to open)")
    named += [f"the model argument {quoted(loc)} (a URL or path to open)" for loc in _locations(args)]
    if data:
        named += [f"the data {quoted(loc)} (a URL or path to open)" for loc in _locations(config.data.args)]
    return named


def check_trusted(config: cfg.WorkflowConfig, url: str, *, trust_file: bool, data: bool) -> None:
    """Refuse, before anything is imported or opened, to rebuild what an untrusted file names."""
    if trust_file:
        return
    named = file_named(config, data=data)
    if named:
        more = f" and {len(named) - 3} more" if len(named) > 3 else ""
        raise UntrustedFileError(
            f"{quoted(url)} names {'; '.join(named[:3])}{more}; adapterkit imports, calls and opens "
            f"nothing a file names unless you trust it: {TRUST_HINT}"
        )


def _strings(value: Any, what: str) -> list[str]:
    if not isinstance(value, Sequence) or isinstance(value, str) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{what} must be a list of strings")
    return list(value)


@attrs.frozen
class Artifact:
    """What an artifact's metadata says; :meth:`build` rebuilds the classifier."""

    config: cfg.WorkflowConfig
    classes: list[str]
    tasks: list[str]
    stage: str = "trained"
    merger: Mapping[str, Any] | None = None  # {"name": ..., "args": {...}} for merged files
    extra: Mapping[str, Any] = attrs.field(factory=dict)  # e.g. the adapted task

    def metadata(self) -> dict[str, str]:
        body = {
            "config": self.config.to_dict(),
            "classes": self.classes,
            "tasks": self.tasks,
            "stage": self.stage,
            "merger": self.merger,
            "extra": dict(self.extra),
        }
        return {KEY: json.dumps(body, sort_keys=True)}

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str], url: str) -> Artifact:
        if KEY not in metadata:
            raise AdapterkitError(
                f"{url!r} is not a workflow artifact (no {KEY!r} metadata); "
                "adapters saved with adapterkit.save load with adapterkit.load"
            )
        try:
            body = loads_bounded(metadata[KEY], MAX_JSON_DEPTH)
            if not isinstance(body, Mapping):
                raise ValueError(f"expected a JSON object, got {type(body).__name__}")
            # an artifact's recipe is inline: a recipe.file URL in a file is never opened
            config = cfg.from_dict(body["config"], recipe_files=False)
            stage, merger, extra = body["stage"], body.get("merger"), body.get("extra") or {}
            if stage not in STAGES:
                raise ValueError(f"stage must be one of {', '.join(STAGES)}")
            if merger is not None and not (isinstance(merger, Mapping) and isinstance(merger.get("name"), str)):
                raise ValueError("merger must be a table with a name")
            if not isinstance(extra, Mapping):
                raise ValueError("extra must be a table")
            return cls(config, _strings(body["classes"], "classes"), _strings(body["tasks"], "tasks"),
                       stage, merger, extra)
        except (KeyError, TypeError, ValueError, AdapterkitError) as exc:
            reason = f"no {exc}" if isinstance(exc, KeyError) else str(exc)
            raise AdapterkitError(f"{quoted(url)}: corrupt workflow metadata ({printable(reason, 300)})") from None


def save_artifact(
    classifier: WorkflowModel, artifact: Artifact, url: str, *, storage_options: Mapping[str, Any] | None = None
) -> AdapterInfo:
    """Write the classifier's adapter state, head and metadata to ``url``."""
    head = {f"head.{k}": v.detach().contiguous() for k, v in classifier.head.state_dict().items()}
    return save(classifier.body, url, metadata=artifact.metadata(), extra_tensors=head,
                storage_options=storage_options)


def read_artifact(url: str, *, storage_options: Mapping[str, Any] | None = None) -> tuple[Artifact, AdapterInfo]:
    """The artifact's metadata and the file's header (no tensor is read)."""
    info = inspect(url, storage_options=storage_options)
    return Artifact.from_metadata(info.metadata, url), info


def load_artifact(
    url: str,
    *,
    device: str | torch.device = "cpu",
    storage_options: Mapping[str, Any] | None = None,
    trust_file: bool = False,
) -> tuple[WorkflowModel, Artifact]:
    """Rebuild the model an artifact describes, with its tensors, in eval mode: a fresh
    backbone built for the run's objective, ``adapterkit.load`` of the file onto it, then
    the head.

    ``trust_file``: the file may name a ``module:factory`` backbone to import and call (and
    the data to measure its feature size on), or a model folder (``[model] path``) to
    open; without it such a file is refused (:class:`UntrustedFileError`) before anything
    is imported or opened."""
    from .distributed import check_device

    check_device(str(device), what="device")
    artifact, info = read_artifact(url, storage_options=storage_options)
    config = artifact.config
    check_trusted(config, url, trust_file=trust_file, data=False)
    objective = resolve_objective(config.model)
    backbone = resolve_backbone(config.model, seed=config.train.seed, storage_options=storage_options)
    probe = None
    if ":" in config.model.backbone:  # a user module: measure its feature size on one example
        from .data import Corpus

        probe = Corpus.load(
            config.data, config.train.seed, storage_options=storage_options, needs_classes=objective.needs_classes
        ).probe()
    classifier = build_model(objective, backbone, None, artifact.classes, seed=config.train.seed, probe=probe)
    load(url, classifier.body, storage_options=storage_options)
    head = load_tensors(url, [name for name in info.extra if name.startswith("head.")], storage_options=storage_options)
    try:
        classifier.head.load_state_dict({k.removeprefix("head."): v for k, v in head.items()})
    except RuntimeError as exc:
        reason = str(exc).splitlines()[0]
        raise AdapterkitError(f"{url!r}: the head does not fit the rebuilt model ({reason})") from None
    return classifier.to(device).eval(), artifact
