"""``attach``: inject the adapters of a recipe into any ``nn.Module``; ``route``; ``merge``."""

from __future__ import annotations

import contextlib
import functools
import logging
import re
from collections.abc import Iterator, Sequence
from typing import Any

import attrs
import torch
from torch import Tensor, nn

from .errors import AdapterkitError, AttachError, RecipeError, RoutingError
from .plugins import PluginHost, get_host
from .recipe import Recipe, build_config
from .roles import Merger
from .site import AdapterSite, RoutingState

log = logging.getLogger("adapterkit")
STATE_ATTR = "_adapterkit"


@attrs.frozen
class SiteSummary:
    name: str
    base: str
    trainable: int


@attrs.frozen
class AttachSummary:
    """What ``attach`` did: the sites and the parameter counts."""

    recipe: Recipe
    sites: tuple[SiteSummary, ...]
    trainable: int
    total: int

    def __str__(self) -> str:
        lines = [f"{'site':<48} {'base':<16} {'trainable':>10}"]
        lines += [f"{s.name:<48} {s.base:<16} {s.trainable:>10,}" for s in self.sites]
        share = 100.0 * self.trainable / max(self.total, 1)
        lines.append(
            f"{len(self.sites)} sites; trainable {self.trainable:,} of {self.total:,} parameters ({share:.3f}%)"
        )
        return "\n".join(lines)


@attrs.define
class AttachState:
    """Kept on the model under ``_adapterkit``: the recipe, its resolved roles and sites."""

    recipe: Recipe
    routing: RoutingState
    n_tasks: int | None
    summary: AttachSummary | None = None


def match_target(name: str, pattern: str) -> bool:
    """PEFT-like target matching.

    ``re:<regex>`` full-matches the module name; a pattern with ``*`` or ``?`` is a glob
    over the full name where ``*`` stays within one dotted component and ``**`` crosses
    them (``encoder.layer.*.output``); otherwise it matches the name or its dotted
    suffix (``query`` matches ``encoder.layer.0.attention.self.query``).
    """
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    if "*" in pattern or "?" in pattern:
        return re.fullmatch(_glob_regex(pattern), name) is not None
    return name == pattern or name.endswith("." + pattern)


@functools.lru_cache(maxsize=256)
def _glob_regex(pattern: str) -> str:
    parts = re.split(r"(\*\*|\*|\?)", pattern)
    table = {"**": ".*", "*": "[^.]*", "?": "[^.]"}
    return "".join(table.get(part, re.escape(part)) for part in parts)


