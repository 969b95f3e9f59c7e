"""Named adapters: several adapters on one frozen base, one active at a time.

``attach(model, recipe, name=...)`` and ``load(url, model, name=...)`` add an adapter under
a name and make it the active one. The active adapter's state sits where an unnamed
adapter's does, so every call (``save``, ``merge``, ``route``, ``summary``, training)
acts on it; the others are parked off the module tree: their sites (wrapping the same
base modules), their state and their trained modules to save. Switching swaps module
references, copying no tensor.

An update folded into base weights (``merge`` with a folding merger) is part of the base
for every adapter until it is unmerged or its adapter deleted, as PEFT's merged adapters
are. :func:`adapterkit.serve` runs batches in which each example picks its adapter.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import attrs
from torch import Tensor, nn

from .attach import (
    NAMED_ATTR,
    STATE_ATTR,
    AttachState,
    attach_one,
    put_saved,
    remove_state,
    restore_requires_grad,
    sites,
    state_of,
    unfold,
    unwrap,
)
from .errors import AdapterkitError, AttachError
from .plugins import PluginHost
from .recipe import Recipe
from .site import AdapterSite, module_device
from .task_ids import install_keyword, remove_keyword

DEFAULT_NAME = "default"  # what an unnamed adapter is called once a named one joins it
BASE_NAMES = ("__base__",)  # an example's choice of no adapter (PEFT's name for it), besides None
MAX_NAME = 200


@attrs.define
class Parked:
    """An adapter off the module tree: its state, its sites and its trained modules to save."""

    state: AttachState
    sites: dict[str, AdapterSite]
    saved: dict[str, dict[str, Tensor]]


@attrs.define
class Named:
    """Kept on the model under ``_adapterkit_named``."""

    parked: dict[str, Parked | None]  # by name in attach order; None: the active adapter
    active: str | None
    requires_grad: dict[str, bool]  # every parameter's, from before the first attach
    serving: Any = None  # adapterkit.serving.Serving while the model serves mixed batches


def registry(model: nn.Module) -> Named | None:
    named: Named | None = getattr(unwrap(model), NAMED_ATTR, None)
    return named


def _registry(model: nn.Module) -> Named:
    named = registry(model)
    if named is None:
        raise AdapterkitError("the model holds no named adapters; attach one with adapterkit.attach(model, recipe, "
                              "name=...) or adapterkit.load(url, model, name=...)")
    return named


def _known(model: nn.Module, name: str) -> Named:
    named = _registry(model)
    if name not in named.parked:
        raise AdapterkitError(f"no adapter named {name!r}; the model holds {list(named.parked)}")
    return named


def adapters(model: nn.Module) -> list[str]:
    """The names of the model's named adapters, in the order they were added."""
    named = registry(model)
    return list(named.parked) if named is not None else []


def active_adapter(model: nn.Module) -> str | None:
    """The name of the active adapter (``None``: none is, or the model serves mixed batches)."""
    named = registry(model)
    return named.active if named is not None else None


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not name or len(name) > MAX_NAME or not name.isprintable():
        raise AttachError(None, f"an adapter name is a printable string of 1 to {MAX_NAME} characters, got {name!r}")
    if name in BASE_NAMES:
        raise AttachError(None, f"{name!r} means 'no adapter' in mixed batches; choose another name")
    return name


def adopt(model: nn.Module) -> Named:
    """The model's registry, made on first use; an unnamed adapter joins it as ``default``."""
    named = registry(model)
    if named is not None:
        return named
    state: AttachState | None = getattr(model, STATE_ATTR, None)
    if state is None:
        named = Named({}, None, {n: p.requires_grad for n, p in model.named_parameters()})
    else:
        named = Named({DEFAULT_NAME: None}, DEFAULT_NAME, dict(state.requires_grad))
    setattr(model, NAMED_ATTR, named)
    return named


def _forget_if_empty(model: nn.Module, named: Named) -> None:
    if not named.parked:
        restore_requires_grad(model, named.requires_grad)
        delattr(model, NAMED_ATTR)


def park(model: nn.Module, named: Named) -> None:
    """Take the active adapter off the tree (bases back at its sites, original modules to save)."""
    from .serving import stop_serving

    stop_serving(model)
    if named.active is None:
        return
    state: AttachState = getattr(model, STATE_ATTR)
    current = sites(model)
    for site_name, site in current.items():
        model.set_submodule(site_name, site.base)
    trained = put_saved(model, state.saved)
    remove_keyword(model)
    delattr(model, STATE_ATTR)
    named.parked[named.active] = Parked(state, current, trained)
    named.active = None


def unpark(model: nn.Module, named: Named, name: str) -> None:
    parked = named.parked[name]
    assert parked is not None
    for site_name, site in parked.sites.items():
        site.to(device=module_device(site.base))  # the model may have moved while this adapter was parked
        model.set_submodule(site_name, site)
    put_saved(model, parked.saved)
    setattr(model, STATE_ATTR, parked.state)
    if any(site.router.needs_task_ids for site in parked.sites.values()):
        install_keyword(model)
    named.parked[name] = None
    named.active = name


