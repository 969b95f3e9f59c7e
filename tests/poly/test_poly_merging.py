"""Mergers: per-task collapse, fold and unfold, average (MHR-mu), weighted, soups."""

from __future__ import annotations

import copy

import pytest
import torch
from adapterkit_poly import soup, unfold
from polylib import output, poly_recipe, routed_t5, t5_inputs
from torch import nn

import adapterkit
from adapterkit.errors import AdapterkitError

TOL = dict(rtol=1e-5, atol=1e-5)


def routed_outputs(model: nn.Module, inputs: dict[str, torch.Tensor], tasks: int) -> list[torch.Tensor]:
    batch = next(iter(inputs.values())).shape[0]
    with torch.no_grad():
        outs = []
        for t in range(tasks):
            with adapterkit.route(model, [t] * batch):
                outs.append(output(model, inputs))
    return outs


@pytest.mark.parametrize("heads", [1, 4])
def test_collapse_and_fold_equal_the_routed_model(t5_base, heads: int) -> None:
    model = routed_t5(t5_base, heads=heads, tasks=3).eval()
    inputs = t5_inputs()
    expected = routed_outputs(model, inputs, 3)
    assert not torch.allclose(expected[0], expected[1], **TOL)  # tasks really differ
    bare = output(t5_base, inputs)
    for task in range(3):
        collapsed = adapterkit.merge(copy.deepcopy(model), "collapse", task=task)
        sites = adapterkit.sites(collapsed)
        assert all(s.skills == 1 and s.projections["A"].weight.shape[0] == 1 for s in sites.values())
        with torch.no_grad():
            torch.testing.assert_close(output(collapsed, inputs), expected[task], **TOL)
        folded = adapterkit.merge(collapsed, "fold")  # the built-in merger works once collapsed
        assert not adapterkit.sites(folded)
        assert sum(p.numel() for p in folded.parameters()) == sum(p.numel() for p in t5_base.parameters())
        with torch.no_grad():
            torch.testing.assert_close(output(folded, inputs), expected[task], **TOL)
            assert (output(folded, inputs) - bare).abs().max() > 1e-3


def test_collapse_fold_then_unfold(t5_base) -> None:
    model = routed_t5(t5_base, heads=4, tasks=3).eval()
    inputs = t5_inputs()
    expected = routed_outputs(model, inputs, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapterkit.merge(model, "collapse", task=1, fold=True)
    assert not adapterkit.sites(model)
    assert set(model.state_dict()) == set(t5_base.state_dict())  # a plain T5 again: same keys
    with torch.no_grad():
        torch.testing.assert_close(output(model, inputs), expected[1], **TOL)
    unfold(model)
    after = model.state_dict()
    assert set(after) == set(before)
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=1e-6)
    torch.testing.assert_close(routed_outputs(model, inputs, 3)[2], expected[2], **TOL)
    with pytest.raises(AdapterkitError, match="nothing to unfold"):
        unfold(model)


def test_collapse_errors(t5_base) -> None:
    model = routed_t5(t5_base, heads=1, tasks=3)
    with pytest.raises(AdapterkitError, match="say which task"):
        adapterkit.merge(copy.deepcopy(model), "collapse")
    with pytest.raises(AdapterkitError, match=r"task 3 is out of range"):
        adapterkit.merge(copy.deepcopy(model), "collapse", task=3)
    with pytest.raises(AdapterkitError, match="collapse it to one task first"):
        adapterkit.merge(model, "fold")


@pytest.mark.parametrize("heads", [1, 4])
def test_average_equals_uniform_routing(t5_base, heads: int) -> None:
    routed = routed_t5(t5_base, heads=heads, tasks=3).eval()
    uniform = adapterkit.attach(copy.deepcopy(t5_base), poly_recipe(["q", "v"], heads=heads, router="uniform")).eval()
    skills = {k: v for k, v in adapterkit.adapter_state_dict(routed).items() if ".projections." in k}
    uniform.load_state_dict(skills, strict=False)
    inputs = t5_inputs()
    with torch.no_grad():
        expected = output(uniform, inputs)
        averaged = adapterkit.merge(routed, "average")
        assert all(s.skills == 1 for s in adapterkit.sites(averaged).values())
        torch.testing.assert_close(output(averaged, inputs), expected, **TOL)


