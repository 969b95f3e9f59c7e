"""PEFT ``LORA`` folders for the LoRA kind, both ways.

PEFT stores ``lora_A.weight (r, d_in)`` and ``lora_B.weight (d_out, r)`` per module and
scales by ``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``), each module's ``r`` and
``lora_alpha`` from the first key of ``rank_pattern``/``alpha_pattern`` that matches its
name (PEFT's rule: ``re.match(rf"(.*\\.)?({key})$", name)``). Ours: ``A[0] = lora_Aᵀ``,
``B[0] = lora_Bᵀ`` and ``alpha`` with the same ``alpha / r``; modules whose rank or alpha
differ from the config's get recipe ``overrides``. How each base layer type stores the
factors is one :class:`Layout` in :data:`LAYOUTS`.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import attrs
from torch import Tensor, nn

from adapterkit.plugin_api import AdapterSite, PeftFormat, PeftInteropError, SingleSkill


def _transposed(a: Tensor, b: Tensor, base: nn.Module | None = None) -> tuple[Tensor, Tensor]:
    return a.T, b.T


def _conv_to_ours(a: Tensor, b: Tensor, base: nn.Module | None = None) -> tuple[Tensor, Tensor]:
    return a.flatten(1).T, b.flatten(1).T  # [r, in, kh, kw] -> [in*kh*kw, r]; [out, r, 1, 1] -> [r, out]


def _conv_to_peft(a: Tensor, b: Tensor, base: nn.Module | None = None) -> tuple[Tensor, Tensor]:
    assert isinstance(base, nn.Conv2d)
    r = a.shape[1]
    return a.T.reshape(r, base.in_channels, *base.kernel_size), b.T.reshape(base.out_channels, r, 1, 1)


def _matrix_rank(a: Tensor, b: Tensor) -> int | None:
    """The rank of our ``A [d_in, r]``, ``B [r, d_out]`` (``None``: not such a pair)."""
    return a.shape[1] if a.dim() == b.dim() == 2 and a.shape[1] == b.shape[0] else None


@attrs.frozen
class Layout:
    """LoRA factors on one base layer type: PEFT's tensor names, the conversions between
    PEFT's ``(lora_A, lora_B)`` and the kind's one-skill ``(A, B)`` (``[d_in, r]``,
    ``[r, d_out]`` for a matrix), and the rank such a pair holds."""

    a: str
    b: str
    ndim: int  # of PEFT's lora_A (tells layouts with the same names apart on import)
    to_ours: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] = _transposed
    to_peft: Callable[[Tensor, Tensor, nn.Module], tuple[Tensor, Tensor]] = _transposed  # (a, b, base layer)
    rank: Callable[[Tensor, Tensor], int | None] = _matrix_rank
    config: Mapping[str, Any] = attrs.field(factory=dict)  # PEFT config fields the layer implies


# by base layer class name (a subclass finds its parent's); the first that fits wins on import
LAYOUTS: dict[str, Layout] = {
    "Linear": Layout("lora_A.weight", "lora_B.weight", 2),
    # transformers' Conv1D (GPT-2) stores weight [in, out]; PEFT's factors are Linear's, flagged fan_in_fan_out
    "Conv1D": Layout("lora_A.weight", "lora_B.weight", 2, config={"fan_in_fan_out": True}),
    "Embedding": Layout("lora_embedding_A", "lora_embedding_B", 2),
    "Conv2d": Layout("lora_A.weight", "lora_B.weight", 4, to_ours=_conv_to_ours, to_peft=_conv_to_peft),
}


def layout_of(base: nn.Module) -> Layout | None:
    return next((LAYOUTS[c.__name__] for c in type(base).__mro__ if c.__name__ in LAYOUTS), None)


def _pattern(patterns: Mapping[str, Any], name: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key``: the value of the first pattern matching ``name``'s tail."""
    for key, value in patterns.items():
        try:
            if re.match(rf"(.*\.)?({key})$", name):
                return value
        except re.error as exc:
            raise PeftInteropError(f"PEFT pattern {key!r} is not a valid regular expression: {exc}") from None
    return default


