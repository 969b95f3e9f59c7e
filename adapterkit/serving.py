"""Mixed-adapter batches: every example picks its own adapter, in one pass per layer.

:func:`serve` packs adapters (the model's named adapters, and lazily a library's) into one
site per adapted module: the kind's own site with one skill per adapter slot plus an
all-zero slot for "no adapter", each adapter's weights zero-padded to the largest rank
with its scale folded in (``AdapterSite.serving_weights``), and a router that *selects*
(``Router.selects``): the site gathers each example's weights and runs its usual
per-example path (``[b, p, r]`` batched GEMMs). No host sync and no module changes per
call, so ``torch.compile(fullgraph=True)`` sees one graph; ``generate`` repeats each
example's choice for its beams, as for task ids.

Choices reach the sites as task ids do: ``model(..., adapter_names=[...])`` (names,
``None`` or ``"__base__"`` for the bare base), ``task_ids=`` slot ids (``-1``: none), or
``with adapterkit.route(model, names_or_ids):``. Library adapters are loaded on first use
(digests verified, as ``load``) into at most ``resident`` slots, least recently used out.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .attach import (
    NAMED_ATTR,
    STATE_ATTR,
    AttachState,
    kind_configs,
    override_for,
    remove_state,
    sites,
    summarize,
    unwrap,
)
from .errors import AdapterkitError, RoutingError
from .named import BASE_NAMES, DEFAULT_NAME, Named, adopt, registry, restored_on_error
from .plugins import PluginHost, get_host
from .recipe import Recipe
from .roles import Router, Sampler, Splitter
from .site import AdapterSite, RoutingState
from .task_ids import checked_task_ids, install_keyword, remove_keyword

if TYPE_CHECKING:
    from .library import Entry, Library


class Select(Router):
    """Slot ``i`` for task id ``i``, one-hot: the site gathers, :meth:`forward` is only the definition."""

    needs_task_ids = True
    selects = True

    def __init__(self, slots: int) -> None:
        super().__init__(None, heads=1, skills=slots, generator=torch.Generator())

    @property
    def n_tasks(self) -> int | None:
        return self.skills

    def forward(self, task_ids: Tensor | None) -> Tensor:
        assert task_ids is not None
        return F.one_hot(task_ids, self.skills).to(torch.float32).unsqueeze(1)


@attrs.define(eq=False)
class Serving:
    """The packed sites of a serving model and which adapter each slot holds.

    Slots ``0 .. capacity-1`` hold adapters (``names``; ``None``: empty); slot ``capacity``
    is all zeros, the bare base. ``pinned`` adapters (the model's named ones) never leave;
    library adapters take the free slots, least recently used out (``lru``)."""

    sites: dict[str, AdapterSite]
    names: list[str | None]
    state: AttachState
    pinned: frozenset[str] = frozenset()
    library: Library | None = None
    entries: dict[str, Entry] = attrs.field(factory=dict)
    lru: OrderedDict[str, None] = attrs.field(factory=OrderedDict)
    loads: int = 0  # library adapters read so far (each miss reads one file)

    @property
    def capacity(self) -> int:
        return len(self.names)

    def ids(self, model: nn.Module, choices: Any, device: torch.device) -> Tensor:
        """Slot ids for ``choices``: names (``None``/``"__base__"``: the base) or slot ids
        (``-1``: the base). Names of library adapters not resident are loaded here."""
        if isinstance(choices, str):
            choices = [choices]
        if isinstance(choices, Sequence) and any(c is None or isinstance(c, str) for c in choices):
            return torch.tensor(self._slots(model, list(choices)), dtype=torch.long, device=device)
        ids = torch.as_tensor(choices, device=device)
        if ids.dim() == 0:
            ids = ids.reshape(1)
        if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise RoutingError(f"adapter ids must be a 1-D integer tensor, got shape {tuple(ids.shape)} "
                               f"dtype {ids.dtype}")
        ids = ids.long()
        n = self.capacity
        if torch.compiler.is_compiling():
            torch._assert_async(((ids >= -1) & (ids <= n)).all(), f"adapter ids must lie in [-1, {n}]")
        elif ids.numel() and (int(ids.min()) < -1 or int(ids.max()) > n):
            bad = sorted({i for i in ids.tolist() if not -1 <= i <= n})
            raise RoutingError(f"adapter ids must lie in [-1, {n}] ({n} slots, -1 or {n}: no adapter); "
                               f"out of range: {bad[:8]}")
        return torch.where(ids < 0, n, ids)

    def _slots(self, model: nn.Module, choices: list[str | None]) -> list[int]:
        if torch.compiler.is_compiling():
            raise RoutingError("a compiled model takes adapter ids: pass task_ids=adapterkit.adapter_ids(model, names)")
        base = self.capacity
        wanted = [c for c in dict.fromkeys(choices) if c is not None and c not in BASE_NAMES]
        for name in wanted:
            if not isinstance(name, str):
                raise RoutingError(f"adapter choices are names, None or '__base__', got {name!r}")
            if name not in self.names and name not in self.entries:
                known = list(dict.fromkeys([*(n for n in self.names if n is not None), *sorted(self.entries)]))
                raise RoutingError(f"no adapter named {name!r} is served; served: {known[:8]}"
                                   + (f" ... ({len(known)} in all)" if len(known) > 8 else ""))
        missing = [n for n in wanted if n not in self.names]
        free = base - len(self.pinned)
        from_library = [n for n in wanted if n not in self.pinned]
        if len(from_library) > free:
            raise RoutingError(f"this batch names {len(from_library)} library adapters but {free} slots are free "
                               f"for them; serve with a larger resident= or split the batch")
        for name in missing:
            self._load(model, name, keep=set(wanted))
        for name in wanted:
            if name in self.lru:
                self.lru.move_to_end(name)
        slot = {n: i for i, n in enumerate(self.names) if n is not None}
        return [base if c is None or c in BASE_NAMES else slot[c] for c in choices]

    def _load(self, model: nn.Module, name: str, keep: set[str]) -> None:
        """Read the library adapter ``name`` into a free slot, or the least recently used one."""
        entry = self.entries[name]
        if None in self.names:
            slot = self.names.index(None)
        else:
            victim = next(n for n in self.lru if n not in keep)
            del self.lru[victim]
            slot = self.names.index(victim)
        assert self.library is not None
        weights = _read_weights(model, self, entry.url, self.library.storage_options)
        _fill(self.sites, slot, weights, name)
        self.names[slot] = name
        self.lru[name] = None
        self.loads += 1


def serve(
    model: nn.Module,
    adapters: Sequence[str] | None = None,
    *,
    library: Library | None = None,
    entries: Sequence[Entry] | None = None,
    resident: int = 8,
    host: PluginHost | None = None,
) -> nn.Module:
    """Serve mixed batches: each example picks its adapter (``adapter_names=`` or
    ``task_ids=`` on the forward and ``generate``, or ``adapterkit.route``).

    ``adapters``: the named adapters to pack (default: all of them; each stays loaded).
    ``library``: its adapters (or the selection ``entries``, e.g. ``library.select(tags=...)``)
    are served too, each loaded on first use into one of ``resident`` slots (least
    recently used out); nothing is read from the library but its manifest until then. The packs are a snapshot of the
    adapters' eval weights: ``activate(model, name)`` leaves serving (to train, save or
    merge one) and ``serve`` again packs the current weights. Returns the model.
    """
    model = unwrap(model)
    host = host or get_host()
    existing = registry(model)
    held = list(existing.parked) if existing is not None else [DEFAULT_NAME] if hasattr(model, STATE_ATTR) else []
    chosen = held if adapters is None else list(adapters)
    unknown = [n for n in chosen if n not in held]
    if unknown:
        raise AdapterkitError(f"no named adapter {unknown[0]!r}; the model holds {held}")
    if library is None and not chosen:
        raise AdapterkitError("nothing to serve: the model holds no named adapters and no library was given")
    if library is not None and resident < 1:
        raise AdapterkitError(f"resident must be at least 1 to serve a library, got {resident}")
    if entries is not None and library is None:
        raise AdapterkitError("entries= is a selection of a library: pass the library too")
    selection = None if library is None else {e.name: e for e in (library.entries() if entries is None else entries)}
    if not chosen and not selection:
        raise AdapterkitError("nothing to serve: the model holds no named adapters and the library selection is empty")
    clash = sorted(set(selection or ()) & set(chosen))
    if clash:
        raise AdapterkitError(f"the library holds an adapter named {clash[0]!r}, as the model does; "
                              "rename one (a batch names each adapter once)")
    named = adopt(model)
    with restored_on_error(model, named, fresh=existing is None):
        serving = _pack(model, named, chosen, library, selection or {}, resident if library is not None else 0, host)
    resume_serving(model, serving)
    serving.state.summary = summarize(model, serving.state.origin, serving.sites)  # nothing trains: 0 trainable
    return model


def _pack(
    model: nn.Module, named: Named, chosen: list[str], library: Library | None, entries: dict[str, Entry],
    resident: int, host: PluginHost,
) -> Serving:
    """Build the packed sites (the model is bare: every adapter parked)."""
    live: dict[str, dict[str, AdapterSite]] = {}
    for name in chosen:
        parked = named.parked[name]
        assert parked is not None
        if parked.state.folded:
            raise AdapterkitError(f"adapter {name!r} has updates folded into the base weights (for every adapter); "
                                  f"adapterkit.activate(model, {name!r}); adapterkit.unmerge(model) first, "
                                  "or serve without it")
        live[name] = parked.sites
    kind, configs = _plan(live, entries, host)
    first = named.parked[chosen[0]] if chosen else None
    if first is not None:
        origin = first.state.origin
    else:  # library adapters only: the first one's recipe (_plan refused entries without one)
        recipe = next(iter(entries.values())).recipe
        assert recipe is not None
        origin = Recipe.from_dict(recipe)
    bases = {site_name: model.get_submodule(site_name) for site_name in sorted(configs)}
    slots = len(chosen) + resident
    routing = RoutingState()
    packed = {}
    for site_name, base in bases.items():
        try:
            packed[site_name] = kind(
                base, configs[site_name], name=site_name, skills=slots + 1, splitter=Splitter(), sampler=Sampler(),
                make_router=lambda heads: Select(slots + 1), routing=routing, generator=torch.Generator(),
            )
        except ValueError as exc:
            raise AdapterkitError(f"cannot serve site {site_name!r}: {exc}") from None
    with torch.no_grad():
        for site in packed.values():
            site.requires_grad_(False)
            site.eval()
            for param in site.projections.parameters():
                param.zero_()  # every slot starts as "no adapter"
    state = AttachState(None, origin, routing, bases, {}, n_tasks=slots + 1)
    serving = Serving(packed, [None] * slots, state, frozenset(chosen), library, entries)
    state.serving = serving
    for slot, name in enumerate(chosen):
        try:
            weights = {s: site.serving_weights() for s, site in live[name].items()}
        except ValueError as exc:
            raise AdapterkitError(f"cannot serve adapter {name!r}: {exc}") from None
        _fill(packed, slot, weights, name)
        serving.names[slot] = name
    return serving


def _plan(
    live: Mapping[str, Mapping[str, AdapterSite]], entries: Mapping[str, Entry], host: PluginHost
) -> tuple[type[AdapterSite], dict[str, Any]]:
    """The kind and, per site, the config serving every adapter's (checked to agree)."""
    kinds: dict[str, type[AdapterSite]] = {}
    site_sets: dict[str, set[str]] = {}
    configs: dict[str, list[Any]] = {}
    for name, found in live.items():
        kinds[name] = type(next(iter(found.values())))
        site_sets[name] = set(found)
        for site_name, site in found.items():
            configs.setdefault(site_name, []).append(site.config)
    for name, entry in entries.items():
        if entry.content != "adapter" or entry.recipe is None:
            raise AdapterkitError(f"library adapter {name!r} holds {entry.content} without a recipe; cannot serve it")
        recipe = Recipe.from_dict(entry.recipe)
        if recipe.kind not in host.kinds:
            raise AdapterkitError(f"library adapter {name!r} needs adapter kind {recipe.kind!r}, not installed")
        cls = host.kinds[recipe.kind]
        kinds[name] = cls
        site_sets[name] = set(entry.sites)
        by_pattern = kind_configs(cls, recipe)
        for site_name in entry.sites:
            configs.setdefault(site_name, []).append(by_pattern[override_for(recipe, site_name)])
    first = next(iter(kinds))
    for name in kinds:
        if kinds[name] is not kinds[first]:
            raise AdapterkitError(f"adapters {first!r} and {name!r} are of different kinds "
                                  f"({kinds[first].kind!r}, {kinds[name].kind!r}); one pack serves one kind")
        if site_sets[name] != site_sets[first]:
            other = sorted(site_sets[name] ^ site_sets[first])[0]
            raise AdapterkitError(f"adapters {first!r} and {name!r} adapt different modules (e.g. {other!r}); "
                                  "one pack serves adapters on the same modules")
    kind = kinds[first]
    try:
        return kind, {site_name: kind.serving_config(found) for site_name, found in configs.items()}
    except ValueError as exc:
        raise AdapterkitError(f"cannot serve these adapters together: {exc}") from None