def _delta(site: nn.Module) -> torch.Tensor:
    """A site's dense update ``scale * A B`` (single skill)."""
    a, b = site.projections["A"].weight[0], site.projections["B"].weight[0]
    return site.config.scale * a @ b


def test_weighted_separate_and_delta(t5_base) -> None:
    model = routed_t5(t5_base, heads=1, tasks=3, skills=3, r=4)
    weights = [0.5, -0.25, 1.0]
    name = "encoder.block.0.layer.0.SelfAttention.q"
    site = adapterkit.sites(model)[name]
    a, b = site.projections["A"].weight, site.projections["B"].weight
    separate = adapterkit.merge(copy.deepcopy(model), "weighted", weights=weights)
    torch.testing.assert_close(
        _delta(adapterkit.sites(separate)[name]),
        (sum(w * a[k] for k, w in enumerate(weights)) @ sum(w * b[k] for k, w in enumerate(weights))) / 4,
    )
    exact = sum(w * a[k] @ b[k] for k, w in enumerate(weights)) / 4
    delta = adapterkit.merge(copy.deepcopy(model), "weighted", weights=weights, mode="delta")
    merged = adapterkit.sites(delta)[name]
    assert merged.config.r == 12  # K * r: exact, no SVD
    torch.testing.assert_close(_delta(merged), exact, rtol=1e-5, atol=1e-6)
    svd = adapterkit.sites(adapterkit.merge(copy.deepcopy(model), "weighted", weights=weights, mode="delta",
                                            rank=12))[name]
    torch.testing.assert_close(_delta(svd), exact, rtol=1e-4, atol=1e-6)
    low = adapterkit.sites(adapterkit.merge(copy.deepcopy(model), "weighted", weights=weights, mode="delta",
                                            rank=2))[name]
    best = torch.linalg.svdvals(exact.double())
    err = torch.linalg.matrix_norm((_delta(low) - exact).double())
    torch.testing.assert_close(err, best[2:].square().sum().sqrt(), rtol=1e-4, atol=1e-7)  # Eckart-Young optimum
    with pytest.raises(AdapterkitError, match="needs 3 weights"):
        adapterkit.merge(copy.deepcopy(model), "weighted", weights=[1.0, 2.0])


def test_weighted_per_head_weights_match_a_router(t5_base) -> None:
    model = routed_t5(t5_base, heads=4, tasks=3, skills=2).eval()
    rows = [[1.0, 0.0], [0.5, 0.5], [0.2, 0.8], [0.0, 1.0]]
    inputs = t5_inputs()
    merged = adapterkit.merge(copy.deepcopy(model), "weighted", weights=rows)
    name = "encoder.block.0.layer.0.SelfAttention.v"
    site, plain = adapterkit.sites(model)[name], adapterkit.sites(merged)[name]
    w = torch.tensor(rows).unsqueeze(0)
    a = site.projections["A"].weight.view(2, 4, -1, 4)
    b = site.projections["B"].weight.view(2, 4, 4, -1)
    a_mix = torch.einsum("hk,khdr->hdr", w[0], a).reshape(-1, 4)
    b_mix = torch.einsum("hk,krhd->rhd", w[0], b).reshape(4, -1)
    torch.testing.assert_close(plain.projections["A"].weight[0], a_mix)
    torch.testing.assert_close(plain.projections["B"].weight[0], b_mix)
    with torch.no_grad():
        assert output(merged, inputs).isfinite().all()


def test_soup_averages_compatible_adapters(t5_base) -> None:
    models = [routed_t5(t5_base, heads=1, tasks=3, seed=s) for s in range(3)]
    states = [adapterkit.adapter_state_dict(m) for m in models]
    mean = soup(states)
    weighted = soup(states, [1.0, 0.0, 0.0])
    for key in states[0]:
        torch.testing.assert_close(mean[key], (states[0][key] + states[1][key] + states[2][key]) / 3)
        torch.testing.assert_close(weighted[key], states[0][key])
    other = adapterkit.adapter_state_dict(routed_t5(t5_base, heads=1, tasks=3, skills=2))
    with pytest.raises(AdapterkitError, match="shape"):
        soup([states[0], other])
    with pytest.raises(AdapterkitError, match="2 weights for 3 adapters"):
        soup(states, [0.5, 0.5])
