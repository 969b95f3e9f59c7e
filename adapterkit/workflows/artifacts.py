"""Run artifacts: a trained (or merged, or adapted) classifier as one adapter file.

An artifact is a real adapter file (:func:`adapterkit.save`): the body's adapter under
its site names with its recipe, so ``adapterkit inspect``/``ls`` show its kind and
method, ``adapterkit.load(url, backbone_model)`` puts the adapter on a fresh backbone
and ``adapterkit export`` converts it to PEFT when PEFT can express it. Beside the
adapter, as extra tensors: the new head (``head.weight``, ``head.bias``) and, for a
merge that folded sites into their base layers, those layers (``folded.<site>.<key>``).
The ``workflow`` metadata carries what rebuilds the model with no other input: the
workflow config (backbone, data, recipe as trained), the class and task names, the
stage (``trained``/``merged``/``adapted``) and, for merged files, the merger. A merged
file's adapter recipe describes what the merge left (e.g. one plain dense adapter per
site); loading it as a workflow repeats the merge on a fresh model, then the values.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import torch
from torch import Tensor

from ..attach import merge, sites, state_of
from ..errors import AdapterkitError
from ..recipe import Recipe, RoleSpec, build_config
from ..roles import SingleSkill
from ..site import AdapterSite
from ..storage import AdapterInfo, inspect, load_tensors, save
from ..zoo import Classifier
from . import config as cfg
from .models import build_classifier, load_trainable_state, resolve_backbone

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


def save_artifact(
    classifier: Classifier, artifact: Artifact, url: str, *, storage_options: Mapping[str, Any] | None = None
) -> AdapterInfo:
    """Write the classifier's adapter (or what a merge left), head and metadata to ``url``."""
    state = state_of(classifier.body)
    extra = {f"head.{k}": v for k, v in classifier.head.state_dict().items()}
    recipe = state.recipe
    if artifact.stage == "merged":
        extra.update(folded_state(classifier))
        recipe = deployed_recipe(classifier, (artifact.merger or {}).get("name"))
    else:
        artifact = artifact.with_recipe(recipe)  # adapt may have changed it
    saved, state.recipe = state.recipe, recipe
    try:
        return save(
            classifier.body,
            url,
            metadata=artifact.metadata(),
            extra_tensors={k: v.detach().contiguous() for k, v in extra.items()},
            storage_options=storage_options,
        )
    finally:
        state.recipe = saved


def attached_modules(classifier: Classifier) -> list[tuple[str, torch.nn.Module]]:
    """The module now at each attached site: still an ``AdapterSite``, or what a merger left."""
    summary = state_of(classifier.body).summary
    assert summary is not None
    return [(site.name, classifier.body.get_submodule(site.name)) for site in summary.sites]


def folded_state(classifier: Classifier) -> dict[str, Tensor]:
    """The state of every site a merger replaced by a plain module (a folded base layer)."""
    out: dict[str, Tensor] = {}
    for name, module in attached_modules(classifier):
        if not isinstance(module, AdapterSite):
            out.update({f"folded.{name}.{k}": v for k, v in module.state_dict().items()})
    return out


def deployed_recipe(classifier: Classifier, merger: str | None) -> Recipe:
    """The recipe of what a merge left: mergers deploy plain sites (dense splitter, every
    cell on: ``AdapterSite.dense_copy`` and the like), single-skill ones unrouted, with
    the kind's arguments the merger changed (a re-factorised rank). Sites folded into
    their base layers are no longer adapter sites; ``identity`` changes nothing."""
    state = state_of(classifier.body)
    recipe = state.recipe
    left = sites(classifier.body)
    if merger == "identity" or not left:
        return recipe
    site = next(iter(left.values()))
    kind_args = dict(recipe.kind_args)
    original = build_config(type(site), recipe.kind_args, f"adapter kind {recipe.kind!r}")
    for field in attrs.fields(type(site.config)):
        value = getattr(site.config, field.name)
        if value != getattr(original, field.name):
            kind_args[field.name] = value
    single = site.skills == 1 and isinstance(site.router, SingleSkill)
    all_sites = [s.name for s in state.summary.sites] if state.summary else []
    return attrs.evolve(
        recipe,
        targets=recipe.targets if set(left) == set(all_sites) else tuple(left),
        skills=site.skills,
        kind_args=kind_args,
        splitter=RoleSpec("dense"),
        sampler=RoleSpec("all"),
        router=RoleSpec("none") if single else recipe.router,
        merger=RoleSpec("identity"),
    )


def _split(tensors: Mapping[str, Tensor], extra: Sequence[str]) -> dict[str, Tensor]:
    """File names -> classifier names: adapter tensors under ``body.``, folded layers back in the body."""
    out = {}
    for name, value in tensors.items():
        if name.startswith("folded.") and name in extra:
            out["body." + name.removeprefix("folded.")] = value
        elif name in extra:
            out[name] = value
        else:
            out["body." + name] = value
    return out


def read_artifact(
    url: str, *, storage_options: Mapping[str, Any] | None = None
) -> tuple[Artifact, dict[str, Tensor]]:
    """The artifact's metadata and its tensors under classifier names (``body.``, ``head.``)."""
    info = inspect(url, storage_options=storage_options)
    artifact = Artifact.from_metadata(info.metadata, url)
    tensors = load_tensors(url, storage_options=storage_options)
    return artifact, _split(tensors, info.extra)


def load_artifact(
    url: str, *, device: str | torch.device = "cpu", storage_options: Mapping[str, Any] | None = None
) -> tuple[Classifier, Artifact]:
    """Rebuild the classifier an artifact describes, with its tensors, in eval mode."""
    artifact, tensors = read_artifact(url, storage_options=storage_options)
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


def merged_state(classifier: Classifier) -> dict[str, Tensor]:
    """The state of every merged site (whatever module the merger left) plus the head."""
    out: dict[str, Tensor] = {}
    for name, module in attached_modules(classifier):
        state = module.state_dict()
        if isinstance(module, AdapterSite):  # still a site: its frozen base is not ours to save
            state = {k: v for k, v in state.items() if not k.startswith("base.")}
        out.update({f"body.{name}.{k}": v for k, v in state.items()})
    out.update({f"head.{k}": v for k, v in classifier.head.state_dict().items()})
    return out


def site_names(classifier: Classifier) -> list[str]:
    return list(sites(classifier.body))