@torch.no_grad()
def _fill(packed: Mapping[str, AdapterSite], slot: int, weights: Mapping[str, Mapping[str, Tensor]], name: str) -> None:
    """Copy one adapter's serving weights into ``slot`` of every packed site, zero-padded."""
    if set(weights) != set(packed):
        raise AdapterkitError(f"adapter {name!r} adapts other modules than the served ones")
    for site_name, site in packed.items():
        for proj, value in weights[site_name].items():
            target = site.projections[proj].weight[slot]  # type: ignore[index]
            if value.dim() != target.dim() or any(v > t for v, t in zip(value.shape, target.shape, strict=True)):
                raise AdapterkitError(f"adapter {name!r}: {site_name}.{proj} is {tuple(value.shape)}, larger than "
                                      f"the served {tuple(target.shape)}; serve it with its peers from the start")
            target.zero_()
            target[tuple(slice(0, n) for n in value.shape)].copy_(value)


def _read_weights(
    model: nn.Module, serving: Serving, url: str, storage_options: Mapping[str, Any]
) -> dict[str, dict[str, Tensor]]:
    """A library adapter's serving weights: loaded (verified) onto the bare bases, read, removed."""
    from .storage.api import load_one

    with _bare(model, serving):
        load_one(url, model, storage_options=storage_options)
        try:
            return {name: site.serving_weights() for name, site in sites(model).items()}
        except ValueError as exc:
            raise AdapterkitError(f"cannot serve {url!r}: {exc}") from None
        finally:
            remove_state(model)


