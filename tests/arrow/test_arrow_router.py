"""The arrow router and the per-token LoRA path: prototypes are the dense ΔW's top right
singular vectors; the forward is Arrow by its definition; compile sees one graph; the
model saves, loads and refuses what it cannot do in one line."""

from __future__ import annotations

import copy

import pytest
import torch
from adapterkit_arrow import ArrowRouter, NotReady, arrow, compute_prototypes, top_right_singular_vectors
from arrowlib import bert_inputs, dense_update, expert, memory_url, mlp, reference_arrow, tiny_bert, top_right
from torch import nn

import adapterkit

SITES = ["0", "2"]


def saved_experts(base: nn.Module, specs: list[dict], gap: float | None = None) -> list[str]:
    prefix = memory_url("router")
    urls = []
    for i, spec in enumerate(specs):
        url = f"{prefix}/e{i}.safetensors"
        adapterkit.save(expert(base, SITES, seed=i, gap=gap, **spec), url)
        urls.append(url)
    return urls


def sign_free(a: torch.Tensor, b: torch.Tensor) -> float:
    return min((a.double() - b.double()).abs().max().item(), (a.double() + b.double()).abs().max().item())


def test_prototypes_are_the_top_right_singular_vectors_of_the_dense_update() -> None:
    """Batched QR + small SVD, never forming ΔW, equals the SVD of ΔW (to sign), for tall,
    wide and rank-deficient (zero-padded) factors."""
    g = torch.Generator().manual_seed(0)
    for d_in, d_out, r in ((64, 48, 8), (12, 96, 4), (40, 40, 16), (8, 30, 12)):
        a, b = torch.randn(5, d_in, r, generator=g), torch.randn(5, r, d_out, generator=g)
        a[0, :, r // 2:] = 0  # a smaller rank zero-padded, as stack pads
        protos = top_right_singular_vectors(a, b)
        assert protos.shape == (5, d_in) and protos.dtype == a.dtype
        for k in range(5):
            assert sign_free(protos[k], top_right(dense_update(a[k], b[k]))) < 1e-5
            assert protos[k].abs().argmax() == protos[k].argmax()  # signed: the largest entry is positive


def test_stacked_prototypes_match_each_expert_file() -> None:
    """Ranks padded and different scales folded by stack change nothing: each site's row k is
    the top right singular vector of expert k's own ΔW."""
    base = mlp()
    specs = [{"r": 4, "alpha": 8.0}, {"r": 2}, {"r": 3, "alpha": 0.5}]
    urls = saved_experts(base, specs)
    model = arrow(copy.deepcopy(base), urls, top_k=2)
    for k, url in enumerate(urls):
        single = adapterkit.load(url, copy.deepcopy(base))
        for name, site in adapterkit.sites(model).items():
            own = adapterkit.sites(single)[name]
            w = own.mixed_weights()
            want = top_right(dense_update(w["A"], w["B"], own.scale))
            assert sign_free(site.router.prototypes[k], want) < 1e-6


@pytest.mark.parametrize(("top_k", "temperature"), [(1, 1.0), (2, 0.5), (3, 2.0), (9, 1.0)])
def test_forward_is_arrow_by_definition(top_k: int, temperature: float) -> None:
    base = mlp()
    specs = [{"r": 4, "alpha": 8.0}, {"r": 2}, {"r": 3, "alpha": 0.5}]
    urls = saved_experts(base, specs)
    model = arrow(copy.deepcopy(base), urls, top_k=top_k, temperature=temperature)
    experts = [adapterkit.sites(adapterkit.load(u, copy.deepcopy(base))) for u in urls]
    x = torch.randn(4, 5, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        site0 = adapterkit.sites(model)["0"]
        got = site0(x)
        w = [e["0"].mixed_weights() for e in experts]
        a = [wk["A"] for wk in w]
        b = [wk["B"] for wk in w]
        want = reference_arrow(x, site0.base, a, b, [e["0"].scale for e in experts], site0.router.prototypes,
                               top_k, temperature)
    assert (got.double() - want).abs().max() < 1e-5
    weights = site0.router.token_weights(x)
    assert weights.shape == (4, 5, 3)
    assert torch.allclose(weights.sum(-1), torch.ones(4, 5))
    assert ((weights > 0).sum(-1) == min(top_k, 3)).all()


def test_one_expert_is_that_expert() -> None:
    base = mlp()
    (url,) = saved_experts(base, [{"r": 4}])
    model = arrow(copy.deepcopy(base), [url])
    x = torch.randn(3, 16)
    torch.testing.assert_close(model(x), adapterkit.load(url, copy.deepcopy(base))(x))


def test_genknowsub_routes_on_the_purified_experts() -> None:
    base = mlp()
    urls = saved_experts(base, [{"r": 4}, {"r": 4, "alpha": 8.0}, {"r": 4}])
    general = saved_experts(base, [{"r": 4}, {"r": 4, "alpha": 2.0}], gap=0.5)
    model = arrow(copy.deepcopy(base), urls, general=general)
    assert adapterkit.recipe_of(model).router.args["general"] == [adapterkit.inspect(u).digest for u in general]
    g = [adapterkit.sites(adapterkit.load(u, copy.deepcopy(base))) for u in general]
    for k, url in enumerate(urls):
        own = adapterkit.sites(adapterkit.load(url, copy.deepcopy(base)))
        for name, site in adapterkit.sites(model).items():
            mean_a = sum(x[name].mixed_weights()["A"] for x in g) / 2
            mean_b = sum(x[name].mixed_weights()["B"] for x in g) / 2
            w = own[name].mixed_weights()
            purified = dense_update(w["A"] - mean_a, w["B"] - mean_b, own[name].scale)
            mine = site.scale * site.projections["A"].weight[k].double() @ site.projections["B"].weight[k].double()
            assert (mine.T - purified).abs().max() < 1e-5
            assert sign_free(site.router.prototypes[k], top_right(purified)) < 1e-6


def test_saved_arrow_model_reloads_with_its_prototypes() -> None:
    base = mlp()
    urls = saved_experts(base, [{"r": 4}, {"r": 2}, {"r": 4}])
    model = arrow(copy.deepcopy(base), urls, top_k=2, temperature=0.5)
    url = memory_url("saved") + "/arrow.safetensors"
    info = adapterkit.save(model, url)
    assert any(t.name == "0.router.prototypes" for t in info.tensors)
    fresh = adapterkit.load(url, copy.deepcopy(base))
    x = torch.randn(5, 16)
    assert torch.equal(fresh(x), model(x))
    assert [s["op"] for s in adapterkit.history(fresh)][:2] == ["attach", "stack"]


def test_stacked_by_hand_needs_prototypes_then_computes_them() -> None:
    base = mlp()
    urls = saved_experts(base, [{"r": 4}, {"r": 4}])
    model = adapterkit.stack(urls, copy.deepcopy(base), router={"name": "arrow", "top_k": 1})
    with pytest.raises(NotReady, match="no prototypes"):
        model(torch.randn(2, 16))
    compute_prototypes(model)
    reference = arrow(copy.deepcopy(base), urls, top_k=1)
    x = torch.randn(2, 16)
    assert torch.equal(model(x), reference(x))


def test_refusals_are_one_line() -> None:
    base = mlp()
    urls = saved_experts(base, [{"r": 4}, {"r": 4}])
    model = arrow(copy.deepcopy(base), urls)
    with pytest.raises(adapterkit.AdapterkitError, match="no per-task weights") as info:
        adapterkit.merge(model, "collapse", task=0)
    assert "\n" not in str(info.value)
    with pytest.raises(adapterkit.AttachError, match="cannot mix its skills per token"):
        adapterkit.attach(mlp(), {"adapter": {"kind": "bottleneck", "targets": ["0"], "skills": 2, "d_out": 32},
                                  "router": {"name": "arrow"}})
    with pytest.raises(adapterkit.AttachError, match="takes no heads"):
        adapterkit.attach(mlp(), {"adapter": {"kind": "lora", "targets": ["2"], "skills": 2},
                                  "splitter": {"name": "mhr", "heads": 2}, "router": {"name": "arrow"}})
    with pytest.raises(adapterkit.RecipeError, match="top_k"):
        adapterkit.attach(mlp(), {"adapter": {"kind": "lora", "targets": ["2"], "skills": 2},
                                  "router": {"name": "arrow", "top_k": 0}})
    with pytest.raises(adapterkit.AdapterkitError, match="fresh copy"):
        arrow(model, urls)
    with pytest.raises(adapterkit.AdapterkitError, match="not one string"):
        arrow(copy.deepcopy(base), urls[0])
    other = saved_experts(base, [{"r": 2}])
    with pytest.raises(adapterkit.AdapterkitError, match="one rank"):
        arrow(copy.deepcopy(base), urls, general=other)


def test_merging_the_experts_still_works() -> None:
    """The experts of an arrow model are plain stacked skills: mergers combine them (the
    uniform task-arithmetic mean equals Arrow with every weight 1/K)."""
    base = mlp()
    urls = saved_experts(base, [{"r": 4}, {"r": 2}, {"r": 4}])
    model = arrow(copy.deepcopy(base), urls, top_k=3, temperature=1e6)  # ~uniform weights
    merged = adapterkit.merge(copy.deepcopy(model), "task-arithmetic", weights=[1 / 3] * 3)
    x = torch.randn(4, 16)
    torch.testing.assert_close(merged(x), model(x), atol=1e-4, rtol=1e-4)


def test_training_through_arrow_reaches_every_selected_expert() -> None:
    base = mlp()
    urls = saved_experts(base, [{"r": 4}, {"r": 4}, {"r": 4}])
    model = arrow(copy.deepcopy(base), urls, top_k=2).train()
    model(torch.randn(6, 16)).square().mean().backward()
    grads = adapterkit.sites(model)["0"].projections["A"].weight.grad
    assert grads is not None and (grads.abs().flatten(1).sum(1) > 0).sum() >= 2
    assert not any(p.requires_grad for p in adapterkit.sites(model)["0"].router.parameters())


@pytest.mark.parametrize("which", ["mlp", "bert"])
def test_compile_fullgraph_has_no_graph_breaks(which: str) -> None:
    if which == "bert":
        pytest.importorskip("transformers")
        base = tiny_bert()
        specs = [{"r": 4}, {"r": 2}, {"r": 4, "alpha": 8.0}]
        prefix = memory_url("compile")
        urls = []
        for i, spec in enumerate(specs):
            urls.append(f"{prefix}/e{i}.safetensors")
            adapterkit.save(expert(base, ["query", "value"], seed=i, **spec), urls[-1])
        inputs = bert_inputs()
    else:
        base = mlp()
        urls = saved_experts(base, [{"r": 4}, {"r": 2}, {"r": 4, "alpha": 8.0}])
        inputs = {"input": torch.randn(4, 5, 16)}
    model = arrow(copy.deepcopy(base), urls, top_k=2)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(**inputs)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        got, want = compiled(**inputs), model(**inputs)
    if which == "bert":
        got, want = got.last_hidden_state, want.last_hidden_state
    torch.testing.assert_close(got, want)
    torch._dynamo.reset()


def test_router_registered() -> None:
    assert adapterkit.get_host().registries["router"]["arrow"] is ArrowRouter
