"""Cells: disjoint, covering, equal quantile bins, seeded, nested; bad arguments fail at attach."""

from __future__ import annotations

import pytest
import torch
from adapterkit_mosa.cells import coarse_ids, random_cells
from adapterkit_mosa.splitters import SparseDelta
from mosa_testlib import mosa_recipe, tiny_bert

import adapterkit
from adapterkit.errors import AttachError, RecipeError


def test_cells_are_equal_quantile_bins_of_seeded_scores() -> None:
    ids = random_cells((17, 23), 4, torch.Generator().manual_seed(5))
    assert ids.dtype == torch.uint8 and ids.shape == (17, 23)
    counts = torch.bincount(ids.flatten().long(), minlength=4)
    assert counts.sum() == 17 * 23 and counts.max() - counts.min() <= 1  # covering, equal sizes
    # The same scores, ranked: element of rank k belongs to bin k * N // numel.
    scores = torch.rand(17 * 23, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ranks = torch.argsort(torch.argsort(scores, stable=True), stable=True)
    assert torch.equal(ids.flatten().long(), ranks * 4 // (17 * 23))


def test_same_seed_same_cells_other_seed_other_cells() -> None:
    a = random_cells((16, 32), 4, torch.Generator().manual_seed(3))
    b = random_cells((16, 32), 4, torch.Generator().manual_seed(3))
    c = random_cells((16, 32), 4, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("share, split", [("down", {"up"}), ("up", {"down"}), ("none", {"down", "up"})])
def test_share_selects_the_split_sides_and_masks_cover_disjointly(make_model, share: str, split: set[str]) -> None:
    model = make_model(share=share)
    for site in adapterkit.sites(model).values():
        celled = {name for name, m in site.projections.items() if isinstance(m, SparseDelta)}
        assert celled == split  # biases (side None) are never split
        for name in celled:
            module = site.projections[name]
            masks = torch.stack([module.cell_ids == i for i in range(4)])
            assert torch.equal(masks.sum(0), torch.ones_like(module.cell_ids, dtype=torch.long))  # disjoint, covering
            assert module.cell_ids.dtype == torch.uint8
            assert (module.w0 is None) == (name == "up")  # zero init costs nothing


def test_lora_splits_b_by_default_and_a_with_share_up(make_model) -> None:
    for share, split in (("down", "B"), ("up", "A")):
        model = make_model(kind="lora", share=share)
        for site in adapterkit.sites(model).values():
            assert [n for n, m in site.projections.items() if isinstance(m, SparseDelta)] == [split]


def test_attach_is_seeded_and_leaves_the_init_stream_alone(make_model) -> None:
    a, b = make_model(), make_model()
    c = make_model(splitter_args={"seed": 1})
    ids = [adapterkit.sites(m)["encoder.layer.1.output"].projections["up"].cell_ids for m in (a, b, c)]
    assert torch.equal(ids[0], ids[1]) and not torch.equal(ids[0], ids[2])
    dense = adapterkit.attach(tiny_bert(), {k: v for k, v in mosa_recipe().items() if k == "adapter"})
    down = [adapterkit.sites(m)["encoder.layer.1.output"].projections["down"].weight for m in (a, dense)]
    assert torch.equal(down[0], down[1])  # same recipe seed: same init as the dense adapter


def test_nested_levels_refine_each_other(make_model) -> None:
    model = make_model(splitter="hierarchical", splitter_args={"levels": [2, 4, 8]})
    module = adapterkit.sites(model)["encoder.layer.0.output"].projections["up"]
    levels = module.partition.meta["levels"]
    assert levels == (2, 4, 8) and module.n_cells == 8
    fine = module.cell_ids
    for level in range(3):
        coarse = coarse_ids(fine, levels, level)
        counts = torch.bincount(coarse.flatten(), minlength=levels[level])
        assert counts.max() - counts.min() <= 1
        if level:  # every cell of this level lies inside exactly one cell of the previous level
            parent = coarse_ids(fine, levels, level - 1)
            for cell in range(levels[level]):
                assert parent[coarse == cell].unique().numel() == 1


@pytest.mark.parametrize(
    "options, error, message",
    [
        ({"n_cells": 0}, RecipeError, "n_cells must be a positive integer, got 0"),
        (
            {"n_cells": 1000}, AttachError,
            "site 'encoder.layer.0.output': cannot split projection 'up': n_cells=1000 exceeds the 256 elements",
        ),
        ({"share": "left"}, RecipeError, "share must be one of 'down', 'up', 'none', got 'left'"),
        ({"splitter_args": {"cells": 4}}, RecipeError, "unknown key 'cells' for splitter 'mosa'"),
        ({"splitter": "hierarchical", "splitter_args": {"levels": [2, 3]}}, RecipeError, "do not nest"),
        ({"splitter": "hierarchical", "splitter_args": {"levels": [4, 2]}}, RecipeError, "do not nest"),
        ({"splitter": "hierarchical", "splitter_args": {"levels": [2, 512]}}, AttachError, "n_cells=512 exceeds"),
        ({"splitter": "hierarchical", "sampler": {"name": "hierarchical", "mix": [1, -1]}}, RecipeError, "negative"),
        ({"splitter": "hierarchical", "sampler": {"name": "hierarchical", "schedule": "z"}}, RecipeError, "one of"),
    ],
)
def test_bad_arguments_fail_at_attach_with_one_line(make_model, options, error, message) -> None:
    with pytest.raises(error) as info:
        make_model(**options)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_mix_that_does_not_fit_the_levels_fails_at_attach(make_model) -> None:
    with pytest.raises(AttachError, match=r"mix has 2 weights but the partition has levels \[2, 4, 8\]") as info:
        make_model(splitter="hierarchical", sampler={"name": "hierarchical", "mix": [1, 1]})
    assert "site '" in str(info.value) and "\n" not in str(info.value)


def test_more_than_256_cells_widen_the_id_dtype() -> None:
    ids = random_cells((40, 40), 300, torch.Generator().manual_seed(0))
    assert ids.dtype == torch.int32 and ids.unique().numel() == 300
