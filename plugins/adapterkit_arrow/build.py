"""``arrow``: a selection of LoRA experts onto a base model, routed per token by Arrow."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import torch
from torch import Tensor, nn

import adapterkit

from .prototypes import top_right_singular_vectors
from .router import ArrowRouter
from .store import PrototypeStore, key_of

log = logging.getLogger("adapterkit.arrow")


@attrs.frozen
class Source:
    """One adapter file: its name, URL, digest and recipe (from a library entry or its header)."""

    name: str
    url: str
    digest: str | None
    recipe: adapterkit.Recipe | None


def resolve(item: Any, library: adapterkit.Library | None, storage_options: Mapping[str, Any] | None = None,
            name: str | None = None) -> Source:
    """A library entry (``Library.get``/``select``), a name in ``library``, or a URL."""
    if isinstance(item, str):
        if library is not None:
            item = library.get(item)
        else:
            info = adapterkit.inspect(item, storage_options=storage_options)
            stem = item.split("::")[0].split("?")[0].rstrip("/").rsplit("/", 1)[-1].removesuffix(".safetensors")
            return Source(name or stem, item, info.digest, info.recipe)
    if not all(hasattr(item, a) for a in ("name", "url", "digest", "recipe")):
        raise adapterkit.AdapterkitError(f"arrow takes library entries, names or URLs, got {type(item).__name__}")
    recipe = item.recipe if item.recipe is None or isinstance(item.recipe, adapterkit.Recipe) else \
        adapterkit.Recipe.from_dict(dict(item.recipe))
    return Source(name or item.name, item.url, item.digest, recipe)


def sources(items: Any, library: adapterkit.Library | None,
            storage_options: Mapping[str, Any] | None) -> list[Source]:
    if isinstance(items, str):
        raise adapterkit.AdapterkitError("arrow takes a list of experts (entries, names or URLs), not one string")
    if isinstance(items, Mapping):
        return [resolve(url, None, storage_options, name=name) for name, url in items.items()]
    return [resolve(item, library, storage_options) for item in items]


def _lora_config(source: Source) -> Any:
    if source.recipe is None or source.recipe.kind != "lora":
        what = source.recipe.kind if source.recipe is not None else "no recipe"
        raise adapterkit.AdapterkitError(f"arrow routes LoRA experts; {source.name!r} is {what!r}")
    lora: Any = adapterkit.get_host().kinds["lora"]
    return lora.Config(**source.recipe.kind_args)


def general_average(general: Sequence[Source], model: nn.Module,
                    storage_options: Mapping[str, Any] | None) -> dict[str, tuple[Tensor, Tensor]]:
    """The mean raw factors ``(A, B)`` of the general adapters per site, each loaded onto
    ``model`` (a base without adapters) and detached again."""
    sums: dict[str, list[Tensor]] = {}
    first: Source | None = None
    for source in general:
        adapterkit.load(source.url, model, storage_options=storage_options)
        try:
            found = adapterkit.sites(model)
            if first is not None and set(found) != set(sums):
                raise adapterkit.AdapterkitError(f"general adapter {source.name!r} adapts other sites than "
                                                 f"{first.name!r}")
            for name, site in found.items():
                if site.kind != "lora" or site.skills != 1:
                    raise adapterkit.AdapterkitError(f"general adapter {source.name!r} is not a single-skill LoRA")
                w = site.expected_weights()
                a, b = w["A"][0], w["B"][0]
                if name in sums and sums[name][0].shape != a.shape:
                    raise adapterkit.AdapterkitError(
                        f"GenKnowSub subtracts factors, so every adapter needs one rank: general adapter "
                        f"{source.name!r} has r = {a.shape[1]}, {first.name if first else '?'!r} "
                        f"r = {sums[name][0].shape[1]}")
                if name in sums:
                    sums[name][0] += a
                    sums[name][1] += b
                else:
                    sums[name] = [a.clone(), b.clone()]
        finally:
            adapterkit.detach(model)
        first = first or source
    n = len(general)
    return {name: (a / n, b / n) for name, (a, b) in sums.items()}


def _check_gks(task: Sequence[Source], general: Sequence[Source]) -> None:
    configs = [(s, _lora_config(s)) for s in [*task, *general]]  # PEFT's rule: one rank
    ranks = {c.r for _, c in configs}
    if len(ranks) > 1:
        (a, ca), (b, cb) = configs[0], next((s, c) for s, c in configs if c.r != configs[0][1].r)
        raise adapterkit.AdapterkitError(f"GenKnowSub subtracts factors, so every adapter needs one rank (as PEFT): "
                                         f"{a.name!r} has r = {ca.r}, {b.name!r} r = {cb.r}")


def arrow(
    model: nn.Module,
    experts: Sequence[Any] | Mapping[str, str],
    *,
    library: adapterkit.Library | None = None,
    general: Sequence[Any] | Mapping[str, str] = (),
    top_k: int = 3,
    temperature: float = 1.0,
    storage_options: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Stack ``experts`` onto ``model`` (a base without adapters), in place, as the K skills of
    one site per target under the ``arrow`` router; returns the model.

    ``experts`` (and ``general``) are library entries (``library.select(...)``), names in
    ``library``, or URLs (a list, or ``{name: url}``). With ``library``, each expert's
    prototypes come from the library's store (:class:`PrototypeStore`) and only the
    missing ones are computed (and stored, when the library is writable); without, all are
    computed. ``general`` turns on GenKnowSub: the mean of the general adapters' factors is
    subtracted from every expert's factors before prototypes and routing (one rank for all,
    one scale among the experts). ``top_k`` and ``temperature`` as PEFT's ``ArrowConfig``.
    """
    opts = library.storage_options if library is not None else storage_options
    task = sources(experts, library, opts)
    gen = sources(general, library, opts)
    if not task:
        raise adapterkit.AdapterkitError("arrow needs at least one expert")
    if adapterkit.is_attached(model):
        raise adapterkit.AdapterkitError("arrow stacks experts onto a base model without adapters (a fresh copy)")
    for source in task:
        _lora_config(source)
    average = None
    gen_digests = [g.digest or "none" for g in gen]
    if gen:
        _check_gks(task, gen)
        average = general_average(gen, model, opts)
    router = {"name": "arrow", "top_k": top_k, "temperature": temperature, "general": gen_digests}
    adapterkit.stack({s.name: s.url for s in task}, model, router=router, storage_options=opts)
    try:
        stacked = adapterkit.history(model)[-1]["sources"]  # each file's digest, verified as it loaded
        if average is not None:
            _subtract(model, average, [float(_lora_config(s).scale) for s in task])
        keys = [key_of(src["digest"], gen_digests if gen else ()) for src in stacked]
        store = PrototypeStore(library) if library is not None else None
        computed = install(model, keys, [src["name"] for src in stacked], [src["digest"] for src in stacked],
                           store, gen_digests if gen else ())
    except BaseException:
        adapterkit.detach(model)
        raise
    log.info("arrow: %d experts, %d prototypes computed, %d read from the library", len(task), len(computed),
             len(task) - len(computed))
    return model


