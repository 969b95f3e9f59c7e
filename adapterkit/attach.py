"""``attach``: inject the adapters of a recipe into any ``nn.Module``; ``merge``, ``detach``."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .describe import describe, json_ready
from .errors import AdapterkitError, AttachError, RecipeError
from .plugins import PluginHost, get_host
from .recipe import DEFAULT_ROLE_NAMES, ROLES, Recipe, build_config
from .roles import AdaptMode, Folded, Merger
from .site import AdapterSite, RoutingState
from .state import (
    NAMED_ATTR,
    STATE_ATTR,
    AttachState,
    AttachSummary,
    SiteSummary,
    editable_state,
    state_of,
    unwrap,
)
from .targets import find_sites, match_target, override_for
from .task_ids import install_keyword, remove_keyword

log = logging.getLogger("adapterkit")
SAVED_PREFIX = "modules_to_save/"  # key namespace of modules_to_save tensors: modules_to_save/<module>/<tensor>


def _role(host: PluginHost, role: str, recipe: Recipe) -> tuple[type, Any]:
    spec = recipe.role(role)
    cls = host.registries[role][spec.name]
    return cls, build_config(cls, spec.args, f"{role} {spec.name!r}")


def kind_configs(kind_cls: type, recipe: Recipe) -> dict[str | None, Any]:
    """The kind's config per override pattern (``None``: the recipe's own arguments)."""
    what = f"adapter kind {recipe.kind!r}"
    configs: dict[str | None, Any] = {None: build_config(kind_cls, recipe.kind_args, what)}
    for pattern in recipe.overrides:
        configs[pattern] = build_config(kind_cls, recipe.site_args(pattern), f"{what} (overrides {pattern!r})")
    return configs


def build_sites(model: nn.Module, recipe: Recipe, names: Sequence[str], host: PluginHost) -> dict[str, AdapterSite]:
    """The recipe's sites for the modules ``names`` of ``model``, without installing them."""
    kind_cls = host.kinds[recipe.kind]
    configs = kind_configs(kind_cls, recipe)
    splitter_cls, splitter_cfg = _role(host, "splitter", recipe)
    sampler_cls, sampler_cfg = _role(host, "sampler", recipe)
    router_cls, router_cfg = _role(host, "router", recipe)
    merger_cls, merger_cfg = _role(host, "merger", recipe)
    splitter, sampler = splitter_cls(splitter_cfg), sampler_cls(sampler_cfg)
    merger_cls(merger_cfg)  # validated now, used by merge()
    routing = RoutingState()
    generator = torch.Generator().manual_seed(recipe.seed)
    out: dict[str, AdapterSite] = {}
    for name in names:
        try:
            out[name] = kind_cls(
                model.get_submodule(name), configs[override_for(recipe, name)], name=name, skills=recipe.skills,
                splitter=splitter, sampler=sampler, routing=routing, generator=generator,
                make_router=functools.partial(router_cls, router_cfg, skills=recipe.skills, generator=generator),
            )
        except (ValueError, RecipeError) as exc:
            raise AttachError(name, str(exc)) from None
    return out


def planned_elements(model: nn.Module, recipe: Recipe, *, host: PluginHost | None = None) -> int:
    """How many adapter elements attaching ``recipe`` to ``model`` would allocate (at least),
    computed from the kind's projection specs alone: nothing is allocated. ``load`` compares
    it with the file's size before attaching, so a crafted recipe (``r = 2**40``) cannot
    make it allocate far beyond the file."""
    host = host or get_host()
    kind_cls = host.kinds[recipe.kind]
    configs = kind_configs(kind_cls, recipe)
    total = 0
    for name in find_sites(model, recipe.targets):
        try:
            specs = kind_cls.projection_specs(model.get_submodule(name), configs[override_for(recipe, name)])
        except (ValueError, RecipeError) as exc:
            raise AttachError(name, str(exc)) from None
        total += sum(recipe.skills * math.prod(spec.shape) for spec in specs)
    for name in find_sites(model, recipe.modules_to_save) if recipe.modules_to_save else ():
        total += sum(t.numel() for t in model.get_submodule(name).state_dict().values())  # the originals' copy
    return total


