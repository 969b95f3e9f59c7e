"""Checkpoints: everything a run needs to continue bit-exactly, in one safetensors file.

Tensors: the trained state (adapter tensors, head) under ``model.``, the optimizer
state under ``optim.<param>.<key>``. Metadata (JSON): the step, the optimizer's
param groups and scalar state, the scheduler state, the world size and the config
fingerprint. No pickle: a checkpoint loads with :func:`adapterkit.storage.load_tensors`
like any adapter. No secrets: the fingerprint holds no storage options or credentials.
The RNG needs no state: both streams are re-derived from ``(seed, step)`` at every
step (see :mod:`adapterkit.workflows.distributed`). A streamed run also records its
stream position (epoch, examples consumed), which a resumed run checks against its step.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from ..errors import AdapterkitError
from ..storage import inspect, load_tensors, save_tensors
from ..storage.errors import printable
from ..storage.format import MAX_JSON_DEPTH, loads_bounded
from ..zoo import WorkflowModel
from .config import without_secrets
from .models import load_trainable_state, trainable_state

KEY = "checkpoint"


def fingerprint(config: dict[str, Any]) -> dict[str, Any]:
    """The parts of a config a resumed run must share (not outputs, logging or device),
    without storage options or credentials (:func:`~.config.without_secrets`): the
    checkpoint stores it, and a run resumed with rotated keys is the same run."""
    config = without_secrets(config)
    train = {k: v for k, v in config.get("train", {}).items() if k not in ("device", "log_every", "threads")}
    keep = {k: config.get(k) for k in ("recipe", "model", "data", "optim")}
    if isinstance(keep["data"], dict):  # how many processes read a stream does not change what they read
        keep["data"] = {k: v for k, v in keep["data"].items() if k != "workers"}
    # in its JSON form, as the checkpoint stores it (tuples such as optim.no_decay read back as lists)
    return json.loads(json.dumps({**keep, "train": train}))  # type: ignore[no-any-return]


def save_checkpoint(
    url: str,
    classifier: WorkflowModel,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    *,
    step: int,
    world: int,
    config: dict[str, Any],
    storage_options: Mapping[str, Any] | None = None,
    stream: Mapping[str, int] | None = None,
) -> None:
    """``stream``: a streamed run's position after ``step`` (:func:`~.stream.position`)."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in trainable_state(classifier).items()}
    state = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entries in state["state"].items():
        for key, value in entries.items():
            if isinstance(value, Tensor):
                tensors[f"optim.{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    meta = {
        "step": step,
        "world": world,
        "fingerprint": fingerprint(config),
        "param_groups": state["param_groups"],
        "scalars": scalars,
        "scheduler": scheduler.state_dict(),
        **({"stream": dict(stream)} if stream is not None else {}),
    }
    save_tensors(tensors, url, metadata={KEY: json.dumps(meta)}, storage_options=storage_options)


def load_checkpoint(
    url: str,
    classifier: WorkflowModel,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    *,
    config: dict[str, Any],
    storage_options: Mapping[str, Any] | None = None,
    stream: Callable[[int], Mapping[str, int]] | None = None,
) -> int:
    """Restore a checkpoint into a freshly built run; returns the step to continue from.

    ``stream``: a streamed run's position after a step; the recorded one must be it (the
    stream then skips the records consumed before the step)."""
    info = inspect(url, storage_options=storage_options)
    if KEY not in info.metadata:
        raise AdapterkitError(f"{url!r} is not a training checkpoint")
    meta = _metadata(info.metadata[KEY], url)
    ours = fingerprint(config)
    for section in ours:
        if meta["fingerprint"].get(section) != ours[section]:
            raise AdapterkitError(
                f"checkpoint {url!r} was written by a run with a different [{section}] config; "
                "resume with the same config"
            )
    if stream is not None and meta.get("stream") != dict(stream(meta["step"])):
        raise _malformed(url, f"stream position {meta.get('stream')} is not where step {meta['step']} stands")
    tensors = load_tensors(url, storage_options=storage_options)
    load_trainable_state(classifier, {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, pid, key = (name.split(".", 2) + ["", ""])[:3]
            if not (pid.isdigit() and key):
                raise _malformed(url, f"tensor {name!r} is not optim.<parameter>.<state>")
            state.setdefault(int(pid), {})[key] = value
    for pid, entries in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(entries)
    # values the optimizer and scheduler would only trip over mid-run: each saved field
    # must be one this run's own state has, of the same kind
    own_groups = optimizer.state_dict()["param_groups"]
    groups = enumerate(zip(meta["param_groups"], own_groups, strict=False))
    pairs = [(f"param_groups[{i}]", saved, own) for i, (saved, own) in groups]
    for where, saved, own in (*pairs, ("scheduler", meta["scheduler"], scheduler.state_dict())):
        for key, value in saved.items():
            if key not in own or _kind(value) != _kind(own[key]):
                raise _malformed(url, f"{where} field {key!r} does not fit this run's {_kind(own.get(key))}")
    try:
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        scheduler.load_state_dict(meta["scheduler"])
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as exc:
        reason = f"no {exc}" if isinstance(exc, KeyError) else str(exc).splitlines()[0] if str(exc) else repr(exc)
        raise AdapterkitError(
            f"checkpoint {url!r}: its optimizer or scheduler state does not fit this run ({printable(reason, 300)})"
        ) from None
    return int(meta["step"])


# what each metadata field of a checkpoint must be
_FIELDS: dict[str, tuple[type, ...]] = {
    "step": (int,),
    "world": (int,),
    "fingerprint": (dict,),
    "param_groups": (list,),
    "scalars": (dict,),
    "scheduler": (dict,),
}


def _malformed(url: str, reason: str) -> AdapterkitError:
    return AdapterkitError(f"checkpoint {url!r}: malformed checkpoint metadata ({printable(reason, 300)})")


def _kind(value: Any) -> str:
    """A JSON value's kind, numbers alike (``1`` and ``1.0``), lists and tuples alike."""
    if value is None or isinstance(value, (bool, str, dict)):
        return type(value).__name__
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, (list, tuple)):
        return "list of " + ",".join(sorted({_kind(v) for v in value}))
    return type(value).__name__


def _metadata(text: str, url: str) -> dict[str, Any]:
    """The checkpoint's metadata, each field of the type it must have (one-line errors:
    a checkpoint is a file like any other, and its digests only say it is unchanged)."""
    try:
        meta = loads_bounded(text, MAX_JSON_DEPTH)
    except ValueError as exc:
        raise _malformed(url, f"not JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise _malformed(url, f"expected a JSON object, got {type(meta).__name__}")
    for key, types in _FIELDS.items():
        if key not in meta:
            raise _malformed(url, f"no {key!r}")
        value = meta[key]
        if not isinstance(value, types) or isinstance(value, bool):
            raise _malformed(url, f"{key!r} must be a {types[0].__name__}, got {type(value).__name__}")
    if meta["step"] < 0 or meta["world"] < 1:
        raise _malformed(url, f"step {meta['step']} / world {meta['world']} out of range")
    if not all(isinstance(group, dict) for group in meta["param_groups"]):
        raise _malformed(url, "'param_groups' must be a list of objects")
    for pid, entries in meta["scalars"].items():
        if not pid.isdigit() or not isinstance(entries, dict):
            raise _malformed(url, f"'scalars' must map parameter numbers to objects, got {pid!r}")
        if not all(_kind(v) in ("number", "bool", "NoneType") for v in entries.values()):
            raise _malformed(url, f"'scalars' of parameter {pid} must be numbers")
    return meta
