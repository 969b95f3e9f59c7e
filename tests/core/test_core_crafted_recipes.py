"""Crafted recipes in validly-digested files: refused in one line before anything large is
allocated (the digest proves integrity, not intent)."""

from __future__ import annotations

import json
import re
import tracemalloc
from collections import OrderedDict

import fsspec
import pytest
import torch
from torch import nn

import adapterkit
from adapterkit.storage.tensors import encode


def base() -> nn.Module:
    return nn.Sequential(OrderedDict(enc=nn.Linear(64, 64)))


def crafted(url: str, **recipe_changes: object) -> None:
    """A real r=1 LoRA file whose recipe says something else, re-encoded with valid digests."""
    from adapterkit.storage.format import KEY_HISTORY, KEY_PLUGINS, KEY_RECIPE, KEY_SITES

    model = adapterkit.attach(base(), {"adapter": {"kind": "lora", "targets": ["enc"], "r": 1}})
    adapterkit.save(model, url)
    info = adapterkit.inspect(url)
    recipe = info.recipe.to_dict()  # type: ignore[union-attr]
    for key, value in recipe_changes.items():
        (recipe if key == "seed" else recipe["adapter"])[key] = value
    own = {KEY_RECIPE: json.dumps(recipe), KEY_SITES: json.dumps(list(info.sites)),
           KEY_PLUGINS: json.dumps(dict(info.plugins)), KEY_HISTORY: json.dumps([dict(s) for s in info.history])}
    _, parts = encode(adapterkit.load_tensors(url), {**info.metadata, **own}, "adapter")
    fs, path = fsspec.core.url_to_fs(url)
    fs.pipe(path, b"".join(bytes(p) for p in parts))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"r": 2**40}, r"its recipe would allocate .* adapter elements on this model but the file holds 128"),
        ({"r": 5_000_000}, r"its recipe would allocate 640,000,000 adapter elements"),
        ({"skills": 10**6}, r"recipe key 'skills' must be at most 65,536"),
        ({"seed": 10**30}, r"recipe key 'seed' must be at most 9,223,372,036,854,775,807"),
        ({"kind": 7}, r"'adapter.kind' must be a name, got 7"),
    ],
)
def test_a_crafted_recipe_is_refused_before_allocating(change: dict, message: str) -> None:
    url = f"memory://crafted/{next(iter(change))}.safetensors"
    crafted(url, **change)
    try:
        adapterkit.inspect(url)
    except adapterkit.StorageError as exc:  # refused already when reading the header (schema)
        assert "\n" not in str(exc) and re.search(message, str(exc)), str(exc)
        return
    model = base()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tracemalloc.start()
    try:
        with pytest.raises(adapterkit.AdapterkitError, match=message) as info:
            adapterkit.load(url, model)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "\n" not in str(info.value)
    assert peak < 1_000_000  # nothing near the recipe's size was allocated
    assert not adapterkit.is_attached(model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
