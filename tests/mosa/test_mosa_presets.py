"""Presets for the official settings, and discovery of the plugin through its entry point."""

from __future__ import annotations

import pytest
from adapterkit_mosa import PRESETS, load_preset
from mosa_testlib import split_modules, tiny_bert

import adapterkit
from adapterkit.errors import RecipeError
from adapterkit.plugins import PluginHost


@pytest.mark.parametrize(
    "name, r, splitter, share",
    [
        ("vtab", 16, {"name": "mosa", "n_cells": 4}, "down"),
        ("fgvc", 64, {"name": "mosa", "n_cells": 4}, "down"),
        ("fgvc-cars", 64, {"name": "mosa", "n_cells": 2}, "up"),
        ("multitask", 16, {"name": "mosa", "n_cells": 2}, "none"),
        ("hierarchical", 16, {"name": "hierarchical", "levels": [2, 4, 8]}, "down"),
    ],
)
def test_presets_hold_the_official_settings_and_attach(name, r, splitter, share) -> None:
    preset = load_preset(name, r=8 if r == 16 else 4)  # small r: the tiny model has hidden size 32
    data = load_preset(name).recipe.to_dict()
    assert data["adapter"]["r"] == r and data["adapter"]["norm"] is True and data["adapter"]["scale"] == 0.1
    assert {k: v for k, v in data["splitter"].items() if k in splitter} == splitter
    assert data["splitter"]["share"] == share and data["merger"]["name"] == "mosa"
    assert preset.training["lr"] == 5e-3 and preset.training["weight_decay"] == 0.01
    assert preset.training["consistency_weight"] == 1.0
    model = adapterkit.attach(tiny_bert(), preset.recipe)
    assert len(split_modules(model)) == (4 if share == "none" else 2)


def test_preset_overrides_and_unknown_names() -> None:
    preset = load_preset("vtab", targets=["blocks.*.mlp"], seed=3, input_arg=0)
    assert preset.recipe.targets == ("blocks.*.mlp",) and preset.recipe.seed == 3
    assert preset.recipe.kind_args["input_arg"] == 0
    assert set(PRESETS) == {"vtab", "fgvc", "fgvc-cars", "multitask", "hierarchical"}
    with pytest.raises(RecipeError, match="unknown MoSA preset 'vtab2'; available: vtab, fgvc"):
        load_preset("vtab2")


def test_the_plugin_is_discovered_through_its_entry_point() -> None:
    host = PluginHost()
    host.load_entry_points()
    assert host.plugins["mosa"].provides == {
        "splitter": ["hierarchical", "mosa"], "sampler": ["hierarchical", "mosa"], "merger": ["mosa"],
        "loss": ["consistency"],
    }
    assert host.splitters.provider("mosa") == "mosa"
