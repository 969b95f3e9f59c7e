"""Run artifacts: a trained (or merged, or adapted) classifier as one safetensors file.

An artifact holds the adapter tensors of the body (``body.<site>.<tensor>``) and the
new head (``head.weight``, ``head.bias``), written with
:func:`adapterkit.storage.save_tensors` (atomic, digests verified on load, any fsspec
URL). Its metadata carries what rebuilds the model with no other input: the workflow
config (backbone, data, recipe), the class and task names, the stage
(``trained``/``merged``/``adapted``) and, for merged files, the merger. A merged file
stores each merged site as the merger left it (a dense adapter, or a base layer with
the adapter folded in); loading repeats the merge on a fresh model, then the values.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import attrs
import torch
from torch import Tensor

from ..attach import merge, sites, state_of
from ..errors import AdapterkitError
from ..recipe import Recipe
from ..site import AdapterSite
from ..storage import load_tensors, save_tensors
from ..zoo import Classifier
from . import config as cfg
from .models import build_classifier, load_trainable_state, resolve_backbone, trainable_state

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

    def with_recipe(self, recipe: Recipe) -> Artifact:
        return attrs.evolve(self, config=attrs.evolve(self.config, recipe=recipe))


def save_artifact(classifier: Classifier, artifact: Artifact, url: str, **storage: Any) -> None:
    """Write the classifier's trained tensors (or merged modules) and metadata to ``url``."""
    if artifact.stage == "merged":
        tensors = merged_state(classifier)
    else:
        artifact = artifact.with_recipe(state_of(classifier.body).recipe)  # adapt may have changed it
        tensors = trainable_state(classifier)
    save_tensors(
        {k: v.detach().contiguous() for k, v in tensors.items()},
        url,
        metadata=artifact.metadata(),
        storage_options=storage or None,
    )


def merged_state(classifier: Classifier) -> dict[str, Tensor]:
    """The state of every merged site (whatever module the merger left) plus the head."""
    summary = state_of(classifier.body).summary
    assert summary is not None
    out: dict[str, Tensor] = {}
    for site in summary.sites:
        module = classifier.body.get_submodule(site.name)
        state = module.state_dict()
        if isinstance(module, AdapterSite):  # still a site: its frozen base is not ours to save
            state = {k: v for k, v in state.items() if not k.startswith("base.")}
        out.update({f"body.{site.name}.{k}": v for k, v in state.items()})
    out.update({f"head.{k}": v for k, v in classifier.head.state_dict().items()})
    return out


def read_artifact(url: str, **storage: Any) -> tuple[Artifact, dict[str, Tensor]]:
    from ..storage import inspect

    info = inspect(url, storage_options=storage or None)
    artifact = Artifact.from_metadata(info.metadata, url)
    return artifact, load_tensors(url, storage_options=storage or None)


def load_artifact(url: str, *, device: str | torch.device = "cpu", **storage: Any) -> tuple[Classifier, Artifact]:
    """Rebuild the classifier an artifact describes, with its tensors, in eval mode."""
    artifact, tensors = read_artifact(url, **storage)
    config = artifact.config
    backbone = resolve_backbone(config.model)
    probe = None
    if ":" in config.model.backbone:  # a user module: measure its feature size on one example
        from .data import Corpus

        probe = Corpus.load(config.data, config.train.seed).train[0]
    classifier = build_classifier(backbone, config.recipe, len(artifact.classes), seed=config.train.seed, probe=probe)
    if artifact.stage == "merged":
        merger = artifact.merger or {}
        merge(classifier.body, merger.get("name"), **merger.get("args", {}))
        own = merged_state(classifier)
        if set(own) != set(tensors):
            raise AdapterkitError(f"{url!r}: merged tensors do not fit the rebuilt model")
        with torch.no_grad():
            for name, value in tensors.items():
                own[name].copy_(value)
    else:
        load_trainable_state(classifier, tensors)
    return classifier.to(device).eval(), artifact


def site_names(classifier: Classifier) -> list[str]:
    return list(sites(classifier.body))
