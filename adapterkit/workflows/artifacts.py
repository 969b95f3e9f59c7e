"""Run artifacts: a trained (or merged, or adapted) classifier as one adapter file.

An artifact is a real adapter file (:func:`adapterkit.save`): the body's adapter state
as the model holds it (the recipe of its sites after any merge or adaptation, folded
sites' factors, the step history), so ``adapterkit inspect``/``ls`` show its kind and
method, ``adapterkit.load(url, backbone_model)`` reproduces the body on a fresh backbone
and ``adapterkit export`` converts it to PEFT when PEFT can express it. Beside the
adapter, as extra tensors: the new head (``head.weight``, ``head.bias``). The
``workflow`` metadata carries the workflow config (backbone, data, recipe as trained;
never storage options or credentials), the class and task names, the stage
(``trained``/``merged``/``adapted``) and, for merged files, the merger.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import attrs
import torch

from ..errors import AdapterkitError
from ..storage import AdapterInfo, inspect, load, load_tensors, save
from ..zoo import Classifier
from . import config as cfg
from .models import build_classifier, resolve_backbone

KEY = "workflow"


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
            body = json.loads(metadata[KEY])
            config = cfg.from_dict(body["config"])
            return cls(
                config,
                list(body["classes"]),
                list(body["tasks"]),
                body["stage"],
                body.get("merger"),
                body.get("extra") or {},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise AdapterkitError(f"{url!r}: corrupt workflow metadata ({exc})") from None


def save_artifact(
    classifier: Classifier, artifact: Artifact, url: str, *, storage_options: Mapping[str, Any] | None = None
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
    url: str, *, device: str | torch.device = "cpu", storage_options: Mapping[str, Any] | None = None
) -> tuple[Classifier, Artifact]:
    """Rebuild the classifier an artifact describes, with its tensors, in eval mode: a fresh
    backbone, ``adapterkit.load`` of the file onto it, then the head."""
    artifact, info = read_artifact(url, storage_options=storage_options)
    config = artifact.config
    backbone = resolve_backbone(config.model)
    probe = None
    if ":" in config.model.backbone:  # a user module: measure its feature size on one example
        from .data import Corpus

        probe = Corpus.load(config.data, config.train.seed).train[0]
    classifier = build_classifier(backbone, None, len(artifact.classes), seed=config.train.seed, probe=probe)
    load(url, classifier.body, storage_options=storage_options)
    head = load_tensors(url, [name for name in info.extra if name.startswith("head.")], storage_options=storage_options)
    try:
        classifier.head.load_state_dict({k.removeprefix("head."): v for k, v in head.items()})
    except RuntimeError as exc:
        reason = str(exc).splitlines()[0]
        raise AdapterkitError(f"{url!r}: the head does not fit the rebuilt model ({reason})") from None
    return classifier.to(device).eval(), artifact
