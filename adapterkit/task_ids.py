"""Task ids (and adapter choices) reaching routed sites: ``route`` and the ``task_ids=``
keyword, an instance-level ``forward``/``generate`` installed on routed models."""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .errors import RoutingError
from .state import state_of, unwrap


def checked_task_ids(model: nn.Module, task_ids: Tensor | Sequence[Any] | int) -> Tensor:
    """``task_ids`` as a 1-D long tensor on the model's device, validated (integer dtype,
    range). Eager, the range check reads the ids (one host sync, here and not in the
    sites); inside a compiled region it is a device-side assert, so no graph breaks."""
    state = state_of(model)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if state.serving is not None:  # mixed-adapter batches: names or slot ids (adapterkit.serving)
        return state.serving.ids(model, task_ids, device)  # type: ignore[no-any-return]
    ids = torch.as_tensor(task_ids, device=device)
    if ids.dim() == 0:
        ids = ids.reshape(1)
    if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise RoutingError(f"task ids must be a 1-D integer tensor, got shape {tuple(ids.shape)} dtype {ids.dtype}")
    ids = ids.long()
    n = state.n_tasks
    if n is None or not ids.numel():
        return ids
    if torch.compiler.is_compiling():
        torch._assert_async(((ids >= 0) & (ids < n)).all(), f"task ids must lie in [0, {n})")
    elif int(ids.min()) < 0 or int(ids.max()) >= n:
        bad = sorted({i for i in ids.tolist() if not 0 <= i < n})
        raise RoutingError(f"task ids must lie in [0, {n}); out of range: {bad[:8]}")
    return ids


@contextlib.contextmanager
def route(model: nn.Module, task_ids: Tensor | Sequence[Any] | int) -> Iterator[Tensor]:
    """Make ``task_ids`` (one per example, or one for the whole batch) reach routed sites.

    Validated here, once per forward (range, integer dtype, 1-D), so the sites themselves
    do no host syncs and stay ``torch.compile(fullgraph=True)`` friendly. A routed model
    also takes them as a forward keyword, ``model(**batch, task_ids=ids)``, and
    ``model.generate(..., task_ids=ids)`` repeats them for beams and returned sequences.
    A model serving mixed batches (``adapterkit.serve``) takes adapter names here too.
    """
    model = unwrap(model)
    ids = checked_task_ids(model, task_ids)
    routing = state_of(model).routing
    previous = routing.task_ids
    routing.task_ids = ids
    try:
        yield ids
    finally:
        routing.task_ids = previous


@functools.cache
def _signature_with_task_ids(cls: Any) -> inspect.Signature:
    """``cls.forward``'s signature (without ``self``) plus a keyword-only ``task_ids`` (the
    call also takes ``adapter_names=``, PEFT's keyword, on a serving model)."""
    signature = inspect.signature(cls.forward)
    params = list(signature.parameters.values())[1:]
    at = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD), len(params))
    keyword = inspect.Parameter("task_ids", inspect.Parameter.KEYWORD_ONLY, default=None)
    return signature.replace(parameters=[*params[:at], keyword, *params[at:]])


def _choices(model: nn.Module, task_ids: Any, adapter_names: Any) -> Any:
    """The routing choices of a call: ``task_ids`` or ``adapter_names`` (which needs ``serve``)."""
    if adapter_names is None:
        return task_ids
    if task_ids is not None:
        raise RoutingError("pass task_ids= or adapter_names=, not both")
    if state_of(model).serving is None:
        raise RoutingError("adapter_names= picks adapters in mixed batches: adapterkit.serve(model) first")
    return adapter_names


class TaskIdsForward:
    """The ``forward`` of a routed model's instance: its class's ``forward``, plus
    ``task_ids=`` routed for the call (validated, restored afterwards, also on errors).
    Its signature is the class's plus that keyword, so tools that read it (the Trainer's
    column filter, ``generate``'s argument check) see it. A plain object holding the
    model, so copies and pickles of the model keep it."""

    def __init__(self, model: nn.Module) -> None:
        cls: Any = type(model)
        self.model = model
        self.__signature__ = _signature_with_task_ids(cls)

    def __call__(self, *args: Any, task_ids: Any = None, adapter_names: Any = None, **kwargs: Any) -> Any:
        model = self.model
        forward = type(model).forward
        task_ids = _choices(model, task_ids, adapter_names)
        if task_ids is None:
            return forward(model, *args, **kwargs)
        routing = state_of(model).routing
        previous = routing.task_ids
        routing.task_ids = checked_task_ids(model, task_ids)
        try:
            return forward(model, *args, **kwargs)
        finally:
            routing.task_ids = previous


class TaskIdsGenerate:
    """The ``generate`` of a routed model's instance: with ``task_ids=`` (or inside
    ``route``) the ids stay routed for the whole call (an encoder sees the batch as given)
    and are repeated for each example's beams and returned sequences
    (``RoutingState.repeat``)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, *args: Any, task_ids: Any = None, adapter_names: Any = None, **kwargs: Any) -> Any:
        model = self.model
        task_ids = _choices(model, task_ids, adapter_names)
        routing = state_of(model).routing
        before = routing.repeat
        routing.repeat = True
        try:
            with route(model, task_ids) if task_ids is not None else contextlib.nullcontext():
                return type(model).generate(model, *args, **kwargs)  # type: ignore[attr-defined]
        finally:
            routing.repeat = before


def install_keyword(model: nn.Module) -> None:
    cls: Any = type(model)
    if "forward" not in vars(model) and "task_ids" not in inspect.signature(cls.forward).parameters:
        model.forward = TaskIdsForward(model)  # type: ignore[method-assign]
    if callable(getattr(cls, "generate", None)) and "generate" not in vars(model):
        model.generate = TaskIdsGenerate(model)  # type: ignore[assignment]


def remove_keyword(model: nn.Module) -> None:
    for name, kind in (("forward", TaskIdsForward), ("generate", TaskIdsGenerate)):
        if isinstance(vars(model).get(name), kind):
            del model.__dict__[name]
