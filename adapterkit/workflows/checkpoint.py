"""Checkpoints: everything a run needs to continue bit-exactly, in one safetensors file.

Tensors: the trained state (adapter tensors, head) under ``model.``, the optimizer
state under ``optim.<param>.<key>``. Metadata (JSON): the step, the optimizer's
param groups and scalar state, the scheduler state, the world size and the config
fingerprint. No pickle: a checkpoint loads with :func:`adapterkit.storage.load_tensors`
like any adapter. No secrets: the fingerprint holds no storage options or credentials.
The RNG needs no state: both streams are re-derived from ``(seed, step)`` at every
step (see :mod:`adapterkit.workflows.distributed`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..errors import AdapterkitError
from ..storage import inspect, load_tensors, save_tensors
from ..zoo import Classifier
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
    return {**keep, "train": train}


def save_checkpoint(
    url: str,
    classifier: Classifier,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    *,
    step: int,
    world: int,
    config: dict[str, Any],
    storage_options: Mapping[str, Any] | None = None,
) -> None:
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
    }
    save_tensors(tensors, url, metadata={KEY: json.dumps(meta)}, storage_options=storage_options)


def load_checkpoint(
    url: str,
    classifier: Classifier,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    *,
    config: dict[str, Any],
    storage_options: Mapping[str, Any] | None = None,
) -> int:
    """Restore a checkpoint into a freshly built run; returns the step to continue from."""
    info = inspect(url, storage_options=storage_options)
    if KEY not in info.metadata:
        raise AdapterkitError(f"{url!r} is not a training checkpoint")
    meta = json.loads(info.metadata[KEY])
    ours = fingerprint(config)
    for section in ours:
        if meta["fingerprint"].get(section) != ours[section]:
            raise AdapterkitError(
                f"checkpoint {url!r} was written by a run with a different [{section}] config; "
                "resume with the same config"
            )
    tensors = load_tensors(url, storage_options=storage_options)
    load_trainable_state(classifier, {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    for pid, entries in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(entries)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    return int(meta["step"])