def find_sites(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """Names of modules matching any target, outermost only (no nested sites)."""
    found: list[str] = []
    for name, module in model.named_modules():
        if not name or isinstance(module, AdapterSite):
            continue
        if any(name.startswith(f + ".") for f in found):
            continue
        if any(match_target(name, p) for p in targets):
            found.append(name)
    return found


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _role(host: PluginHost, role: str, recipe: Recipe) -> tuple[type, Any]:
    spec = recipe.role(role)
    cls = host.registries[role][spec.name]
    return cls, build_config(cls, spec.args, f"{role} {spec.name!r}")


def attach(model: nn.Module, recipe: Recipe | dict[str, Any], *, host: PluginHost | None = None) -> nn.Module:
    """Inject the recipe's adapters into ``model`` in place, freeze the base, return the model.

    Every problem (unknown plugin name, bad argument, no matching site, a site whose
    shape does not fit) raises before the model is touched, naming the site and reason.
    ``adapterkit.summary(model)`` tells the sites and trainable parameters.
    """
    if isinstance(recipe, dict):
        recipe = Recipe.from_dict(recipe)
    if hasattr(model, STATE_ATTR):
        raise AttachError(None, "model already has adapters attached; detach or use a fresh model")
    host = host or get_host()
    kind_cls = host.kinds[recipe.kind]
    kind_config = build_config(kind_cls, recipe.kind_args, f"adapter kind {recipe.kind!r}")
    splitter_cls, splitter_cfg = _role(host, "splitter", recipe)
    sampler_cls, sampler_cfg = _role(host, "sampler", recipe)
    router_cls, router_cfg = _role(host, "router", recipe)
    merger_cls, merger_cfg = _role(host, "merger", recipe)
    splitter, sampler = splitter_cls(splitter_cfg), sampler_cls(sampler_cfg)
    merger_cls(merger_cfg)  # validated now, used by merge()

    names = find_sites(model, recipe.targets)
    if not names:
        sample = [n for n, _ in model.named_modules() if n][:6]
        raise AttachError(None, f"no module matches targets {list(recipe.targets)}; module names look like {sample}")

    routing = RoutingState()
    generator = torch.Generator().manual_seed(recipe.seed)
    sites: dict[str, AdapterSite] = {}
    for name in names:
        base = model.get_submodule(name)
        try:
            site = kind_cls(
                base, kind_config, name=name, skills=recipe.skills, splitter=splitter, sampler=sampler,
                make_router=functools.partial(router_cls, router_cfg, skills=recipe.skills, generator=generator),
                routing=routing, generator=generator,
            )
        except (ValueError, RecipeError) as exc:
            raise AttachError(name, str(exc)) from None
        sites[name] = site

    for param in model.parameters():
        param.requires_grad_(False)
    for name, site in sites.items():
        for param in site.adapter_parameters():
            param.requires_grad_(True)
        _set_submodule(model, name, site)

    state = AttachState(recipe=recipe, routing=routing, n_tasks=getattr(router_cfg, "tasks", None))
    setattr(model, STATE_ATTR, state)
    state.summary = _summarize(model, recipe, sites)
    log.info("adapterkit attached:\n%s", state.summary)
    return model


def _summarize(model: nn.Module, recipe: Recipe, sites: dict[str, AdapterSite]) -> AttachSummary:
    rows = tuple(
        SiteSummary(name, type(site.base).__name__, sum(p.numel() for p in site.parameters() if p.requires_grad))
        for name, site in sites.items()
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return AttachSummary(recipe, rows, trainable, total)


def state_of(model: nn.Module) -> AttachState:
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        raise AdapterkitError("model has no adapters attached; call adapterkit.attach(model, recipe) first")
    return state  # type: ignore[no-any-return]


def summary(model: nn.Module) -> AttachSummary:
    """The sites and trainable parameters of an attached model."""
    result = state_of(model).summary
    assert result is not None
    return result


def sites(model: nn.Module) -> dict[str, AdapterSite]:
    """The adapted sites of a model by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, AdapterSite)}


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Every adapter tensor (trainable parameters and adapter buffers), not the base model's."""
    out: dict[str, Tensor] = {}
    for name, site in sites(model).items():
        for key, tensor in site.state_dict().items():
            if not key.startswith("base."):
                out[f"{name}.{key}"] = tensor
    return out


@contextlib.contextmanager
def route(model: nn.Module, task_ids: Tensor | Sequence[int] | int) -> Iterator[Tensor]:
    """Make ``task_ids`` (one per example, or one for the whole batch) reach routed sites.

    Validated here, once per forward (range, integer dtype, 1-D), so the sites themselves
    do no host syncs and stay ``torch.compile(fullgraph=True)`` friendly.
    """
    state = state_of(model)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    ids = torch.as_tensor(task_ids, device=device)
    if ids.dim() == 0:
        ids = ids.reshape(1)
    if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise RoutingError(f"task ids must be a 1-D integer tensor, got shape {tuple(ids.shape)} dtype {ids.dtype}")
    ids = ids.long()
    if state.n_tasks is not None and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= state.n_tasks):
        bad = sorted({i for i in ids.tolist() if not 0 <= i < state.n_tasks})
        raise RoutingError(f"task ids must lie in [0, {state.n_tasks}); out of range: {bad[:8]}")
    previous = state.routing.task_ids
    state.routing.task_ids = ids
    try:
        yield ids
    finally:
        state.routing.task_ids = previous


def merge(model: nn.Module, merger: str | None = None, *, host: PluginHost | None = None, **args: Any) -> nn.Module:
    """Collapse every site with a merger (default: the recipe's) for deployment, in place."""
    state = state_of(model)
    host = host or get_host()
    name = merger or state.recipe.merger.name
    cls = host.mergers[name]
    merger_args = args if merger else {**state.recipe.merger.args, **args}
    instance: Merger = cls(build_config(cls, merger_args, f"merger {name!r}"))
    for site_name, site in sites(model).items():
        try:
            merged = instance.merge_site(site)
        except ValueError as exc:
            raise AdapterkitError(f"cannot merge with {name!r}: {exc}") from None
        _set_submodule(model, site_name, merged)
    return model
