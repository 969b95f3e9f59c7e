"""PEFT adapter folders, both ways: the folder format, ``modules_to_save``, and dispatch to
the PEFT formats plugins register (``adapterkit_register_peft_formats``: ``peft_type`` ->
:class:`PeftFormat`; LoRA comes with the LoRA kind, Poly/MHR with the poly plugin).

A PEFT folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` with keys
``base_model.model.<module>.<tensor>``: a format's adapter tensors (``lora_A.weight``, ...)
and, for each module in ``modules_to_save``, that module's own tensors (PEFT 0.21 saves a
``classifier`` head as ``base_model.model.classifier.weight``). Import converts model-free
(:func:`from_peft`); the module names in the file become the recipe's targets and modules
to save, so PEFT's ``target_modules``/``exclude_modules``/``layers_to_transform`` are
honoured as they were resolved when the adapter was saved. A PEFT field adapterkit would
not reproduce exactly is an error naming it, never silent drift.
"""

from __future__ import annotations

import io
import json
import logging
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import fsspec
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor, nn

from .attach import (
    SAVED_PREFIX,
    adapter_state_dict,
    attach,
    editable_state,
    merge,
    saved_module_key,
    saved_modules,
    sites,
    unmerge,
)
from .peft_format import IGNORED, PeftFormat, PeftInteropError, empty
from .plugins import PluginHost, get_host
from .recipe import Recipe
from .roles import Sampler

log = logging.getLogger("adapterkit")

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PREFIX = "base_model.model."


def _format(config: Mapping[str, Any], host: PluginHost) -> tuple[str, PeftFormat]:
    """The config's PEFT type and format after refusing every field it would not reproduce."""
    raw = config.get("peft_type", "")
    peft_type = str(getattr(raw, "value", raw)).upper()  # a PeftType enum in memory, a string in JSON
    registry = host.peft_formats
    if peft_type not in registry:
        raise PeftInteropError(f"PEFT type {config.get('peft_type')!r} is not supported; adapterkit imports "
                               f"{', '.join(sorted(registry)) or 'none (no plugin registers a PEFT format)'}")
    fmt: PeftFormat = registry[peft_type]()
    for key, value in config.items():
        if key in IGNORED or key in fmt.fields or empty(value):
            continue
        raise PeftInteropError(
            f"PEFT {peft_type} field {key}={value!r} is not supported (it would change the adapter's math)"
        )
    fmt.check(config)
    return peft_type, fmt


def _saved_module(name: str, patterns: list[str]) -> str | None:
    """The module (a dotted prefix of ``name``) that a ``modules_to_save`` entry names, PEFT-style."""
    parts = name.split(".")
    for end in range(1, len(parts)):
        module = ".".join(parts[:end])
        if any(module == p or module.endswith("." + p) for p in patterns):
            return module
    return None


def from_peft(
    config: Mapping[str, Any], tensors: Mapping[str, Tensor], *, host: PluginHost | None = None
) -> tuple[Recipe, dict[str, Tensor]]:
    """Our recipe and tensors (keys ``<module>.<site key>`` and, for modules to save,
    ``modules_to_save/<module>/<tensor>``) for a PEFT adapter; model-free."""
    peft_type, fmt = _format(config, host or get_host())
    listed = config.get("modules_to_save") or ()
    patterns = [listed] if isinstance(listed, str) else [str(p) for p in listed]
    modules: dict[str, dict[str, Tensor]] = defaultdict(dict)
    saved: dict[str, Tensor] = {}
    for key, value in tensors.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        suffix = next((s for s in fmt.suffixes if name.endswith("." + s)), None)
        if suffix is not None:
            modules[name[: -len(suffix) - 1]][suffix] = value
            continue
        module = _saved_module(name, patterns)
        if module is None:
            raise PeftInteropError(f"unexpected tensor {key!r} in a PEFT {peft_type} adapter (unsupported feature)")
        saved[f"{SAVED_PREFIX}{module}/{name[len(module) + 1:]}"] = value
    if not modules:
        raise PeftInteropError("the PEFT adapter holds no adapter tensors")
    recipe, ours = fmt.from_peft(config, dict(modules))
    if saved:
        recipe["adapter"]["modules_to_save"] = sorted({k[len(SAVED_PREFIX):].rpartition("/")[0] for k in saved})
    return Recipe.from_dict(recipe), {**ours, **saved}


