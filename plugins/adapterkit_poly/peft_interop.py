"""PEFT interop: import PEFT Poly/MHR and LoRA adapter folders, export ours so PEFT loads them.

A PEFT folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (keys
``base_model.model.<module>.<tensor>``). Layouts:

- Poly/MHR: ``poly_lora_A (H, K, d_in/H, r)``, ``poly_lora_B (H, K, r, d_out/H)``,
  ``poly_router.module_logits (T, H*K)``, scale exactly ``1/r``. Ours: ``A [K, d_in, r]``
  where head h owns rows ``h*d_in/H...``, ``B [K, r, d_out]`` (head h owns columns),
  ``router.logits (T, H*K)``: the same numbers, regrouped.
- LoRA: ``lora_A.weight (r, d_in)``, ``lora_B.weight (d_out, r)``, scale
  ``lora_alpha/r`` (``/sqrt(r)`` with ``use_rslora``). Ours: ``A[0] = lora_A.T``, ``B[0] = lora_B.T``.

Import converts model-free (:func:`from_peft`); :func:`import_peft` attaches the result
to a model, :func:`export_peft` writes a model's sites. A PEFT field we do not reproduce exactly is an
error naming it, never silent drift. The module names in the file become the targets,
so PEFT's ``target_modules``/``exclude_modules``/``layers_to_transform`` are honoured as
they were resolved when the adapter was saved.
"""

from __future__ import annotations

import io
import json
import logging
import math
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import fsspec
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor, nn

from adapterkit.plugin_api import AdapterkitError, Recipe, Sampler, SingleSkill, attach, sites

from .routers import PolyRouter

log = logging.getLogger("adapterkit.poly")

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PREFIX = "base_model.model."

# fields that carry no math (provenance, init, target resolution already done in the file)
_IGNORED = {
    "auto_mapping", "base_model_name_or_path", "revision", "peft_version", "task_type", "inference_mode",
    "init_weights", "init_lora_weights", "target_modules", "exclude_modules", "layers_to_transform",
    "layers_pattern", "megatron_core", "qalora_group_size", "peft_type",
}
_SUPPORTED = {
    "POLY": {"r", "n_tasks", "n_skills", "n_splits", "poly_type"},
    "LORA": {"r", "lora_alpha", "lora_dropout", "use_rslora", "bias", "fan_in_fan_out"},
}
_SUFFIXES = {
    "POLY": {"poly_lora_A": "projections.A.weight", "poly_lora_B": "projections.B.weight",
             "poly_router.module_logits": "router.logits"},
    "LORA": {"lora_A.weight": "projections.A.weight", "lora_B.weight": "projections.B.weight"},
}


class PeftInteropError(AdapterkitError):
    """A PEFT adapter cannot be imported (or ours exported) without changing its math."""


def _empty(value: Any) -> bool:
    return value is None or value is False or value == "none" or (isinstance(value, (dict, list, str)) and not value)


def check_config(config: Mapping[str, Any]) -> str:
    """The PEFT type (``POLY`` or ``LORA``) after refusing every field we would not reproduce."""
    raw = config.get("peft_type", "")
    peft_type = str(getattr(raw, "value", raw)).upper()  # a PeftType enum in memory, a string in JSON
    if peft_type not in _SUPPORTED:
        raise PeftInteropError(
            f"PEFT type {config.get('peft_type')!r} is not supported; adapterkit imports POLY and LORA"
        )
    for key, value in config.items():
        if key in _IGNORED or key in _SUPPORTED[peft_type] or _empty(value):
            continue
        raise PeftInteropError(
            f"PEFT {peft_type} field {key}={value!r} is not supported (it would change the adapter's math)"
        )
    if peft_type == "POLY" and config.get("poly_type", "poly") != "poly":
        raise PeftInteropError(f"PEFT poly_type {config['poly_type']!r} is not supported; only 'poly'")
    if peft_type == "LORA":
        if config.get("fan_in_fan_out"):
            raise PeftInteropError(
                "PEFT LoRA fan_in_fan_out=True (Conv1D layers) is not supported; adapterkit LoRA adapts nn.Linear"
            )
        if config.get("bias", "none") != "none":
            raise PeftInteropError(f"PEFT LoRA bias={config['bias']!r} is not supported; only 'none'")
    return peft_type