def _modules_to_save(model: nn.Module, recipe: Recipe, site_names: Sequence[str]) -> list[str]:
    """The modules ``recipe.modules_to_save`` names (outermost), none holding or inside a site."""
    if not recipe.modules_to_save:
        return []
    found = find_sites(model, recipe.modules_to_save)
    if not found:
        raise AttachError(None, f"no module matches modules_to_save {list(recipe.modules_to_save)}")
    for name in found:
        clash = next((s for s in site_names if s == name or s.startswith(name + ".") or name.startswith(s + ".")),
                     None)
        if clash is not None:
            raise AttachError(name, f"a module to save cannot hold or sit inside the adapter site {clash!r}")
    return found


def attach(
    model: nn.Module, recipe: Recipe | dict[str, Any], *, name: str | None = None, host: PluginHost | None = None
) -> nn.Module:
    """Inject the recipe's adapters into ``model`` in place, freeze the base, return the model.

    Every problem (unknown plugin name, bad argument, no matching site, a site whose
    shape does not fit) raises before the model is touched, naming the site and reason.
    ``adapterkit.summary(model)`` tells the sites and trainable parameters;
    :func:`detach` gives the original model back. With ``name``, the adapter is one of
    several named adapters on the model and becomes the active one (see
    :mod:`adapterkit.named`: ``activate``, ``delete``, ``adapters``, ``serve``).
    """
    if isinstance(recipe, dict):
        recipe = Recipe.from_dict(recipe)
    model = unwrap(model)
    if name is not None:
        from .named import attach_named

        return attach_named(model, recipe, name, host=host)
    if hasattr(model, NAMED_ATTR):
        from .named import adapters

        raise AttachError(None, f"model holds named adapters {adapters(model)}; attach another with name=...")
    return attach_one(model, recipe, host=host)


def attach_one(model: nn.Module, recipe: Recipe, *, host: PluginHost | None = None) -> nn.Module:
    """``attach`` of one adapter onto a model holding no active one (named adapters may be parked)."""
    if hasattr(model, STATE_ATTR):
        raise AttachError(None, "model already has adapters attached; "
                                "adapterkit.detach(model) first, attach with name=... to add a named adapter, "
                                "or use a fresh model")
    host = host or get_host()
    build_sites(model, recipe, (), host)  # unknown names and bad arguments fail before the targets
    names = find_sites(model, recipe.targets)
    if not names:
        sample = [n for n, _ in model.named_modules() if n][:6]
        raise AttachError(None, f"no module matches targets {list(recipe.targets)}; module names look like {sample}")
    unused = [p for p in recipe.overrides if not any(match_target(n, p) for n in names)]
    if unused:
        raise AttachError(None, f"overrides pattern {unused[0]!r} matches no site; sites: {_short(names)}")
    new_sites = build_sites(model, recipe, names, host)
    saved_names = _modules_to_save(model, recipe, names)

    requires_grad = {name: param.requires_grad for name, param in model.named_parameters()}
    originals = {name: model.get_submodule(name) for name in names}
    saved = {name: {k: v.detach().clone() for k, v in model.get_submodule(name).state_dict().items()}
             for name in saved_names}
    for param in model.parameters():
        param.requires_grad_(False)
    for name in saved_names:
        model.get_submodule(name).requires_grad_(True)
    for name, site in new_sites.items():
        for param in site.adapter_parameters():
            param.requires_grad_(True)
        site.train(originals[name].training)  # a model in eval mode stays in eval mode (routers sample in training)
        model.set_submodule(name, site)

    routing = next(iter(new_sites.values())).routing
    state = AttachState(recipe, recipe, routing, originals, requires_grad, n_tasks=_n_tasks(new_sites), saved=saved)
    state.history.append({"op": "attach", "method": method_name(recipe), "plugins": providers(recipe, host)})
    setattr(model, STATE_ATTR, state)
    if any(site.router.needs_task_ids for site in new_sites.values()):
        install_keyword(model)
    state.summary = summarize(model, recipe, new_sites, saved_names)
    log.info("adapterkit attached:\n%s", state.summary)
    return model


def method_name(recipe: Recipe) -> str:
    """Kind plus every non-default role name, once each (``lora+mosa``, ``lora+mhr+poly``)."""
    roles = [recipe.role(r).name for r in ROLES if recipe.role(r).name != DEFAULT_ROLE_NAMES[r]]
    return "+".join(dict.fromkeys([recipe.kind, *roles]))