def to_peft(model: nn.Module, *, host: PluginHost | None = None) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """PEFT ``adapter_config.json`` content and tensors for ``model``'s adapter.

    Read from the sites themselves (not the recipe), so a merged model exports what it now
    is: every site unsplit (one cell, the ``all`` sampler) and owned by one registered format.
    """
    host = host or get_host()
    found = sites(model)
    if not found:
        raise PeftInteropError("the model has no adapter sites to export")
    if editable_state(model).folded:
        raise PeftInteropError("some updates are folded into base weights, which a PEFT folder cannot carry; "
                               "adapterkit.unmerge(model) first")
    registry = host.peft_formats
    formats = {name: registry[name]() for name in registry}
    owners: set[str] = set()
    for name, site in found.items():
        if type(site.sampler) is not Sampler or any(site.partition(p).n_cells != 1 for p in site.projections):
            raise PeftInteropError(f"site {name!r} is split into cells; merge it first (PEFT has no equivalent)")
        owner = next((t for t, fmt in formats.items() if fmt.owns(site)), None)
        if owner is None:
            if site.skills > 1:
                raise PeftInteropError(
                    f"site {name!r}: {site.skills} skills routed by {type(site.router).__name__} have no PEFT "
                    "equivalent; collapse to one LoRA first (merger 'collapse' or 'average', or export per task)"
                )
            raise PeftInteropError(f"site {name!r}: no PEFT format exports a {site.kind!r} adapter "
                                   f"(formats: {', '.join(sorted(formats)) or 'none'})")
        owners.add(owner)
    if len(owners) > 1:
        raise PeftInteropError(f"PEFT needs one adapter type for every module; the sites need {sorted(owners)}")
    peft_type = owners.pop()
    fields, tensors = formats[peft_type].to_peft(found)
    out = {PREFIX + key: value.detach().cpu().contiguous() for key, value in tensors.items()}
    saved = saved_modules(model)
    for key, value in adapter_state_dict(model).items():
        split = saved_module_key(key)
        if split is not None:
            out[f"{PREFIX}{split[0]}.{split[1]}"] = value.detach().cpu().contiguous()
    config = {"peft_type": peft_type, "target_modules": sorted(found), "task_type": None,
              "base_model_name_or_path": None, "inference_mode": True, "revision": None,
              "modules_to_save": saved or None, **fields}
    return config, out


