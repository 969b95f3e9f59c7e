"""Hierarchical sampler: a level by its mix (or the coarse-to-fine schedule), then a cell of it."""

from __future__ import annotations

import pytest
import torch
from adapterkit_mosa import HierarchicalSampler
from adapterkit_mosa.cells import coarse_ids
from mosa_testlib import CHI2_999, chi2_uniform, split_modules, tiny_bert

import adapterkit
from adapterkit import set_progress
from adapterkit.roles import Partition

LEVELS = (2, 4, 8)


def partition() -> Partition:
    return Partition(n_cells=8, cell_ids=torch.arange(8, dtype=torch.uint8), meta={"levels": LEVELS})


def decode(gates: torch.Tensor) -> tuple[int, int]:
    """``(level, cell)`` of a training draw over the finest cells (the active set is one level cell)."""
    active = gates.nonzero().flatten()
    level = LEVELS.index(8 // len(active))
    cells = coarse_ids(active, LEVELS, level).unique()
    assert cells.numel() == 1 and len(active) == 8 // LEVELS[level]
    assert torch.equal(active, (coarse_ids(torch.arange(8), LEVELS, level) == cells[0]).nonzero().flatten())
    return level, int(cells[0])


def test_levels_follow_the_mix_and_cells_are_uniform_within_a_level() -> None:
    mix = (0.5, 0.3, 0.2)
    sampler = HierarchicalSampler(HierarchicalSampler.Config(mix=mix))
    torch.manual_seed(0)
    draws = torch.tensor([decode(sampler.gates(partition(), True, torch.device("cpu"))) for _ in range(3000)])
    counts = torch.bincount(draws[:, 0], minlength=3).double()
    expected = torch.tensor(mix, dtype=torch.float64) * len(draws)
    assert float(((counts - expected) ** 2 / expected).sum()) < 13.82  # chi-square df 2, p = 0.001
    assert chi2_uniform(draws[draws[:, 0] == 1, 1], 4) < CHI2_999[3]
    assert chi2_uniform(draws[draws[:, 0] == 0, 1], 2) < 10.83  # df 1
    eval_gates = sampler.gates(partition(), False, torch.device("cpu"))
    torch.testing.assert_close(eval_gates, torch.full((8,), 0.5 / 2 + 0.3 / 4 + 0.2 / 8))  # sum_l mix_l / n_l


@pytest.mark.parametrize("progress, mix", [(0.0, (1, 0, 0)), (0.5, (0, 1, 0)), (1.0, (0, 0, 1)), (0.25, (0.5, 0.5, 0))])
def test_coarse_to_fine_schedule_moves_the_level_mix(progress: float, mix: tuple[float, ...]) -> None:
    sampler = HierarchicalSampler(HierarchicalSampler.Config(schedule="coarse-to-fine"))
    sampler.set_progress(progress)
    torch.testing.assert_close(sampler.level_mix(LEVELS, torch.device("cpu")), torch.tensor(mix, dtype=torch.float32))
    levels = {decode(sampler.gates(partition(), True, torch.device("cpu")))[0] for _ in range(60)}
    assert levels == {i for i, p in enumerate(mix) if p > 0}


def test_set_progress_reaches_the_model_sampler(make_model, batch) -> None:
    model = make_model(splitter="hierarchical", sampler={"name": "hierarchical", "schedule": "coarse-to-fine"})
    model.train()
    for progress, active in ((0.0, 4), (1.0, 1)):  # 8 finest cells: a coarsest cell holds 4 of them
        set_progress(model, progress)
        model(**batch)
        for module in split_modules(model):
            assert int(module.touched.sum()) == active
            module.touched.zero_()
    sampler = next(iter(adapterkit.sites(model).values())).sampler
    assert float(sampler.progress) == 1.0


def test_a_loaded_coarse_to_fine_adapter_evaluates_at_its_saved_progress(make_model, batch) -> None:
    # the eval gates (and so the merge) depend on the schedule's progress: it is saved with the
    # adapter (a buffer of the sampler module every site holds) and a fresh load evaluates alike
    recipe = {"splitter": "hierarchical", "sampler": {"name": "hierarchical", "schedule": "coarse-to-fine"}}
    model = make_model(**recipe)
    with torch.no_grad():
        for module in split_modules(model):
            for p in module.parameters():
                p.add_(torch.randn_like(p))
    set_progress(model, 0.6)
    model.eval()
    with torch.no_grad():
        expected = model(**batch).last_hidden_state
    url = "memory://mosa-tests/coarse-to-fine.safetensors"
    adapterkit.save(model, url)
    fresh = adapterkit.load(url, tiny_bert()).eval()  # a fresh base: the file's recipe is attached
    assert float(next(iter(adapterkit.sites(fresh).values())).sampler.progress) == pytest.approx(0.6)
    with torch.no_grad():
        assert torch.equal(fresh(**batch).last_hidden_state, expected)
        set_progress(fresh, 0.0)
        assert not torch.equal(fresh(**batch).last_hidden_state, expected)  # (the progress matters)