@torch.no_grad()
def _subtract(model: nn.Module, average: Mapping[str, tuple[Tensor, Tensor]], scales: Sequence[float]) -> None:
    """GenKnowSub on the stacked experts, as PEFT on its raw factors: ``s_k (A_k - mean A)(B_k - mean B)``.

    ``adapterkit.stack`` keeps equal LoRA scales as they are; differing ones it folds into
    each expert's factors (``sqrt|s_k / s|`` into ``A_k``, with the sign into ``B_k``, for the
    stack's scale ``s``), so the mean is subtracted with the same factors."""
    for name, site in adapterkit.sites(model).items():
        if name not in average:
            raise adapterkit.AdapterkitError(f"the general adapters do not adapt site {name!r}")
        a, b = _stacked(site, "A"), _stacked(site, "B")  # [K, ...]
        own = float(getattr(site, "scale", 1.0))
        fa, fb = [], []
        for scale in scales:
            ratio = scale / own
            root = 1.0 if math.isclose(ratio, 1.0, rel_tol=1e-12) else math.sqrt(abs(ratio))
            fa.append(root)
            fb.append(root if ratio > 0 else -root)
        mean_a, mean_b = average[name]
        if mean_a.shape != a.shape[1:] or mean_b.shape != b.shape[1:]:
            raise adapterkit.AdapterkitError(f"site {name!r}: general adapters of shapes {list(mean_a.shape)}/"
                                             f"{list(mean_b.shape)} do not fit experts of {list(a.shape[1:])}/"
                                             f"{list(b.shape[1:])}")
        a.sub_(torch.tensor(fa, dtype=a.dtype, device=a.device).view(-1, 1, 1) * mean_a.to(a))
        b.sub_(torch.tensor(fb, dtype=b.dtype, device=b.device).view(-1, 1, 1) * mean_b.to(b))


