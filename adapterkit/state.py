"""What an attached model holds (``_adapterkit``) and how public calls find it through wrappers."""

from __future__ import annotations

from typing import Any

import attrs
from torch import Tensor, nn

from .errors import AdapterkitError
from .recipe import Recipe
from .site import AdapterSite, RoutingState
from .wording import plural

STATE_ATTR = "_adapterkit"
NAMED_ATTR = "_adapterkit_named"  # named adapters (adapterkit.named): the parked ones and which is active


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
    saved: tuple[SiteSummary, ...] = ()  # modules_to_save: trained fully, saved with the adapter

    def __str__(self) -> str:
        lines = [f"{'site':<48} {'base':<16} {'trainable':>10}"]
        lines += [f"{s.name:<48} {s.base:<16} {s.trainable:>10,}" for s in self.sites]
        lines += [f"{s.name + ' (saved)':<48} {s.base:<16} {s.trainable:>10,}" for s in self.saved]
        share = 100.0 * self.trainable / max(self.total, 1)
        saved = f" + {plural(len(self.saved), 'module')} to save" if self.saved else ""
        lines.append(
            f"{plural(len(self.sites), 'site')}{saved}; "
            f"trainable {self.trainable:,} of {self.total:,} parameters ({share:.3f}%)"
        )
        return "\n".join(lines)


@attrs.define
class AttachState:
    """Kept on the model under ``_adapterkit``: what the model holds now and how it got there.

    ``recipe`` describes the adapter sites the model holds now (``None`` once every site
    was folded); ``folded`` holds the plain single-skill sites whose updates were added to
    their base weights. ``history`` records each step (attach, merge, adapt) with the
    plugin and version that made it. ``originals`` and ``requires_grad`` are what
    :func:`detach` restores.
    """

    recipe: Recipe | None
    origin: Recipe
    routing: RoutingState
    originals: dict[str, nn.Module]
    requires_grad: dict[str, bool]
    folded: dict[str, AdapterSite] = attrs.field(factory=dict)
    history: list[dict[str, Any]] = attrs.field(factory=list)
    undo: list[tuple[dict[str, AdapterSite], Recipe | None, dict[str, AdapterSite]]] = attrs.field(factory=list)
    n_tasks: int | None = None
    summary: AttachSummary | None = None
    # modules_to_save by name: a copy of their tensors from before attach (detach and
    # disabled() put these back, as PEFT's ModulesToSaveWrapper keeps the original module)
    saved: dict[str, dict[str, Tensor]] = attrs.field(factory=dict)
    # mixed-adapter serving (adapterkit.serving.Serving): maps adapter choices to ids; None otherwise
    serving: Any = None


def state_of(model: nn.Module) -> AttachState:
    model = unwrap(model)
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        if hasattr(model, NAMED_ATTR):
            from .named import adapters

            raise AdapterkitError(f"no named adapter is active; adapterkit.activate(model, name) with a name "
                                  f"of {adapters(model)}")
        raise AdapterkitError("model has no adapters attached; call adapterkit.attach(model, recipe) first")
    return state  # type: ignore[no-any-return]


def editable_state(model: nn.Module) -> AttachState:
    """``state_of`` for calls that change or write the adapter: refused while the model serves
    mixed-adapter batches (its sites then hold packed copies, see ``adapterkit.serve``)."""
    state = state_of(model)
    if state.serving is not None:
        raise AdapterkitError("the model serves several adapters in mixed batches; "
                              "adapterkit.activate(model, name) picks one to work on")
    return state


WRAPPER_ATTRS = ("_orig_mod", "module")  # torch.compile's OptimizedModule; DDP, DataParallel, engines


def unwrap(model: nn.Module) -> nn.Module:
    """The attached model inside training and compile wrappers: ``.module`` (DDP,
    DataParallel, accelerate's and DeepSpeed's engines) and ``._orig_mod``
    (``torch.compile``), peeled until a module holds adapterkit state; ``model`` itself
    when none does. Every public call on an attached model goes through it."""
    inner = model
    while not (hasattr(inner, STATE_ATTR) or hasattr(inner, NAMED_ATTR)):
        wrapped = next((m for m in (getattr(inner, a, None) for a in WRAPPER_ATTRS) if isinstance(m, nn.Module)), None)
        if wrapped is None:
            return model
        inner = wrapped
    return inner
