"""Presets for the official settings, and discovery of the plugin through its entry point."""

from __future__ import annotations

import pytest
from adapterkit_mosa import PRESETS, BiasCopies, load_preset
from mosa_testlib import split_modules, tiny_bert

import adapterkit
from adapterkit.errors import RecipeError
from adapterkit.plugins import PluginHost

# The official scripts (Theia-4869/MoSA scripts/mosa/vit/...): r, splitter, share, lr, loss term
OFFICIAL = {
    "vtab": (16, {"name": "mosa", "n_cells": 4}, "down", 5e-3, "consistency"),  # VTAB/vtab.sh
    "fgvc-cub": (64, {"name": "mosa", "n_cells": 4}, "down", 1e-3, "consistency"),  # FGVC/cub.sh
    "fgvc-dogs": (64, {"name": "mosa", "n_cells": 4}, "down", 5e-4, "consistency"),  # FGVC/dogs.sh
    "fgvc-nabirds": (64, {"name": "mosa", "n_cells": 4}, "down", 5e-4, "consistency"),  # FGVC/nabirds.sh
    "fgvc-flowers": (64, {"name": "mosa", "n_cells": 4}, "down", 5e-3, "consistency"),  # FGVC/flowers.sh
    "fgvc": (64, {"name": "mosa", "n_cells": 4}, "down", 5e-3, "consistency"),  # shared, Flowers' rate
    "fgvc-cars": (64, {"name": "mosa", "n_cells": 2}, "up", 5e-3, "consistency-hidden"),  # FGVC/cars.sh
    "multitask": (64, {"name": "mosa", "n_cells": 2}, "none", 5e-4, "consistency"),  # FGVC/multi.sh
    "hierarchical": (16, {"name": "hierarchical", "levels": [2, 4, 8]}, "down", 5e-3, "consistency"),  # ours
}


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_presets_hold_the_official_settings_and_attach(name: str) -> None:
    r, splitter, share, lr, loss = OFFICIAL[name]
    preset = load_preset(name, r=8 if r == 16 else 4)  # small r: the tiny model has hidden size 32
    data = load_preset(name).recipe.to_dict()
    adapter = data["adapter"]
    assert (adapter["r"], adapter["norm"], adapter["scale"], adapter["dropout"], adapter["act"]) == (
        r, True, 0.1, 0.1, "gelu"
    )
    assert {k: v for k, v in data["splitter"].items() if k in splitter} == splitter
    assert data["splitter"]["share"] == share and data["merger"]["name"] == "mosa"
    assert data["splitter"].get("bias_copies", False) == (name != "hierarchical")  # official ADAPTER.BIAS
    t = preset.training
    assert (t["lr"], t["weight_decay"], t["eps"], t["batch_size"], t["epochs"], t["warmup_epochs"]) == (
        lr, 0.01, 1e-6, 128, 100, 10
    )
    assert t["no_decay"] == ["bias", "LayerNorm.bias", "LayerNorm.weight"] and t["lr_schedule"] == "cosine"
    assert t["loss"] == loss and t["consistency_weight"] == 1.0
    model = adapterkit.attach(tiny_bert(), preset.recipe)
    assert len([m for m in split_modules(model) if not isinstance(m, BiasCopies)]) == (4 if share == "none" else 2)


def test_preset_overrides_and_unknown_names() -> None:
    preset = load_preset("vtab", targets=["blocks.*.mlp"], seed=3, input_arg=0)
    assert preset.recipe.targets == ("blocks.*.mlp",) and preset.recipe.seed == 3
    assert preset.recipe.kind_args["input_arg"] == 0
    assert set(PRESETS) == set(OFFICIAL)
    with pytest.raises(RecipeError, match="unknown MoSA preset 'vtab2'; available: vtab, fgvc"):
        load_preset("vtab2")


def test_the_plugin_is_discovered_through_its_entry_point() -> None:
    host = PluginHost()
    host.load_entry_points()
    assert host.plugins["mosa"].provides == {
        "splitter": ["hierarchical", "mosa"], "sampler": ["hierarchical", "mosa"], "merger": ["mosa"],
        "loss": ["consistency", "consistency-hidden"],
    }
    assert host.splitters.provider("mosa") == "mosa"