def _router(site: adapterkit.AdapterSite) -> ArrowRouter:
    router = site.router
    assert isinstance(router, ArrowRouter)
    return router


def _stacked(site: adapterkit.AdapterSite, name: str) -> Tensor:
    weight = site.projections[name].weight  # a stacked site's dense [K, *shape] parameter
    assert isinstance(weight, Tensor)
    return weight


def _arrow_sites(model: nn.Module) -> dict[str, adapterkit.AdapterSite]:
    found = {n: s for n, s in adapterkit.sites(model).items() if isinstance(s.router, ArrowRouter)}
    if not found:
        raise adapterkit.AdapterkitError("the model has no sites routed by 'arrow'")
    return found


@torch.no_grad()
def install(
    model: nn.Module, keys: Sequence[str | None], names: Sequence[str], digests: Sequence[str],
    store: PrototypeStore | None, general: Sequence[str] = (),
) -> list[str]:
    """Give every arrow site its prototypes: read from ``store`` where present, the rest
    computed from the site's weights in one batched pass (and written to ``store``).
    Returns the names of the experts computed."""
    found = _arrow_sites(model)
    features = {n: int(_router(s).prototypes.shape[1]) for n, s in found.items()}
    have = store.keys() if store is not None else set()
    rows: dict[int, dict[str, Tensor]] = {}
    for k, key in enumerate(keys):
        if store is not None and key is not None and key in have:
            got = store.read(key, features)
            if got is not None:
                rows[k] = got
    missing = [k for k in range(len(keys)) if k not in rows]
    computed: dict[str, Tensor] = {}
    if missing:
        index = torch.tensor(missing)
        for name, site in found.items():
            w = site.expected_weights()
            computed[name] = top_right_singular_vectors(w["A"][index.to(w["A"].device)],
                                                        w["B"][index.to(w["B"].device)])
    for name, site in found.items():
        router = _router(site)
        protos = torch.empty_like(router.prototypes)
        for k, got in rows.items():
            protos[k] = got[name].to(protos)
        for j, k in enumerate(missing):
            protos[k] = computed[name][j].to(protos)
        router.set_prototypes(protos)
    if store is not None:
        for j, k in enumerate(missing):
            key = keys[k]
            if key is None:
                continue
            try:
                store.write(key, {name: computed[name][j] for name in found}, expert=names[k], digest=digests[k],
                            general=general)
            except adapterkit.AdapterkitError as exc:  # e.g. a read-only library: routing works all the same
                log.warning("arrow: cannot store prototypes of %r: %s", names[k], exc)
                break
    return [names[k] for k in missing]


def compute_prototypes(model: nn.Module) -> nn.Module:
    """Compute every arrow site's prototypes from its current weights (no library): for a
    model stacked with ``router = "arrow"`` by hand, or whose experts changed."""
    found = _arrow_sites(model)
    skills = next(iter(found.values())).skills
    install(model, [None] * skills, [str(k) for k in range(skills)], [""] * skills, None)
    return model