def _group(tensors: Mapping[str, Tensor], peft_type: str) -> dict[str, dict[str, Tensor]]:
    """``{module path: {our key: tensor}}`` from PEFT keys; unknown tensors are errors."""
    modules: dict[str, dict[str, Tensor]] = defaultdict(dict)
    for key, value in tensors.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        for suffix, ours in _SUFFIXES[peft_type].items():
            if name.endswith("." + suffix):
                modules[name[: -len(suffix) - 1]][ours] = value
                break
        else:
            raise PeftInteropError(f"unexpected tensor {key!r} in a PEFT {peft_type} adapter (unsupported feature)")
    for module, found in modules.items():
        missing = set(_SUFFIXES[peft_type].values()) - set(found)
        if missing:
            raise PeftInteropError(f"PEFT adapter module {module!r} lacks {sorted(missing)}")
    if not modules:
        raise PeftInteropError("the PEFT adapter holds no adapter tensors")
    return dict(modules)


def from_peft(config: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> tuple[Recipe, dict[str, Tensor]]:
    """Our recipe and adapter state dict (keys ``<module>.<site key>``) for a PEFT adapter."""
    peft_type = check_config(config)
    modules = _group(tensors, peft_type)
    r = int(config["r"])
    out: dict[str, Tensor] = {}
    if peft_type == "POLY":
        heads, skills, tasks = int(config.get("n_splits", 1)), int(config.get("n_skills", 4)), int(config["n_tasks"])
        for module, t in modules.items():
            a, b, logits = t["projections.A.weight"], t["projections.B.weight"], t["router.logits"]
            _expect(module, "poly_lora_A", a, (heads, skills, None, r))
            _expect(module, "poly_lora_B", b, (heads, skills, r, None))
            _expect(module, "poly_router.module_logits", logits, (tasks, heads * skills))
            out[f"{module}.projections.A.weight"] = a.permute(1, 0, 2, 3).reshape(skills, -1, r).contiguous()
            out[f"{module}.projections.B.weight"] = b.permute(1, 2, 0, 3).reshape(skills, r, -1).contiguous()
            out[f"{module}.router.logits"] = logits.clone()
        recipe = {
            "adapter": {"kind": "lora", "targets": sorted(modules), "skills": skills, "r": r, "alpha": 1.0},
            "splitter": {"name": "mhr", "heads": heads} if heads > 1 else {"name": "dense"},
            "router": {"name": "poly", "tasks": tasks},
        }
    else:
        alpha = float(config.get("lora_alpha", 8))
        if config.get("use_rslora"):
            alpha *= math.sqrt(r)  # rsLoRA scales by alpha/sqrt(r); ours is alpha/r
        for module, t in modules.items():
            a, b = t["projections.A.weight"], t["projections.B.weight"]
            _expect(module, "lora_A.weight", a, (r, None))
            _expect(module, "lora_B.weight", b, (None, r))
            out[f"{module}.projections.A.weight"] = a.T.unsqueeze(0).contiguous()
            out[f"{module}.projections.B.weight"] = b.T.unsqueeze(0).contiguous()
        adapter = {"kind": "lora", "targets": sorted(modules), "r": r, "alpha": alpha}
        if config.get("lora_dropout"):
            adapter["dropout"] = float(config["lora_dropout"])
        recipe = {"adapter": adapter}
    return Recipe.from_dict(recipe), out


def _expect(module: str, what: str, value: Tensor, shape: tuple[int | None, ...]) -> None:
    if value.dim() != len(shape) or any(s is not None and s != v for s, v in zip(shape, value.shape, strict=False)):
        want = "(" + ", ".join("?" if s is None else str(s) for s in shape) + ")"
        raise PeftInteropError(f"PEFT tensor {module}.{what} has shape {tuple(value.shape)}; the config implies {want}")


def to_peft(model: nn.Module) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """PEFT ``adapter_config.json`` content and tensors for ``model``'s adapter.

    Read from the sites themselves (not the recipe), so a merged model exports what it
    now is: every site must be a LoRA with unsplit projections and the ``all`` sampler,
    all routed by ``poly`` (PEFT Poly/MHR) or all single-skill (PEFT LoRA).
    """
    found = sites(model)
    if not found:
        raise PeftInteropError("the model has no adapter sites to export")
    kinds = set()
    out: dict[str, Tensor] = {}
    shapes: set[tuple[Any, ...]] = set()
    for name, site in found.items():
        if site.kind != "lora" or set(site.projections) != {"A", "B"}:
            raise PeftInteropError(f"site {name!r}: only LoRA adapters export to PEFT, got {site.kind!r}")
        if type(site.sampler) is not Sampler or any(site.partition(p).n_cells != 1 for p in site.projections):
            raise PeftInteropError(f"site {name!r} is split into cells; merge it first (PEFT has no equivalent)")
        a, b = (site.projections[p].get_parameter("weight").detach().cpu() for p in ("A", "B"))
        cfg = site.config
        r, scale, dropout = cfg.r, float(cfg.scale), float(cfg.dropout)
        router = site.router
        if isinstance(router, PolyRouter):
            heads, skills, tasks = router.heads, site.skills, router.config.tasks
            if abs(scale * r - 1.0) > 1e-9:
                raise PeftInteropError(
                    f"site {name!r}: PEFT Poly scales by exactly 1/r; this adapter's alpha is {scale * r:g}"
                )
            if dropout:
                raise PeftInteropError(f"site {name!r}: PEFT Poly has no dropout; this adapter has dropout={dropout}")
            if router.config.temperature != 1.0:
                raise PeftInteropError(
                    f"site {name!r}: PEFT Poly samples at temperature 1, not {router.config.temperature}"
                )
            out[f"{PREFIX}{name}.poly_lora_A"] = a.reshape(skills, heads, -1, r).permute(1, 0, 2, 3).contiguous()
            out[f"{PREFIX}{name}.poly_lora_B"] = b.reshape(skills, r, heads, -1).permute(2, 0, 1, 3).contiguous()
            out[f"{PREFIX}{name}.poly_router.module_logits"] = router.logits.detach().cpu().contiguous()
            kinds.add("POLY")
            shapes.add((r, heads, skills, tasks))
        elif isinstance(site.router, SingleSkill) and site.skills == 1:
            out[f"{PREFIX}{name}.lora_A.weight"] = a[0].T.contiguous()
            out[f"{PREFIX}{name}.lora_B.weight"] = b[0].T.contiguous()
            kinds.add("LORA")
            shapes.add((r, scale * r, dropout))
        else:
            raise PeftInteropError(
                f"site {name!r}: {site.skills} skills routed by {type(site.router).__name__} have no PEFT equivalent; "
                "collapse to one LoRA first (merger 'collapse' or 'average')"
            )
    if len(kinds) > 1 or len(shapes) > 1:
        raise PeftInteropError(
            "PEFT needs one configuration for every module; the sites differ (kind, rank, heads or scale)"
        )
    common = {"target_modules": sorted(found), "task_type": None, "base_model_name_or_path": None,
              "inference_mode": True, "modules_to_save": None, "revision": None}
    if kinds == {"POLY"}:
        r, heads, skills, tasks = shapes.pop()
        config = {"peft_type": "POLY", "r": r, "n_tasks": tasks, "n_skills": skills, "n_splits": heads,
                  "poly_type": "poly", "init_weights": True, "exclude_modules": None, **common}
    else:
        r, alpha, dropout = shapes.pop()
        config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "lora_dropout": dropout, "bias": "none",
                  "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
                  "rank_pattern": {}, "alpha_pattern": {}, **common}
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