def read_peft(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Config and tensors of a PEFT adapter folder at any fsspec URL.

    Weights come from ``adapter_model.safetensors``; a legacy ``adapter_model.bin`` is read
    with ``torch.load(weights_only=True)`` (no arbitrary code) and a warning says so.
    """
    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    root = root.rstrip("/")
    try:
        config = json.loads(fs.cat_file(f"{root}/{CONFIG_NAME}"))
    except FileNotFoundError:
        raise PeftInteropError(f"{url} is not a PEFT adapter folder: no {CONFIG_NAME}") from None
    except json.JSONDecodeError as exc:
        raise PeftInteropError(f"{url}/{CONFIG_NAME} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise PeftInteropError(f"{url}/{CONFIG_NAME} is not a JSON object")
    if fs.exists(f"{root}/{WEIGHTS_NAME}"):
        try:
            tensors = st_load(fs.cat_file(f"{root}/{WEIGHTS_NAME}"))
        except Exception as exc:  # safetensors raises its own error types
            raise PeftInteropError(f"{url}/{WEIGHTS_NAME} is not a valid safetensors file: {exc}") from None
    elif fs.exists(f"{root}/{PICKLE_NAME}"):
        log.warning("reading %s/%s with torch.load(weights_only=True): pickle format, tensors only", url, PICKLE_NAME)
        try:
            raw = io.BytesIO(fs.cat_file(f"{root}/{PICKLE_NAME}"))
            tensors = torch.load(raw, weights_only=True, map_location="cpu")
        except Exception as exc:
            raise PeftInteropError(f"{url}/{PICKLE_NAME} cannot be read safely (weights_only): {exc}") from None
    else:
        raise PeftInteropError(f"{url} holds no {WEIGHTS_NAME}")
    return config, tensors


def write_peft(url: str, config: Mapping[str, Any], tensors: Mapping[str, Tensor],
               storage_options: Mapping[str, Any] | None = None) -> None:
    """Write a PEFT adapter folder (weights first, then the config that makes it one)."""
    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    root = root.rstrip("/")
    fs.makedirs(root, exist_ok=True)
    fs.pipe_file(f"{root}/{WEIGHTS_NAME}", st_save(dict(tensors), metadata={"format": "pt"}))
    fs.pipe_file(f"{root}/{CONFIG_NAME}", json.dumps(dict(config), indent=2, sort_keys=True).encode())


def import_peft(model: nn.Module, url: str, *, storage_options: Mapping[str, Any] | None = None) -> nn.Module:
    """Attach a PEFT adapter folder (any registered format) onto ``model`` in place, with its
    weights and its modules to save; returns the model."""
    recipe, ours = from_peft(*read_peft(url, storage_options))
    attach(model, recipe)
    load_converted(model, ours)
    return model


@torch.no_grad()
def load_converted(model: nn.Module, tensors: Mapping[str, Tensor]) -> None:
    """Copy converted tensors (from :func:`from_peft`) into the attached ``model``.

    A file's module path matches a model module named the same or with an extra prefix
    (a PEFT adapter saved on ``BertModel`` loads onto ``BertForSequenceClassification``).
    """
    targets = adapter_state_dict(model)
    for key, value in tensors.items():
        split = saved_module_key(key)
        if split is None:
            names = [t for t in targets if not t.startswith(SAVED_PREFIX) and (t == key or t.endswith("." + key))]
        else:
            names = [t for t in targets if (s := saved_module_key(t)) is not None and s[1] == split[1]
                     and (s[0] == split[0] or s[0].endswith("." + split[0]))]
        if len(names) != 1:
            raise PeftInteropError(f"adapter tensor {key!r} matches {len(names)} tensors of the model, "
                                   "need exactly one")
        target = targets[names[0]]
        if target.shape != value.shape:
            raise PeftInteropError(
                f"{names[0]!r} has shape {tuple(target.shape)} in the model, the adapter gives {tuple(value.shape)}"
            )
        target.copy_(value.to(target.dtype))


def export_peft(model: nn.Module, url: str, *, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write ``model``'s adapter as a PEFT folder that ``PeftModel.from_pretrained`` loads
    unchanged (with its modules to save); returns the config."""
    config, out = to_peft(model)
    write_peft(url, config, out, storage_options)
    return config


def export_peft_tasks(
    model: nn.Module, url: str, *, storage_options: Mapping[str, Any] | None = None
) -> dict[str, dict[str, Any]]:
    """One PEFT LoRA folder per task of a task-routed inventory (Poly, MHR, ...): task ``t``
    collapsed to a plain LoRA (merger ``collapse``) in ``<url>/task-<t>``, ready for LoRA
    servers (vLLM, LoRAX). The model is left as it was. Returns ``{folder: config}``."""
    state = editable_state(model)
    tasks = state.n_tasks
    if tasks is None:
        raise PeftInteropError("per-task export needs an adapter routed by task ids (Poly, MHR, ...); "
                               "this one is not: export it as one folder")
    history = list(state.history)
    written: dict[str, dict[str, Any]] = {}
    try:
        for task in range(tasks):
            merge(model, "collapse", task=task)
            try:
                folder = url.rstrip("/") + f"/task-{task}"
                written[folder] = export_peft(model, folder, storage_options=storage_options)
            finally:
                unmerge(model)
    finally:
        state.history = history
    return written