def activate(model: nn.Module, name: str) -> nn.Module:
    """Make the named adapter ``name`` the active one (the one every call acts on); returns the model."""
    model = unwrap(model)
    named = _known(model, name)
    if named.active == name and named.serving is None:
        return model
    park(model, named)
    unpark(model, named, name)
    return model


def deactivate(model: nn.Module) -> nn.Module:
    """Run the bare base (plus folded updates): park the active adapter, keep every named one."""
    model = unwrap(model)
    park(model, _registry(model))
    return model


@contextlib.contextmanager
def using(model: nn.Module, name: str | None) -> Iterator[nn.Module]:
    """Make ``name`` active inside the block (``None``: leave things as they are), then
    restore what was active, or serving, before."""
    model = unwrap(model)
    if name is None:
        yield model
        return
    named = _registry(model)
    before, serving = named.active, named.serving
    activate(model, name)
    try:
        yield model
    finally:
        if serving is not None:
            from .serving import resume_serving

            park(model, named)
            resume_serving(model, serving)
        elif before != name:
            park(model, named)
            if before is not None and before in named.parked:
                unpark(model, named, before)


def delete(model: nn.Module, name: str) -> nn.Module:
    """Remove the named adapter ``name`` (its folded updates are subtracted from the base
    weights); with the last one gone the model is bare again, as after ``detach``."""
    model = unwrap(model)
    named = _known(model, name)
    park(model, named)
    parked = named.parked.pop(name)
    assert parked is not None
    unfold(parked.state.folded)
    _forget_if_empty(model, named)
    return model


def detach_all(model: nn.Module) -> None:
    """``detach`` of a model with named adapters: every one removed, the model bare."""
    named = _registry(model)
    for name in list(named.parked):
        delete(model, name)


def _check_compatible(model: nn.Module, named: Named, name: str) -> None:
    """Adapters on one model share their sites: the same kind on the same modules."""
    new = state_of(model)
    for other, parked in named.parked.items():
        if parked is None:
            continue
        state = parked.state
        if state.origin.kind != new.origin.kind:
            raise AttachError(None, f"adapter {name!r} is a {new.origin.kind!r} adapter and {other!r} a "
                                    f"{state.origin.kind!r} one; named adapters on one model share one kind")
        if set(state.originals) != set(new.originals):
            extra = sorted(set(new.originals) ^ set(state.originals))
            raise AttachError(None, f"adapter {name!r} and {other!r} adapt different modules (e.g. {extra[0]!r}); "
                                    "named adapters on one model adapt the same modules")


def add_named(model: nn.Module, name: str, make: Callable[[], object]) -> nn.Module:
    """Park the active adapter, run ``make()`` (which attaches or loads onto the bare
    sites), check the result fits beside the others and make it active as ``name``. A
    refused or failing ``make`` leaves the model as it was."""
    model = unwrap(model)
    check_name(name)
    fresh = registry(model) is None
    taken = [DEFAULT_NAME] if fresh and hasattr(model, STATE_ATTR) else adapters(model)
    if name in taken:
        raise AttachError(None, f"the model already holds an adapter named {name!r}; "
                                f"adapterkit.delete(model, {name!r}) first")
    named = adopt(model)
    with restored_on_error(model, named, fresh):
        make()
        _check_compatible(model, named, name)
    named.parked[name] = None
    named.active = name
    return model


@contextlib.contextmanager
def restored_on_error(model: nn.Module, named: Named, fresh: bool) -> Iterator[None]:
    """Park the active adapter (or leave serving) for the block; should it fail, remove what
    it attached and put back what was active or served (``fresh``: a registry made for the
    block goes too), so a refused call leaves the model as it was."""
    before, serving = named.active, named.serving
    park(model, named)
    try:
        yield
    except BaseException:
        if hasattr(model, STATE_ATTR):
            remove_state(model)
        if before is not None:
            unpark(model, named, before)
        elif serving is not None:
            from .serving import resume_serving

            resume_serving(model, serving)
        if fresh:
            delattr(model, NAMED_ATTR)
        raise


def load_named(model: nn.Module, name: str, load: Callable[[], object]) -> nn.Module:
    """``load(url, model, name=name)``: into the named adapter ``name`` if the model holds
    one (made active), else as a new named adapter."""
    named = registry(model)
    if named is not None and name in named.parked:
        activate(model, name)
        load()
        return model
    return add_named(model, name, load)


def attach_named(model: nn.Module, recipe: Recipe, name: str, *, host: PluginHost | None = None) -> nn.Module:
    """``attach(model, recipe, name=name)``."""
    return add_named(model, name, lambda: attach_one(model, recipe, host=host))
