"""Merge: the mean of N explicit module copies; a plain dense adapter; eval forward = expectation."""

from __future__ import annotations

import copy

import pytest
import torch
from adapterkit_mosa import SparseDelta
from adapterkit_mosa.cells import coarse_ids
from mosa_testlib import mosa_recipe, randomize_deltas, split_modules, tiny_bert

import adapterkit
from adapterkit.site import AdapterSite


def w0_of(module: SparseDelta) -> torch.Tensor:
    return module.w0 if module.w0 is not None else torch.zeros_like(module.delta)  # zero init: not stored


def reference_copies(module: SparseDelta) -> list[torch.Tensor]:
    """The official layout, built by hand: module i is a full copy ``W0 + M_i * D``."""
    return [w0_of(module) + (module.cell_ids == i) * module.delta for i in range(module.n_cells)]


@pytest.mark.parametrize("kind", ["bottleneck", "lora"])
def test_merge_is_the_mean_of_n_explicit_copies_and_a_plain_adapter(make_model, batch, kind: str) -> None:
    model = make_model(kind=kind, share="none")
    randomize_deltas(model)
    model.eval()
    expected_out = model(**batch).last_hidden_state
    copies = {}
    for name, site in adapterkit.sites(model).items():
        for proj, module in site.projections.items():
            if isinstance(module, SparseDelta):
                copies[name, proj] = reference_copies(module)
                for i, copy_i in enumerate(copies[name, proj]):  # the training-time weight of module i
                    assert torch.equal(module(torch.eye(4)[i]), copy_i)
    adapterkit.merge(model)
    dense = adapterkit.attach(tiny_bert(), {"adapter": mosa_recipe(kind=kind)["adapter"]})
    assert adapterkit.summary(dense).trainable == sum(
        p.numel() for s in adapterkit.sites(model).values() for p in s.adapter_parameters()
    )  # same size as a standard adapter
    for name, site in adapterkit.sites(model).items():
        assert not any(isinstance(m, SparseDelta) for m in site.modules())
        for (site_name, proj), reference in copies.items():
            if site_name == name:
                torch.testing.assert_close(site.projections[proj].weight, torch.stack(reference).mean(0))
    torch.testing.assert_close(model(**batch).last_hidden_state, expected_out)  # eval forward = merged


def test_eval_forward_equals_the_expectation_built_by_hand(make_model, batch) -> None:
    model = make_model(share="none")
    randomize_deltas(model)
    dense = adapterkit.attach(tiny_bert(), {"adapter": mosa_recipe()["adapter"]})
    with torch.no_grad():
        for name, site in adapterkit.sites(model).items():
            for proj, module in site.projections.items():
                target = adapterkit.sites(dense)[name].projections[proj].weight
                if isinstance(module, SparseDelta):
                    target.copy_(w0_of(module) + module.delta / 4)  # W0 + D / N
                else:
                    target.copy_(module.weight)
    model.eval()
    dense.eval()
    torch.testing.assert_close(model(**batch).last_hidden_state, dense(**batch).last_hidden_state)


def test_lora_mosa_merge_then_fold_matches_folding_directly(make_model, batch) -> None:
    model = make_model(kind="lora", share="none")
    randomize_deltas(model)
    folded = adapterkit.merge(copy.deepcopy(model), "fold")
    merged = adapterkit.merge(model)
    assert not adapterkit.sites(folded)
    for m in (merged, folded):
        m.eval()
    torch.testing.assert_close(merged(**batch).last_hidden_state, folded(**batch).last_hidden_state)


def test_hierarchical_merge_is_the_expectation_over_levels_and_cells(make_model, batch) -> None:
    mix = (0.5, 0.3, 0.2)
    model = make_model(
        splitter="hierarchical", share="none", splitter_args={"levels": [2, 4, 8]},
        sampler={"name": "hierarchical", "mix": list(mix)},
    )
    randomize_deltas(model)
    expected = {}
    for name, site in adapterkit.sites(model).items():
        for proj, module in site.projections.items():
            if isinstance(module, SparseDelta):
                levels = module.partition.meta["levels"]
                weight = torch.zeros_like(module.delta)
                for level, (p_level, n) in enumerate(zip(mix, levels, strict=True)):
                    ids = coarse_ids(module.cell_ids, levels, level)
                    for cell in range(n):  # E over (level, cell) of W0 + M_{level,cell} * D
                        weight += p_level / n * (w0_of(module) + (ids == cell) * module.delta)
                expected[name, proj] = weight
    model.eval()
    out = model(**batch).last_hidden_state
    adapterkit.merge(model)
    for (name, proj), weight in expected.items():
        torch.testing.assert_close(adapterkit.sites(model)[name].projections[proj].weight, weight)
    torch.testing.assert_close(model(**batch).last_hidden_state, out)


def test_routed_skills_keep_their_router_and_lose_only_the_cells(routed_host, batch) -> None:
    recipe = mosa_recipe(share="none")
    recipe["adapter"]["skills"] = 3
    recipe["router"] = {"name": "test-mix"}
    model = adapterkit.attach(tiny_bert(), recipe, host=routed_host)
    randomize_deltas(model)
    model.eval()
    task_ids = torch.tensor([0, 2, 1, 1])
    with adapterkit.route(model, task_ids):
        before = model(**batch).last_hidden_state
    routers = {n: s.router for n, s in adapterkit.sites(model).items()}
    adapterkit.merge(model, host=routed_host)
    assert not split_modules(model)
    for name, site in adapterkit.sites(model).items():
        assert isinstance(site, AdapterSite) and site.skills == 3 and site.router is routers[name]
    with adapterkit.route(model, task_ids):
        torch.testing.assert_close(model(**batch).last_hidden_state, before)
