"""PEFT ``POLY`` folders (Poly and MHR) for the poly router, both ways.

PEFT stores ``poly_lora_A (H, K, d_in/H, r)``, ``poly_lora_B (H, K, r, d_out/H)`` and
``poly_router.module_logits (T, H*K)`` per module and scales by exactly ``1/r``. Ours:
``A [K, d_in, r]`` where head h owns rows ``h*d_in/H...``, ``B [K, r, d_out]`` (head h owns
columns), ``router.logits (T, H*K)``: the same numbers, regrouped; recipe ``skills = K``,
``alpha = 1``, splitter ``mhr`` with ``heads = H`` (``n_splits``), router ``poly``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from adapterkit.plugin_api import AdapterSite, PeftFormat, PeftInteropError

from .routers import PolyRouter

_SUFFIXES = {"poly_lora_A": "projections.A.weight", "poly_lora_B": "projections.B.weight",
             "poly_router.module_logits": "router.logits"}


def _expect(module: str, what: str, value: Tensor, shape: tuple[int | None, ...]) -> None:
    if value.dim() != len(shape) or any(s is not None and s != v for s, v in zip(shape, value.shape, strict=False)):
        want = "(" + ", ".join("?" if s is None else str(s) for s in shape) + ")"
        raise PeftInteropError(f"PEFT tensor {module}.{what} has shape {tuple(value.shape)}; the config implies {want}")


class PolyFormat(PeftFormat):
    """PEFT ``POLY`` <-> LoRA routed by ``poly`` (``mhr`` splitter for ``n_splits > 1``)."""

    fields = frozenset({"r", "n_tasks", "n_skills", "n_splits", "poly_type"})
    suffixes = tuple(_SUFFIXES)

    def check(self, config: Mapping[str, Any]) -> None:
        if config.get("poly_type", "poly") != "poly":
            raise PeftInteropError(f"PEFT poly_type {config['poly_type']!r} is not supported; only 'poly'")

    def from_peft(
        self, config: Mapping[str, Any], modules: Mapping[str, Mapping[str, Tensor]]
    ) -> tuple[dict[str, Any], dict[str, Tensor]]:
        r = int(config["r"])
        heads, skills, tasks = int(config.get("n_splits", 1)), int(config.get("n_skills", 4)), int(config["n_tasks"])
        out: dict[str, Tensor] = {}
        for module, t in modules.items():
            missing = sorted(set(_SUFFIXES) - set(t))
            if missing:
                raise PeftInteropError(f"PEFT adapter module {module!r} lacks {missing}")
            a, b, logits = t["poly_lora_A"], t["poly_lora_B"], t["poly_router.module_logits"]
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
        return recipe, out

    def owns(self, site: AdapterSite) -> bool:
        return isinstance(site.router, PolyRouter)

    def to_peft(self, found: Mapping[str, AdapterSite]) -> tuple[dict[str, Any], dict[str, Tensor]]:
        out: dict[str, Tensor] = {}
        shapes: set[tuple[int, int, int, int]] = set()
        for name, site in found.items():
            if site.kind != "lora" or set(site.projections) != {"A", "B"}:
                raise PeftInteropError(f"site {name!r}: only LoRA adapters export to PEFT Poly, got {site.kind!r}")
            router = site.router
            assert isinstance(router, PolyRouter)  # (owns)
            a, b = (site.projections[p].get_parameter("weight").detach() for p in ("A", "B"))
            cfg = site.config
            r, scale = cfg.r, float(cfg.scale)
            heads, skills, tasks = router.heads, site.skills, router.config.tasks
            if abs(scale * r - 1.0) > 1e-9:
                raise PeftInteropError(
                    f"site {name!r}: PEFT Poly scales by exactly 1/r; this adapter's alpha is {scale * r:g}"
                )
            if cfg.dropout:
                raise PeftInteropError(f"site {name!r}: PEFT Poly has no dropout; this adapter has "
                                       f"dropout={cfg.dropout}")
            if router.config.temperature != 1.0:
                raise PeftInteropError(
                    f"site {name!r}: PEFT Poly samples at temperature 1, not {router.config.temperature}"
                )
            out[f"{name}.poly_lora_A"] = a.reshape(skills, heads, -1, r).permute(1, 0, 2, 3)
            out[f"{name}.poly_lora_B"] = b.reshape(skills, r, heads, -1).permute(2, 0, 1, 3)
            out[f"{name}.poly_router.module_logits"] = router.logits.detach()
            shapes.add((r, heads, skills, tasks))
        if len(shapes) > 1:
            raise PeftInteropError("PEFT Poly needs one configuration for every module; the sites differ "
                                   "(rank, heads, skills or tasks)")
        r, heads, skills, tasks = shapes.pop()
        config = {"r": r, "n_tasks": tasks, "n_skills": skills, "n_splits": heads, "poly_type": "poly",
                  "init_weights": True, "exclude_modules": None}
        return config, out
