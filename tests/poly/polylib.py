"""Helpers of the Poly/MHR tests: inputs, PEFT models with random weights, our recipes."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from testlib import T5_VOCAB, minilm_inputs, randomize, t5_inputs
from torch import nn

import adapterkit

__all__ = ["T5_VOCAB", "minilm_inputs", "randomize", "t5_inputs"]  # (re-exported for the poly tests)


MODELS: dict[str, tuple[str, Callable[..., dict[str, torch.Tensor]], list[str], int]] = {
    # name: (fixture, inputs, targets, heads > 1 that divides the dims)
    "t5": ("t5_base", t5_inputs, ["q", "v"], 4),
    "minilm": ("minilm_base", minilm_inputs, ["query", "value"], 8),
}


def output(model: nn.Module, inputs: dict[str, torch.Tensor], **kwargs: Any) -> torch.Tensor:
    return model(**inputs, **kwargs).last_hidden_state  # type: ignore[no-any-return]


def peft_poly(base: nn.Module, *, heads: int, targets: list[str], tasks: int = 3, skills: int = 4, r: int = 8,
              seed: int = 0) -> nn.Module:
    """A PEFT Poly/MHR model on a copy of ``base`` with random non-zero adapter weights."""
    from peft import PolyConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(base), PolyConfig(r=r, n_tasks=tasks, n_skills=skills, n_splits=heads,
                                                          target_modules=targets))
    randomize(model, ("poly_",), seed)
    return model


def poly_recipe(targets: list[str], *, heads: int = 1, skills: int = 4, tasks: int = 3, r: int = 4,
                router: str = "poly", **kind: Any) -> dict[str, Any]:
    recipe: dict[str, Any] = {
        "adapter": {"kind": "lora", "targets": targets, "skills": skills, "r": r, "alpha": 1, **kind},
        "router": {"name": router, "tasks": tasks} if router in ("poly", "private") else {"name": router},
    }
    if heads > 1:
        recipe["splitter"] = {"name": "mhr", "heads": heads}
    return recipe


def routed_t5(t5_base: nn.Module, *, heads: int = 4, seed: int = 0, **kwargs: Any) -> nn.Module:
    """Our Poly/MHR on a copy of the small T5, with random non-zero skills and logits."""
    model = adapterkit.attach(copy.deepcopy(t5_base), poly_recipe(["q", "v"], heads=heads, **kwargs))
    randomize(model, ("projections.", "router."), seed)
    return model
