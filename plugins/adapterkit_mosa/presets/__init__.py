"""Recipes for the official MoSA settings, as TOML files next to this module.

The official scripts' settings: ``vtab`` (r=16, N=4, share=down, lr 5e-3), the FGVC
datasets ``fgvc-cub`` (lr 1e-3), ``fgvc-dogs`` and ``fgvc-nabirds`` (5e-4), ``fgvc-flowers``
(5e-3) (r=64, N=4, share=down; ``fgvc`` is the shared recipe at Flowers' rate),
``fgvc-cars`` (r=64, N=2, share=up, 5e-3, plus the hidden-state regulariser: loss
``consistency-hidden``), ``multitask`` (r=64, N=2, share=none, 5e-4); every official one
with per-copy biases. ``hierarchical`` (2 -> 4 -> 8, coarse to fine) is this project's
reading of the paper. Each file is a recipe plus a ``[training]`` table that is not part
of the recipe (the official AdamW: eps 1e-6, weight decay 0.01 except on parameters whose
name contains a ``no_decay`` word; batch 128, 100 epochs, 10 warm-up, cosine; the loss
term and its weight)::

    preset = load_preset("vtab", targets=["blocks.*.mlp"], input_arg=0)
    adapterkit.attach(model, preset.recipe)
    t = preset.training
    optimizer = adapterkit.optim.adamw(
        model, lr=t["lr"], weight_decay=t["weight_decay"], eps=t["eps"], no_decay=t["no_decay"]
    )
"""

from __future__ import annotations

from importlib import resources
from typing import Any

import attrs
import tomllib

from adapterkit.plugin_api import Recipe, RecipeError

NAMES = (
    "vtab", "fgvc", "fgvc-cub", "fgvc-dogs", "fgvc-nabirds", "fgvc-flowers", "fgvc-cars", "multitask", "hierarchical",
)


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