class LoRAFormat(PeftFormat):
    """PEFT ``LORA`` <-> the ``lora`` kind (one skill, unsplit)."""

    fields = frozenset({"r", "lora_alpha", "lora_dropout", "use_rslora", "bias", "fan_in_fan_out",
                        "rank_pattern", "alpha_pattern"})
    suffixes = tuple(dict.fromkeys(s for layout in LAYOUTS.values() for s in (layout.a, layout.b)))

    def check(self, config: Mapping[str, Any]) -> None:
        if config.get("bias", "none") != "none":
            raise PeftInteropError(f"PEFT LoRA bias={config['bias']!r} is not supported; only 'none'")
        for key in ("rank_pattern", "alpha_pattern"):
            if not isinstance(config.get(key) or {}, dict):
                raise PeftInteropError(f"PEFT LoRA field {key} must be a mapping of patterns to numbers")

    def from_peft(
        self, config: Mapping[str, Any], modules: Mapping[str, Mapping[str, Tensor]]
    ) -> tuple[dict[str, Any], dict[str, Tensor]]:
        r0, alpha0 = int(config["r"]), float(config.get("lora_alpha", 8))
        rslora = bool(config.get("use_rslora"))
        ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}

        def ours(r: int, alpha: float) -> dict[str, Any]:  # rsLoRA scales by alpha/sqrt(r); ours is alpha/r
            return {"r": r, "alpha": alpha * math.sqrt(r) if rslora else alpha}

        base = ours(r0, alpha0)
        overrides: dict[str, dict[str, Any]] = {}
        out: dict[str, Tensor] = {}
        for module, tensors in modules.items():
            layout = next((lay for lay in LAYOUTS.values() if lay.a in tensors and lay.b in tensors
                           and tensors[lay.a].dim() == lay.ndim), None)
            if layout is None:
                raise PeftInteropError(f"PEFT adapter module {module!r} holds {sorted(tensors)}: "
                                       "no LoRA layer layout adapterkit reads")
            args = ours(int(_pattern(ranks, module, r0)), float(_pattern(alphas, module, alpha0)))
            a, b = layout.to_ours(tensors[layout.a], tensors[layout.b])
            if layout.rank(a, b) != args["r"]:
                raise PeftInteropError(
                    f"PEFT adapter module {module!r}: {layout.a} {tuple(tensors[layout.a].shape)} and {layout.b} "
                    f"{tuple(tensors[layout.b].shape)} do not hold rank {args['r']} (the config's r/rank_pattern)"
                )
            out[f"{module}.projections.A.weight"] = a.unsqueeze(0).contiguous()
            out[f"{module}.projections.B.weight"] = b.unsqueeze(0).contiguous()
            if args != base:
                overrides[module] = {k: v for k, v in args.items() if base[k] != v}
        adapter: dict[str, Any] = {"kind": "lora", "targets": sorted(modules), **base}
        if config.get("lora_dropout"):
            adapter["dropout"] = float(config["lora_dropout"])
        if overrides:
            adapter["overrides"] = overrides
        return {"adapter": adapter}, out

    def owns(self, site: AdapterSite) -> bool:
        return site.kind == "lora" and isinstance(site.router, SingleSkill) and site.skills == 1

    def to_peft(self, found: Mapping[str, AdapterSite]) -> tuple[dict[str, Any], dict[str, Tensor]]:
        tensors: dict[str, Tensor] = {}
        shapes: dict[str, tuple[int, float]] = {}
        dropouts: set[float] = set()
        layer_config: dict[str, Any] = {}
        for name, site in found.items():
            layout = layout_of(site.base)
            if layout is None:
                raise PeftInteropError(f"site {name!r}: LoRA on {type(site.base).__name__} has no PEFT layout")
            a, b = (site.projections[p].get_parameter("weight").detach() for p in ("A", "B"))
            tensors[f"{name}.{layout.a}"], tensors[f"{name}.{layout.b}"] = layout.to_peft(a[0], b[0], site.base)
            cfg = site.config
            shapes[name] = (cfg.r, float(cfg.alpha if cfg.alpha is not None else cfg.r))
            dropouts.add(float(cfg.dropout))
            layer_config.update(layout.config)  # (PEFT sets fan_in_fan_out right per layer type itself)
        if len(dropouts) > 1:
            raise PeftInteropError(f"PEFT LoRA has one lora_dropout for every module; the sites use {sorted(dropouts)}")
        r0, alpha0 = Counter(shapes.values()).most_common(1)[0][0]  # the commonest; the others as patterns
        config = {
            "r": r0, "lora_alpha": alpha0, "lora_dropout": dropouts.pop(), "bias": "none", "fan_in_fan_out": False,
            "use_rslora": False, "use_dora": False, "init_lora_weights": True,
            "rank_pattern": {re.escape(n): r for n, (r, _) in shapes.items() if r != r0},
            "alpha_pattern": {re.escape(n): alpha for n, (_, alpha) in shapes.items() if alpha != alpha0},
            **layer_config,
        }
        return config, tensors