@contextlib.contextmanager
def _bare(model: nn.Module, serving: Serving) -> Iterator[None]:
    stop_serving(model)
    try:
        yield
    finally:
        resume_serving(model, serving)


def resume_serving(model: nn.Module, serving: Serving) -> None:
    """Put the packed sites in the tree and the serving state on the model."""
    named: Named = getattr(model, NAMED_ATTR)
    for site_name, site in serving.sites.items():
        model.set_submodule(site_name, site)
    setattr(model, STATE_ATTR, serving.state)
    install_keyword(model)
    named.serving = serving


def stop_serving(model: nn.Module) -> None:
    """Take the packed sites out (bases back); no-op when the model does not serve."""
    named: Named | None = getattr(model, NAMED_ATTR, None)
    if named is None or named.serving is None:
        return
    for site_name, base in named.serving.state.originals.items():
        model.set_submodule(site_name, base)
    remove_keyword(model)
    delattr(model, STATE_ATTR)
    named.serving = None


def serving_of(model: nn.Module) -> Serving:
    named: Named | None = getattr(unwrap(model), NAMED_ATTR, None)
    if named is None or named.serving is None:
        raise AdapterkitError("the model does not serve mixed batches; adapterkit.serve(model) first")
    return named.serving  # type: ignore[no-any-return]


def adapter_ids(model: nn.Module, choices: Sequence[str | None]) -> Tensor:
    """Slot ids for adapter names (``None``/``"__base__"``: the base), loading library
    adapters that are not resident: what a compiled model takes as ``task_ids=``. Valid
    until a later call loads other library adapters into the slots."""
    serving_of(model)  # (the error when the model does not serve)
    return checked_task_ids(model, list(choices))


def served(model: nn.Module) -> list[str | None]:
    """What each slot of a serving model holds (``None``: empty); ids index this list."""
    return list(serving_of(model).names)