def providers(recipe: Recipe, host: PluginHost | None = None) -> dict[str, str]:
    """``{plugin: version}`` of the plugins supplying the recipe's kind and roles."""
    host = host or get_host()
    versions = host.plugin_versions()
    used = [("kind", recipe.kind), *((role, recipe.role(role).name) for role in ROLES)]
    out = {}
    for role, name in used:
        plugin = host.registries[role].provider(name)
        out[plugin] = versions.get(plugin, "unknown")
    return out


def _n_tasks(found: Mapping[str, AdapterSite]) -> int | None:
    counts = {s.router.n_tasks for s in found.values() if s.router.needs_task_ids} - {None}
    return min(counts) if counts else None  # type: ignore[type-var]


def summarize(
    model: nn.Module, recipe: Recipe, sites: dict[str, AdapterSite], saved: Sequence[str] = ()
) -> AttachSummary:
    rows = tuple(
        SiteSummary(name, type(site.base).__name__, sum(p.numel() for p in site.parameters() if p.requires_grad))
        for name, site in sites.items()
    )
    saved_rows = tuple(
        SiteSummary(name, type(module).__name__, sum(p.numel() for p in module.parameters() if p.requires_grad))
        for name, module in ((n, model.get_submodule(n)) for n in saved)
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return AttachSummary(recipe, rows, trainable, total, saved_rows)


def summary(model: nn.Module) -> AttachSummary:
    """The sites and trainable parameters of an attached model."""
    result = state_of(model).summary
    assert result is not None
    return result


def sites(model: nn.Module) -> dict[str, AdapterSite]:
    """The adapted sites of a model by module name."""
    model = unwrap(model)
    return {name: m for name, m in model.named_modules() if isinstance(m, AdapterSite)}


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Every adapter tensor (trainable parameters and adapter buffers), not the base model's,
    and the tensors of the modules to save (keys ``modules_to_save/<module>/<tensor>``)."""
    model = unwrap(model)
    out: dict[str, Tensor] = {}
    for name, site in sites(model).items():
        for key, tensor in site.state_dict().items():
            if not key.startswith("base."):
                out[f"{name}.{key}"] = tensor
    state = getattr(model, STATE_ATTR, None)
    for module in state.saved if state is not None else ():
        for key, tensor in model.get_submodule(module).state_dict().items():
            out[f"{SAVED_PREFIX}{module}/{key}"] = tensor
    return out


def saved_module_key(key: str) -> tuple[str, str] | None:
    """``(module, tensor)`` of a ``modules_to_save/<module>/<tensor>`` key, else ``None``."""
    if not key.startswith(SAVED_PREFIX):
        return None
    module, _, tensor = key[len(SAVED_PREFIX):].rpartition("/")
    return module, tensor


def saved_modules(model: nn.Module) -> list[str]:
    """The names of the model's modules to save (trained fully, saved with the adapter)."""
    model = unwrap(model)
    state = getattr(model, STATE_ATTR, None)
    return list(state.saved) if state is not None else []


@torch.no_grad()
def put_saved(model: nn.Module, values: Mapping[str, Mapping[str, Tensor]]) -> dict[str, dict[str, Tensor]]:
    """Copy ``values`` into the modules to save in place; returns what they held before."""
    before: dict[str, dict[str, Tensor]] = {}
    for module, tensors in values.items():
        live = model.get_submodule(module).state_dict()
        before[module] = {k: v.clone() for k, v in live.items()}
        for key, tensor in live.items():
            tensor.copy_(tensors[key])
    return before


def merge(model: nn.Module, merger: str | None = None, *, host: PluginHost | None = None, **args: Any) -> nn.Module:
    """Collapse every site with a merger (default: the recipe's) for deployment, in place.

    A state transition: every site is merged first (a refused site leaves the model as
    it was), then the results are installed, folded updates added to their base
    weights, and the model's recipe becomes the description of what the merge left, so
    ``save`` writes the merged model and ``load`` onto a fresh base reproduces it.
    :func:`unmerge` undoes the last merge; :func:`detach` undoes everything.
    """
    model = unwrap(model)
    state = editable_state(model)
    current = sites(model)
    if not current or state.recipe is None:
        raise AdapterkitError("nothing to merge: every adapter of this model is folded into its base weights")
    host = host or get_host()
    name = merger or state.recipe.merger.name
    cls = host.mergers[name]
    merger_args = args if merger else {**state.recipe.merger.args, **args}
    instance: Merger = cls(build_config(cls, merger_args, f"merger {name!r}"))
    kept: dict[str, AdapterSite] = {}
    folds: dict[str, tuple[AdapterSite, Tensor]] = {}
    for site_name, site in current.items():
        try:
            result = instance.merge_site(site)
            if isinstance(result, Folded):
                folds[site_name] = _plain_fold(result.site)
            elif isinstance(result, AdapterSite):
                kept[site_name] = result
            else:
                raise ValueError(f"site {site_name!r}: the merger returned {type(result).__name__}, "
                                 "not an AdapterSite or Folded")
        except ValueError as exc:
            raise AdapterkitError(f"cannot merge with {name!r}: {exc}") from None
    recipe = describe(kept, state.origin, host, list(state.originals)) if kept else None
    state.undo.append((dict(current), state.recipe, dict(state.folded)))
    _install_folds(model, state, folds)
    for site_name, site in kept.items():
        site.train(current[site_name].training)
        model.set_submodule(site_name, site)
    state.recipe = recipe
    state.n_tasks = _n_tasks(kept)
    state.history.append(_step("merge", name, merger_args, host.mergers.provider(name), host))
    return model


@torch.no_grad()
def _install_folds(model: nn.Module, state: AttachState, folds: Mapping[str, tuple[AdapterSite, Tensor]]) -> None:
    for site_name, (plain, delta) in folds.items():
        weight = _base_weight(plain)
        weight.copy_(weight + delta)  # summed in the wider dtype (a float32 delta on a bf16 base), rounded once
        model.set_submodule(site_name, plain.base)
        state.folded[site_name] = plain


def _base_weight(site: AdapterSite) -> Tensor:
    weight = site.base.weight
    assert isinstance(weight, Tensor)  # a foldable kind's base layer has a weight
    return weight


def add_sites(model: nn.Module, recipe: Recipe, names: Sequence[str], *, host: PluginHost | None = None) -> None:
    """Attach ``recipe`` at the modules ``names`` of an attached model, beside its sites
    (used by ``load`` to rebuild folded sites before refolding them)."""
    state = editable_state(model)
    new_sites = build_sites(model, recipe, names, host or get_host())
    for name, site in new_sites.items():
        state.originals[name] = site.base
        model.set_submodule(name, site)


def fold_sites(model: nn.Module, names: Sequence[str]) -> None:
    """Fold the single-skill sites ``names`` into their base weights, as a ``Folded``
    merger result would (``load`` refolds a saved fold this way: bit-identical)."""
    state = editable_state(model)
    current = sites(model)
    try:
        folds = {name: _plain_fold(current[name]) for name in names}
    except ValueError as exc:
        raise AdapterkitError(f"cannot fold: {exc}") from None
    _install_folds(model, state, folds)
    if not sites(model):
        state.recipe, state.n_tasks = None, None


def _plain_fold(site: AdapterSite) -> tuple[AdapterSite, Tensor]:
    """The site to record for a fold (plain: its eval weights) and the update it adds."""
    delta = site.delta_weight()  # raises with the reason when the site cannot fold
    plain = site.rebuild(site.mixed_weights())
    return plain, delta


def _step(op: str, name: str, args: Mapping[str, Any], plugin: str, host: PluginHost) -> dict[str, Any]:
    version = host.plugin_versions().get(plugin, "unknown")
    return {"op": op, "name": name, "args": json_ready(dict(args)), "plugin": plugin, "version": version}


@torch.no_grad()
def unfold(folded: Mapping[str, AdapterSite]) -> None:
    for plain in folded.values():
        weight = _base_weight(plain)
        weight.copy_(weight - plain.delta_weight())


def unmerge(model: nn.Module) -> nn.Module:
    """Undo the last :func:`merge`: the sites it replaced come back, folded updates are
    subtracted from their base weights (exact up to float rounding of ``(W + d) - d``)."""
    model = unwrap(model)
    state = editable_state(model)
    if not state.undo:
        raise AdapterkitError("nothing to unmerge: this model was not merged since it was attached or loaded")
    before, recipe, folded = state.undo.pop()
    unfold({n: s for n, s in state.folded.items() if n not in folded})
    for site_name, site in before.items():
        model.set_submodule(site_name, site)
    state.recipe, state.folded = recipe, folded
    state.n_tasks = _n_tasks(before)
    state.history.append({"op": "unmerge"})
    return model


def detach(model: nn.Module) -> nn.Module:
    """Remove every adapter (every named one too): the original modules come back at every
    site, folded updates are subtracted from their base weights (to float tolerance) and
    every parameter gets its ``requires_grad`` from before :func:`attach`. Returns the model."""
    model = unwrap(model)
    if hasattr(model, NAMED_ATTR):
        from .named import detach_all

        detach_all(model)
        return model
    remove_state(model)
    return model


def remove_state(model: nn.Module) -> None:
    """Take the active adapter out of ``model``: originals back, folded updates subtracted,
    the modules to save restored, ``requires_grad`` as before its attach."""
    state = state_of(model)
    unfold(state.folded)
    put_saved(model, state.saved)
    for name, original in state.originals.items():
        model.set_submodule(name, original)
    restore_requires_grad(model, state.requires_grad)
    remove_keyword(model)
    delattr(model, STATE_ATTR)


def restore_requires_grad(model: nn.Module, requires_grad: Mapping[str, bool]) -> None:
    for name, param in model.named_parameters():
        param.requires_grad_(requires_grad.get(name, param.requires_grad))


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the bare base model inside the block: every site's base module stands in for it
    and the modules to save hold their original tensors (the trained ones come back after).

    Refused when updates were folded into base weights (the bare weights are gone until
    :func:`unmerge` or :func:`detach`)."""
    model = unwrap(model)
    state = state_of(model)
    if state.folded:
        raise AdapterkitError(f"cannot disable adapters folded into base weights ({_short(state.folded)}); "
                              "adapterkit.unmerge(model) or adapterkit.detach(model) first")
    current = sites(model)
    for name, site in current.items():
        model.set_submodule(name, site.base)
    trained = put_saved(model, state.saved)
    try:
        yield model
    finally:
        put_saved(model, trained)
        for name, site in current.items():
            model.set_submodule(name, site)


def _short(items: Any, limit: int = 4) -> str:
    items = list(items)
    return ", ".join(items[:limit]) + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def adapt(model: nn.Module, mode: str, *, seed: int = 0, host: PluginHost | None = None, **args: Any) -> AdaptMode:
    """Prepare a trained model for few-shot learning of a new task with an adaptation mode
    (``adapterkit plugins`` lists them), in place; returns the mode (it may know a compact
    per-task state, :meth:`~adapterkit.roles.AdaptMode.compact_state`). The model's recipe
    is re-derived from its sites and the step recorded."""
    model = unwrap(model)
    state = editable_state(model)
    host = host or get_host()
    cls = host.adapt_modes[mode]
    instance: AdaptMode = cls(build_config(cls, args, f"adaptation mode {mode!r}"))
    try:
        instance.prepare(model, seed=seed)
    except ValueError as exc:
        raise AdapterkitError(f"cannot adapt with {mode!r}: {exc}") from None
    current = sites(model)
    state.recipe = describe(current, state.origin, host, list(state.originals))
    state.n_tasks = _n_tasks(current)
    state.undo.clear()  # the sites before adapting are gone for good
    state.history.append(_step("adapt", mode, {**args, "seed": seed}, host.adapt_modes.provider(mode), host))
    return instance


def replace_sites(model: nn.Module, new: Mapping[str, AdapterSite]) -> None:
    """Put new sites in place of current ones (for adaptation modes); names must be sites."""
    model = unwrap(model)
    current = sites(model)
    for name, site in new.items():
        if name not in current:
            raise AdapterkitError(f"{name!r} is not an adapter site of this model")
        site.train(current[name].training)
        model.set_submodule(name, site)


def is_attached(model: nn.Module) -> bool:
    """Whether ``model`` holds adapterkit state (adapters attached, perhaps merged or folded)."""
    model = unwrap(model)
    return hasattr(model, STATE_ATTR) or hasattr(model, NAMED_ATTR)


def recipe_of(model: nn.Module) -> Recipe | None:
    """The recipe of the adapter sites the model holds now (``None`` once all are folded)."""
    return state_of(model).recipe


def history(model: nn.Module) -> list[dict[str, Any]]:
    """The steps that made the model's adapter state (attach, merge, adapt), oldest first,
    each with the plugin and version that made it."""
    return [dict(step) for step in state_of(model).history]


def folded_sites(model: nn.Module) -> dict[str, AdapterSite]:
    """The plain sites whose updates were folded into their base weights, by module name
    (``{}`` for a model without adapterkit state)."""
    model = unwrap(model)
    state = getattr(model, STATE_ATTR, None)
    return dict(state.folded) if state is not None else {}
