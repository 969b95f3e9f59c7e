"""Models for the workflows: resolve a backbone and an objective, build the body the
objective needs, attach a recipe, wrap it (e.g. a new head).

A backbone is a registered name (``minilm``; ``hf`` with ``[model] path``: a Hugging Face
model folder) or an import path ``package.module:factory`` to your own: the factory gets
the ``[model]`` arguments and returns a :class:`~adapterkit.zoo.Backbone`, or an
``nn.Module`` mapping images ``[b, C, H, W]`` (values in [0, 1], native size) to feature
vectors ``[b, d]``. The objective (``[model] objective``, default ``classification``)
comes from the ``objective`` registry.
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import numpy as np
import torch
from torch import Tensor, nn

from ..attach import attach, sites
from ..errors import AdapterkitError
from ..objectives import Classification, Objective
from ..plugins import PluginHost, get_host
from ..recipe import Recipe, RoleSpec, build_config
from ..zoo import Backbone, Classifier, Example, WorkflowModel
from .config import ConfigError, ModelConfig
from .data import config_fields


class ModuleBackbone(Backbone):
    """Wraps a user ``nn.Module`` taking raw image tensors ``[b, C, H, W]`` in [0, 1]."""

    modality = "image"

    def __init__(self, module: nn.Module) -> None:
        super().__init__(None)
        self.module = module

    def build(self) -> nn.Module:
        return self.module

    def encode(self, examples: Sequence[Example]) -> dict[str, Tensor]:
        arrays = []
        for example in examples:
            if example.image is None:
                raise AdapterkitError("an example has no image; this model takes images")
            image = np.asarray(example.image, dtype=np.float32)
            arrays.append(image[None] if image.ndim == 2 else np.moveaxis(image, -1, 0))
        return {"pixel_values": torch.from_numpy(np.stack(arrays))}

    def features(self, body: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
        return body(inputs["pixel_values"]).flatten(1)  # type: ignore[no-any-return]

    def feature_dim(self, body: nn.Module) -> int:
        raise NotImplementedError  # measured on the first real example, see build_classifier


def resolve_objective(config: ModelConfig, host: PluginHost | None = None) -> Objective:
    """The objective ``[model] objective`` names, with its arguments."""
    host = host or get_host()
    cls = host.objectives[config.objective_name]
    return cls(build_config(cls, config.objective_args, f"objective {config.objective_name!r}"))  # type: ignore[no-any-return]


def resolve_backbone(
    config: ModelConfig, host: PluginHost | None = None, *, seed: int = 0,
    storage_options: Mapping[str, Any] | None = None,
) -> Backbone:
    """A registered backbone by name, or a user factory by ``module:attribute``.

    ``storage_options`` (the CLI's ``-o``) reach a registered backbone that reads URLs
    (its config has a ``storage_options`` field: ``hf``) unless the config sets its own.
    A factory runs under ``torch.manual_seed(seed)`` (the run's seed; the global RNG is
    restored after): a model it initialises randomly is the same model in every process,
    so an adapter trained on it loads onto the same weights in ``eval``/``merge``/``adapt``.
    """
    if ":" not in config.backbone:
        host = host or get_host()
        cls = host.backbones[config.backbone]
        args = dict(config.args)
        if storage_options and "storage_options" not in args and "storage_options" in config_fields(cls):
            args["storage_options"] = dict(storage_options)
        return cls(build_config(cls, args, f"backbone {config.backbone!r}"))
    module_name, _, attr = config.backbone.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot import model factory {config.backbone!r}: {exc}") from None
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            made = factory(**config.args)
    except TypeError as exc:
        raise ConfigError(f"model factory {config.backbone!r} rejected the [model] arguments: {exc}") from None
    if isinstance(made, Backbone):
        return made
    if isinstance(made, nn.Module):
        return ModuleBackbone(made)
    raise ConfigError(
        f"model factory {config.backbone!r} must return a Backbone or an nn.Module, got {type(made).__name__}"
    )


def recipe_for_tasks(recipe: Recipe, n_tasks: int, host: PluginHost | None = None) -> Recipe:
    """The recipe with its router's arguments for the data's tasks (``Router.for_tasks``)."""
    host = host or get_host()
    router_cls = host.routers[recipe.router.name]
    try:
        args = router_cls.for_tasks(recipe.router.args, n_tasks)
    except ValueError as exc:
        raise ConfigError(f"recipe router {recipe.router.name!r}: {exc}") from None
    return attrs.evolve(recipe, router=RoleSpec(recipe.router.name, args))


def build_classifier(
    backbone: Backbone,
    recipe: Recipe | None,
    num_classes: int,
    *,
    seed: int,
    probe: Example | None = None,
    host: PluginHost | None = None,
) -> Classifier:
    """Build the body, attach the recipe (``None``: not yet, e.g. ``adapterkit.load`` will),
    add a new head; seeded, so every rank agrees."""
    classes = [str(i) for i in range(num_classes)]
    return build_model(Classification(), backbone, recipe, classes, seed=seed, probe=probe, host=host)  # type: ignore[return-value]


def build_model(
    objective: Objective,
    backbone: Backbone,
    recipe: Recipe | None,
    classes: Sequence[str],
    *,
    seed: int,
    probe: Example | None = None,
    host: PluginHost | None = None,
) -> WorkflowModel:
    """Build the body the objective needs, attach the recipe (``None``: not yet, e.g.
    ``adapterkit.load`` will), wrap it (:meth:`~adapterkit.objectives.Objective.wrap`: a new
    head for classification); seeded, so every rank agrees."""
    torch.manual_seed(seed)
    body = backbone.build_for(objective.body)
    for p in body.parameters():
        p.requires_grad_(False)
    if isinstance(backbone, ModuleBackbone):
        if probe is None:
            raise AdapterkitError("a user model needs one example to measure its feature size")
        with torch.no_grad():
            dim = int(backbone.features(body.eval(), backbone.encode([probe])).shape[-1])
        backbone.feature_dim = lambda body: dim  # type: ignore[method-assign]
    if recipe is not None:
        attach(body, recipe, host=host)
    torch.manual_seed(seed)
    return objective.wrap(backbone, body, classes)


def is_routed(classifier: WorkflowModel) -> bool:
    return any(site.router.needs_task_ids for site in sites(classifier.body).values())


def trainable_state(classifier: WorkflowModel) -> dict[str, Tensor]:
    """What a run trains and saves: the adapter tensors of the body plus the head."""
    from ..attach import adapter_state_dict

    out = {f"body.{k}": v for k, v in adapter_state_dict(classifier.body).items()}
    out.update({f"head.{k}": v for k, v in classifier.head.state_dict().items()})
    return out


def load_trainable_state(classifier: WorkflowModel, tensors: Mapping[str, Tensor]) -> None:
    """Copy saved tensors into the classifier; names and shapes must match exactly."""
    own = dict(classifier.named_parameters()) | dict(classifier.named_buffers())
    expected = trainable_state(classifier)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
        raise AdapterkitError(f"saved tensors do not fit this model's adapters: {detail}")
    with torch.no_grad():
        for name, value in tensors.items():
            target = own.get(name, expected[name])  # (modules_to_save/... keys: their state_dict tensors)
            if target.shape != value.shape:
                raise AdapterkitError(
                    f"saved tensor {name!r} has shape {tuple(value.shape)}, the model {tuple(target.shape)}"
                )
            target.copy_(value)


def shared_copy(classifier: WorkflowModel) -> WorkflowModel:
    """A deep copy that shares the backbone object (tokenizers are not copied)."""
    return copy.deepcopy(classifier, {id(classifier.backbone): classifier.backbone})
