"""``stack``: several adapter files onto one base model, as the skills of one inventory.

N compatible single-skill adapters (same kind, same sites, the same kind arguments but
for the rank) become one site per target holding ``K = N`` skills (``weight[K, *shape]``,
the skill axis of the data model) under a router, by default ``uniform``. Mergers that
combine skills (``task-arithmetic``, ``ties``, ``dare-*``, ``average``, ``weighted``, ...)
then apply to a *selection of experts* exactly as to a trained inventory.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import torch
from torch import Tensor, nn

from .attach import attach, detach, is_attached, sites, state_of
from .errors import AdapterkitError, AttachError
from .plugins import get_host
from .recipe import Recipe, build_config
from .site import AdapterSite
from .storage import AdapterInfo, inspect, load

SUFFIX = ".safetensors"
FREE_ARGS = ("r", "alpha", "dropout")  # kind arguments the experts may differ in (see stack)


@attrs.frozen
class _Expert:
    name: str
    url: str
    info: AdapterInfo


@attrs.frozen
class _Harvest:
    """One expert's eval weights per site, its config, scale and other (unstacked) state."""

    weights: dict[str, dict[str, Tensor]]
    extras: dict[str, dict[str, Tensor]]
    config: Any
    scale: float | None


def stack(
    sources: Sequence[str] | Mapping[str, str],
    model: nn.Module,
    *,
    router: str | Mapping[str, Any] = "uniform",
    storage_options: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Load N adapter files onto a fresh base ``model`` as the K = N skills of one site per
    target, in place; returns the model.

    ``sources`` are URLs (each expert is named after its file, ``.safetensors`` dropped) or
    a mapping ``{name: url}``. Every file is inspected first (header only) and refused in
    one line naming both files when it does not fit the first: another kind, other sites,
    other kind arguments (except ``r``, ``alpha`` and ``dropout``), several skills, or
    updates folded into base weights. Each is then loaded (every digest verified) and
    its eval weights (a split adapter's expectation) become skill ``k``:

    - smaller ranks are padded with zeros to the largest ``r`` (exact: the padded
      components add nothing, to ``A B`` nor to a bottleneck's output);
    - LoRA scales (``alpha / r``) that differ are folded into each expert's factors,
      ``sqrt(s_k)`` into ``A_k`` and into ``B_k`` (the update ``s_k A_k B_k`` is unchanged,
      and factor-wise merges see PEFT's ``sqrt(w_k s_k)`` split), and the stack gets
      ``alpha = r`` (scale 1); equal scales are kept as they are;
    - other state of the kind (e.g. a bottleneck's LayerNorm) must be equal in every file;
      ``dropout`` (training only) is the first file's.

    ``router`` (a name or ``{"name": ..., **args}``) mixes the skills in the stacked
    model's own forward; ``uniform`` runs the mean of the factors (what ``average``
    gives). The history records a ``stack`` step with each expert's name and header digest
    (never a URL). ``adapterkit.save`` writes the stacked model; ``load`` restores it.
    """
    if is_attached(model):
        raise AttachError(None, "model already has adapters attached; stack onto a fresh base model")
    experts = [_Expert(name, url, inspect(url, storage_options=storage_options)) for name, url in _named(sources)]
    if not experts:
        raise AdapterkitError("stack needs at least one adapter file")
    first = experts[0]
    for expert in experts:
        _check_file(expert)
        _check_pair(first, expert)
    harvests = [_harvest(expert, model, storage_options) for expert in experts]
    for expert, harvest in zip(experts[1:], harvests[1:], strict=True):
        _check_extras(first, harvests[0], expert, harvest)
    recipe = _recipe(first.info, harvests, router)
    attach(model, recipe)
    try:
        _fill(model, harvests)
    except BaseException:
        detach(model)
        raise
    ranks = [getattr(h.config, "r", None) for h in harvests]
    state_of(model).history.append({
        "op": "stack", "router": recipe.router.to_dict(),
        "sources": [{"name": e.name, "digest": e.info.digest, "r": r}
                    for e, r in zip(experts, ranks, strict=True)],
    })
    return model


def _named(sources: Sequence[str] | Mapping[str, str]) -> list[tuple[str, str]]:
    if isinstance(sources, str):
        raise AdapterkitError("stack takes a list of adapter URLs (or a mapping {name: url}), not one string")
    pairs = list(sources.items()) if isinstance(sources, Mapping) else [(None, u) for u in sources]
    for name, url in pairs:
        if not isinstance(url, str) or not isinstance(name, (str, type(None))) or name == "":
            raise AdapterkitError(f"stack takes adapter URLs as strings (names too), got {type(url).__name__}")
    named = [(display_name(url) if name is None else name, url) for name, url in pairs]
    seen: dict[str, str] = {}
    for name, url in named:
        if name in seen:
            raise AdapterkitError(f"two adapters named {name!r}: name them, stack({{'a': url1, 'b': url2}}, model)")
        seen[name] = url
    return named


def display_name(url: str) -> str:
    """An expert's name from its URL: the file name without ``.safetensors``; never the
    query string or credentials (``user:secret@host``) the URL may hold."""
    path = re.split(r"[?#]", url.split("::")[-1], maxsplit=1)[0].rstrip("/")
    name = path.rsplit("/", 1)[-1].rsplit("@", 1)[-1]
    return name[: -len(SUFFIX)] if name.endswith(SUFFIX) and len(name) > len(SUFFIX) else name


def _check_file(expert: _Expert) -> None:
    info, name = expert.info, expert.name
    if info.content != "adapter" or (info.recipe is None and info.folded_recipe is None):
        raise AdapterkitError(f"cannot stack {name!r}: it holds {info.content}, not an adapter")
    if info.folded:
        raise AdapterkitError(f"cannot stack {name!r}: its updates are folded into base weights "
                              f"({len(info.folded)} sites); save it before folding")
    assert info.recipe is not None
    if info.recipe.skills != 1:
        raise AdapterkitError(f"cannot stack {name!r}: it holds {info.recipe.skills} skills; stack single-skill "
                              "adapters (merge or collapse it first)")


def _check_pair(first: _Expert, other: _Expert) -> None:
    a, b = first.info.recipe, other.info.recipe
    assert a is not None and b is not None

    def refuse(reason: str) -> AdapterkitError:
        return AdapterkitError(f"cannot stack {other.name!r} with {first.name!r}: {reason}")

    if a.kind != b.kind:
        raise refuse(f"kind {b.kind!r} vs {a.kind!r}")
    if set(first.info.sites) != set(other.info.sites):
        only_a = sorted(set(first.info.sites) - set(other.info.sites))
        only_b = sorted(set(other.info.sites) - set(first.info.sites))
        raise refuse(f"they adapt different sites (only in {first.name!r}: {_short(only_a)}; "
                     f"only in {other.name!r}: {_short(only_b)})")
    kind = get_host().kinds[a.kind]
    ca, cb = (build_config(kind, r.kind_args, f"adapter kind {a.kind!r}") for r in (a, b))
    for field in attrs.fields(type(ca)):
        va, vb = getattr(ca, field.name), getattr(cb, field.name)
        if field.name not in FREE_ARGS and va != vb:
            raise refuse(f"{a.kind} argument {field.name!r} is {vb!r} vs {va!r}")


def _short(items: Sequence[str], limit: int = 3) -> str:
    return ", ".join(items[:limit]) + (f", ... ({len(items)} in all)" if len(items) > limit else "") or "none"


def _harvest(expert: _Expert, model: nn.Module, storage_options: Mapping[str, Any] | None) -> _Harvest:
    """Load the expert onto ``model`` (digests verified), read its sites' eval weights, detach."""
    load(expert.url, model, storage_options=storage_options)
    try:
        found = sites(model)
        weights = {name: site.mixed_weights() for name, site in found.items()}
        extras = {name: _extras(site) for name, site in found.items()}
        any_site = next(iter(found.values()))
        scale = getattr(any_site, "scale", None)
        return _Harvest(weights, extras, any_site.config, float(scale) if isinstance(scale, (int, float)) else None)
    finally:
        detach(model)


def _extras(site: AdapterSite) -> dict[str, Tensor]:
    """The kind's own state that is not a skill-stacked projection (e.g. a LayerNorm)."""
    skip = ("base.", "projections.", "router.")
    return {k: v.detach().clone() for k, v in site.state_dict().items() if not k.startswith(skip)}


def _check_extras(first: _Expert, a: _Harvest, other: _Expert, b: _Harvest) -> None:
    for site, tensors in a.extras.items():
        for key, value in tensors.items():
            theirs = b.extras.get(site, {}).get(key)
            if theirs is None or theirs.shape != value.shape or not torch.equal(theirs, value):
                raise AdapterkitError(f"cannot stack {other.name!r} with {first.name!r}: site {site!r} holds a "
                                      f"different {key!r}, which is not a weight skills can stack")


def _recipe(info: AdapterInfo, harvests: Sequence[_Harvest], router: str | Mapping[str, Any]) -> Recipe:
    """The stacked recipe: the first file's, with ``K`` skills, the largest rank, one scale."""
    assert info.recipe is not None
    kind_args = dict(info.recipe.kind_args)
    config = harvests[0].config
    ranks = [getattr(h.config, "r", None) for h in harvests]
    rank = max(ranks) if all(isinstance(r, int) for r in ranks) else None  # type: ignore[type-var]
    if rank is not None and rank != config.r:
        kind_args["r"] = rank
    scales = {h.scale for h in harvests}
    if rank is not None and hasattr(config, "alpha") and None not in scales:
        if len(scales) > 1:
            kind_args["alpha"] = rank  # scale 1; each expert's own scale goes into its factors (see _fill)
        elif rank != config.r:
            (scale,) = scales
            kind_args.pop("alpha", None)
            if config.alpha is not None or scale != 1.0:
                kind_args["alpha"] = scale * rank
    role = {"name": router} if isinstance(router, str) else dict(router)
    data = {
        "seed": info.recipe.seed,
        "adapter": {"kind": info.recipe.kind, "targets": list(info.recipe.targets), "skills": len(harvests),
                    **kind_args},
        "router": role,
    }
    return Recipe.from_dict(data)


@torch.no_grad()
def _fill(model: nn.Module, harvests: Sequence[_Harvest]) -> None:
    for name, site in sites(model).items():
        specs = {spec.name: spec for spec in type(site).projection_specs(site.base, site.config)}
        own = getattr(site, "scale", None)
        for proj, module in site.projections.items():
            weight = module.weight  # [K, *shape] (dense splitter)
            assert isinstance(weight, Tensor)
            weight.zero_()
            for k, harvest in enumerate(harvests):
                value = harvest.weights[name][proj]
                if any(n > m for n, m in zip(value.shape, weight.shape[1:], strict=True)):
                    raise AdapterkitError(f"cannot stack: site {name!r}: {proj} of shape {list(value.shape)} "
                                          f"does not fit {list(weight.shape[1:])}")
                side = specs[proj].side
                if side is not None and harvest.scale is not None and isinstance(own, (int, float)):
                    ratio = harvest.scale / own
                    if not math.isclose(ratio, 1.0, rel_tol=1e-12):  # sqrt|ratio| into each factor
                        root = math.sqrt(abs(ratio))
                        value = value * (root if side == "down" or ratio > 0 else -root)
                index: tuple[int | slice, ...] = (k, *(slice(0, n) for n in value.shape))
                weight[index] = value.to(weight.dtype)
        site.load_state_dict(harvests[0].extras[name], strict=False)