def import_peft(model: nn.Module, url: str, storage_options: Mapping[str, Any] | None = None) -> nn.Module:
    """Attach a PEFT Poly/MHR or LoRA adapter folder onto ``model`` (in place) with its weights."""
    recipe, ours = from_peft(*read_peft(url, storage_options))
    attach(model, recipe)
    load_converted(model, ours)
    return model


@torch.no_grad()
def load_converted(model: nn.Module, tensors: Mapping[str, Tensor]) -> None:
    """Copy converted tensors (keys ``<module>.<site key>``) into the sites that match the modules.

    A file's module path matches a site named the same or with an extra prefix (a PEFT
    adapter saved on ``BertModel`` loads onto ``BertForSequenceClassification``).
    """
    found = sites(model)
    by_module: dict[str, dict[str, Tensor]] = defaultdict(dict)
    for key, value in tensors.items():
        for local in ("projections.A.weight", "projections.B.weight", "router.logits"):
            if key.endswith("." + local):
                by_module[key[: -len(local) - 1]][local] = value
    for module, values in by_module.items():
        names = [s for s in found if s == module or s.endswith("." + module)]
        if len(names) != 1:
            raise PeftInteropError(
                f"adapter module {module!r} matches {len(names)} sites of the model, need exactly one"
            )
        site = found[names[0]]
        for local, value in values.items():
            param = site.get_parameter(local)
            if param.shape != value.shape:
                raise PeftInteropError(
                    f"site {names[0]!r}: {local} has shape {tuple(param.shape)}, the adapter gives {tuple(value.shape)}"
                )
            param.copy_(value.to(param.dtype))


def export_peft(model: nn.Module, url: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write ``model``'s adapter as a PEFT folder that ``PeftModel.from_pretrained`` loads; returns the config."""
    config, out = to_peft(model)
    write_peft(url, config, out, storage_options)
    return config
