"""Recipes for the official MoSA settings, as TOML files next to this module.

``vtab`` (r=16, N=4, share=down), ``fgvc`` (r=64, N=4), ``fgvc-cars`` (r=64, N=2,
share=up), ``multitask`` (N=2, share=none) and ``hierarchical`` (2 -> 4 -> 8, coarse to
fine). Each file is a recipe plus a ``[training]`` table (optimiser, learning rate,
weight decay, consistency weight) that is not part of the recipe::

    preset = load_preset("vtab", targets=["blocks.*.mlp"], input_arg=0)
    adapterkit.attach(model, preset.recipe)
    optimizer = adapterkit.optim.adamw(model, lr=preset.training["lr"], weight_decay=preset.training["weight_decay"])
"""

from __future__ import annotations

from importlib import resources
from typing import Any

import attrs
import tomllib

from adapterkit.plugin_api import Recipe, RecipeError

NAMES = ("vtab", "fgvc", "fgvc-cars", "multitask", "hierarchical")


@attrs.frozen
class Preset:
    name: str
    recipe: Recipe
    training: dict[str, Any]


def preset_text(name: str) -> str:
    """The TOML source of a preset."""
    if name not in NAMES:
        raise RecipeError(f"unknown MoSA preset {name!r}; available: {', '.join(NAMES)}")
    return resources.files(__package__).joinpath(f"{name}.toml").read_text(encoding="utf-8")


def load_preset(name: str, *, targets: list[str] | None = None, seed: int | None = None, **adapter_args: Any) -> Preset:
    """A preset's recipe (with ``targets``, ``seed`` and adapter arguments overridden) and training table."""
    data = tomllib.loads(preset_text(name))
    training = data.pop("training", {})
    if targets is not None:
        data["adapter"]["targets"] = targets
    if seed is not None:
        data["seed"] = seed
    data["adapter"].update(adapter_args)
    return Preset(name, Recipe.from_dict(data), training)
