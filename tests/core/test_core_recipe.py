"""Recipes: dict/TOML round trips and one-line errors that name the offending key."""

from __future__ import annotations

import pytest
from torch import nn

import adapterkit
from adapterkit import PluginHost, Recipe, RecipeError, RoleSpec

TOML = """
seed = 7
[adapter]
kind = "bottleneck"
targets = ["encoder.layer.*.output", "re:.*attention\\\\.self\\\\.(query|value)"]
skills = 1
r = 32
placement = "parallel"
input_arg = 1
scale = 0.1
[splitter]
name = "dense"
[merger]
name = "identity"
"""


def test_from_toml_reads_every_part() -> None:
    recipe = Recipe.from_toml(TOML)
    assert recipe.kind == "bottleneck"
    assert recipe.targets == ("encoder.layer.*.output", r"re:.*attention\.self\.(query|value)")
    assert dict(recipe.kind_args) == {"r": 32, "placement": "parallel", "input_arg": 1, "scale": 0.1}
    assert (recipe.skills, recipe.seed) == (1, 7)
    assert recipe.splitter == RoleSpec("dense") and recipe.sampler == RoleSpec("all")
    assert recipe.router == RoleSpec("none") and recipe.merger == RoleSpec("identity")


@pytest.mark.parametrize(
    "data",
    [
        {"adapter": {"kind": "lora", "targets": "query"}},
        {"seed": 3, "adapter": {"kind": "lora", "targets": ["query", "value"], "r": 4, "alpha": 1.0, "skills": 2},
         "router": {"name": "uniform"}, "splitter": {"name": "mosa", "n_cells": 4, "share": "down"}},
    ],
)
def test_dict_round_trip(data: dict) -> None:
    recipe = Recipe.from_dict(data)
    again = Recipe.from_dict(recipe.to_dict())
    assert again == recipe
    assert again.to_dict() == recipe.to_dict()
    assert Recipe.from_toml(to_toml(recipe.to_dict())) == recipe


def test_toml_round_trip() -> None:
    recipe = Recipe.from_toml(TOML)
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    assert Recipe.from_toml(to_toml(recipe.to_dict())) == recipe


def to_toml(data: dict) -> str:
    """A minimal TOML writer for recipe dicts (scalars, lists of strings, one level of tables)."""

    def value(v: object) -> str:
        if isinstance(v, bool):
            return str(v).lower()
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(map(value, v)) + "]"
        return repr(v)

    lines = [f"{k} = {value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for table, body in data.items():
        if isinstance(body, dict):
            lines += [f"[{table}]", *(f"{k} = {value(v)}" for k, v in body.items())]
    return "\n".join(lines)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"adapter": {"kind": "lora", "targets": ["q"]}, "spliter": {"name": "dense"}},
         "unknown recipe key 'spliter'; valid keys: adapter, merger, router, sampler, seed, splitter"),
        ({"splitter": {"name": "dense"}}, "recipe needs a table [adapter]"),
        ({"adapter": {"kind": "lora"}}, "recipe table [adapter] needs key 'targets'"),
        ({"adapter": {"targets": ["q"]}}, "recipe table [adapter] needs key 'kind'"),
        ({"adapter": {"kind": "lora", "targets": []}},
         "recipe key 'adapter.targets' must be a non-empty list of module name patterns"),
        ({"adapter": {"kind": "lora", "targets": ["q", ""]}},
         "recipe key 'adapter.targets' must be a non-empty list of module name patterns"),
        ({"adapter": {"kind": "lora", "targets": ["q"], "skills": 0}},
         "recipe key 'skills' must be a positive integer, got 0"),
        ({"adapter": {"kind": "lora", "targets": ["q"]}, "seed": "zero"},
         "recipe key 'seed' must be an integer, got 'zero'"),
        ({"adapter": {"kind": "lora", "targets": ["q"]}, "router": "poly"},
         "recipe key 'router' must be a table, got str"),
        ({"adapter": ["lora"]}, "recipe key 'adapter' must be a table, got list"),
    ],
)
def test_bad_recipes_name_the_key(data: dict, message: str) -> None:
    with pytest.raises(RecipeError) as info:
        Recipe.from_dict(data)
    assert str(info.value) == message


def test_malformed_toml_is_one_line() -> None:
    with pytest.raises(RecipeError) as info:
        Recipe.from_toml("[adapter]\nkind = lora\n")
    message = str(info.value)
    assert message.startswith("malformed recipe TOML: ") and "line 2" in message
    assert "\n" not in message
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_unknown_kind_arg_is_named_at_attach(builtin_host: PluginHost) -> None:
    recipe = {"adapter": {"kind": "lora", "targets": ["0"], "rank": 4}}
    model = nn.Sequential(nn.Linear(3, 3))
    with pytest.raises(RecipeError) as info:
        adapterkit.attach(model, recipe, host=builtin_host)
    assert str(info.value) == "unknown key 'rank' for adapter kind 'lora'; valid keys: alpha, dropout, init_a, r"
    assert not hasattr(model, "_adapterkit") and all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("role", ["splitter", "sampler", "router", "merger"])
def test_unknown_role_arg_is_named_at_attach(builtin_host: PluginHost, role: str) -> None:
    recipe = {"adapter": {"kind": "lora", "targets": ["0"]}, role: {"n_cells": 4}}
    default = Recipe.from_dict(recipe).role(role).name
    with pytest.raises(RecipeError) as info:
        adapterkit.attach(nn.Sequential(nn.Linear(3, 3)), recipe, host=builtin_host)
    assert str(info.value) == f"unknown key 'n_cells' for {role} {default!r}; valid keys: none"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"r": 0}, "bad arguments for adapter kind 'lora': r must be a positive integer, got 0"),
        ({"dropout": 1.5}, "bad arguments for adapter kind 'lora': dropout must be in [0, 1), got 1.5"),
    ],
)
def test_bad_kind_values(builtin_host: PluginHost, args: dict, message: str) -> None:
    with pytest.raises(RecipeError) as info:
        adapterkit.attach(nn.Sequential(nn.Linear(3, 3)), {"adapter": {"kind": "lora", "targets": ["0"], **args}},
                          host=builtin_host)
    assert str(info.value) == message


def test_recipe_is_frozen() -> None:
    recipe = Recipe.from_dict({"adapter": {"kind": "lora", "targets": ["q"]}})
    with pytest.raises(AttributeError):
        recipe.kind = "bottleneck"  # type: ignore[misc]
