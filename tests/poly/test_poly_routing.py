"""Routers, the mhr splitter and the routed forward: math, shapes, errors, compile."""

from __future__ import annotations

import copy

import pytest
import torch
from adapterkit_poly.routers import EPS, PolyRouter, relaxed_bernoulli
from polylib import output, poly_recipe, randomize, routed_t5, t5_inputs
from torch import nn
from torch.distributions import RelaxedBernoulli

import adapterkit
from adapterkit.errors import AttachError, RecipeError, RoutingError


def mlp(d_in: int = 12, hidden: int = 16, d_out: int = 8) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out))


def reference_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, w: torch.Tensor, r: int) -> torch.Tensor:
    """The reference's per-example math: PEFT layouts, parameters mixed per head, shared bottleneck."""
    bs, heads = w.shape[:2]
    a_mix = torch.einsum("bqs,qsdr->bqdr", w, a).reshape(bs, -1, r)
    b_mix = torch.einsum("bqs,qsrd->bqrd", w, b).transpose(1, 2).reshape(bs, r, -1)
    flat = x.reshape(bs, -1, x.shape[-1])
    return (flat.bmm(a_mix).bmm(b_mix) / r).reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("heads", [1, 4])
@pytest.mark.parametrize("shape", [(6, 12), (6, 5, 12)])
@pytest.mark.parametrize("training", [False, True])
def test_routed_linear_matches_reference_math(heads: int, shape: tuple[int, ...], training: bool) -> None:
    model = adapterkit.attach(mlp(), poly_recipe(["0"], heads=heads, skills=3, tasks=4, r=2))
    randomize(model, ("projections.", "router."), seed=1)
    model.train(training)
    site = adapterkit.sites(model)["0"]
    x, ids = torch.randn(*shape), torch.tensor([0, 3, 1, 1, 2, 0])
    torch.manual_seed(7)
    with adapterkit.route(model, ids):
        got = site(x)
    z = site.router.logits[ids].view(6, heads, 3)
    if training:
        torch.manual_seed(7)
        y = RelaxedBernoulli(torch.tensor(1.0), logits=z).rsample()
    else:
        y = torch.sigmoid(z)
    w = y / (y.sum(-1, keepdim=True) + EPS)
    a = site.projections["A"].weight.view(3, heads, -1, 2).transpose(0, 1)  # -> (H, K, d_in/H, r)
    b = site.projections["B"].weight.view(3, 2, heads, -1).permute(2, 0, 1, 3)  # -> (H, K, r, d_out/H)
    expected = site.base(x) + reference_delta(x, a, b, w, r=2)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_relaxed_bernoulli_equals_torch_distribution() -> None:
    logits = torch.tensor([[-30.0, -2.0, 0.0, 1e-3, 3.0, 40.0]])
    noise = torch.rand(1000, 6, generator=torch.Generator().manual_seed(0))
    noise[0, 0], noise[1, 1] = 0.0, 1.0  # the clamps are exercised
    torch.manual_seed(5)
    expected = RelaxedBernoulli(torch.tensor(1.0), logits=logits.expand(1000, 6)).rsample()
    torch.manual_seed(5)
    drawn = torch.rand(1000, 6)
    torch.testing.assert_close(relaxed_bernoulli(logits, 1.0, drawn), expected, rtol=0, atol=0)
    assert relaxed_bernoulli(logits, 1.0, noise).isfinite().all()


def test_sigmoid_routing_in_training_is_the_eval_weights() -> None:
    """``relaxed = false`` (the MHR T0 configuration): training draws no noise; the weights are
    ``sigmoid(z)`` normalised, equal to eval's, identical across forwards, and gradients reach z."""
    recipe = poly_recipe(["0"], heads=2, skills=3, tasks=4, r=2)
    recipe["router"]["relaxed"] = False
    model = adapterkit.attach(mlp(), recipe)
    randomize(model, ("projections.", "router."), seed=2)
    router = adapterkit.sites(model)["0"].router
    ids = torch.tensor([0, 3, 1, 1, 2, 0])
    router.train()
    first, second = router(ids), router(ids)
    router.eval()
    evaluated = router(ids)
    z = router.logits[ids].view(6, 2, 3)
    reference = torch.sigmoid(z) / (torch.sigmoid(z).sum(-1, keepdim=True) + EPS)
    assert torch.equal(first, second) and torch.equal(first, evaluated)
    torch.testing.assert_close(first, reference, rtol=0, atol=0)
    router.train()
    x = torch.randn(6, 12)
    with adapterkit.route(model, ids):
        model(x).square().sum().backward()
    assert router.logits.grad is not None and router.logits.grad.abs().sum() > 0
    relaxed = PolyRouter(PolyRouter.Config(tasks=4), heads=2, skills=3, generator=torch.Generator())
    relaxed.logits.data.copy_(router.logits.data)
    assert not torch.equal(relaxed.train()(ids), first)  # the default samples


def test_private_and_uniform_routers() -> None:
    private = adapterkit.attach(mlp(), poly_recipe(["0"], skills=3, tasks=3, router="private"))
    site = adapterkit.sites(private)["0"]
    randomize(private, ("projections.",), seed=2)
    x = torch.randn(4, 12)
    with adapterkit.route(private, [2, 0, 1, 2]):
        got = site(x)
    a, b = site.projections["A"].weight, site.projections["B"].weight
    for i, t in enumerate([2, 0, 1, 2]):
        torch.testing.assert_close(got[i], site.base(x[i]) + x[i] @ a[t] @ b[t] / 4)
    with pytest.raises(AttachError, match="one skill per task"):
        adapterkit.attach(mlp(), poly_recipe(["0"], skills=2, tasks=3, router="private"))

    uniform = adapterkit.attach(mlp(), poly_recipe(["0"], heads=2, skills=3, router="uniform"))
    site = adapterkit.sites(uniform)["0"]
    randomize(uniform, ("projections.",), seed=2)
    a, b = site.projections["A"].weight.mean(0), site.projections["B"].weight.mean(0)
    with torch.no_grad():
        torch.testing.assert_close(uniform(x), uniform[2](torch.relu(site.base(x) + x @ a @ b / 4)))


def test_one_id_for_the_batch_and_per_task_mixing_agree(t5_base) -> None:
    model = routed_t5(t5_base, heads=4, tasks=3).eval()
    inputs = t5_inputs(batch=6)
    mixed = [2, 0, 1, 1, 2, 0]
    with torch.no_grad():
        with adapterkit.route(model, 2):  # one id: mixed once, one plain matmul (folded on the fly) per site
            single = output(model, inputs)
        with adapterkit.route(model, [2] * 6):  # 3 tasks < 6 examples: mixed per task, gathered
            full = output(model, inputs)
        with adapterkit.route(model, mixed):
            per_task = output(model, inputs)
        per_example = []
        for half in (slice(0, 3), slice(3, 6)):  # 3 examples, not more than the tasks: mixed per example
            with adapterkit.route(model, mixed[half]):
                per_example.append(output(model, {k: v[half] for k, v in inputs.items()}))
    torch.testing.assert_close(single, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(per_task, torch.cat(per_example), rtol=1e-5, atol=1e-5)
    # training: one id still draws fresh noise per example
    model.train()
    with adapterkit.route(model, 1):
        out = output(model, inputs)
    assert out.shape == single.shape and not torch.allclose(out[0], out[1])


def test_task_id_errors(t5_base) -> None:
    model = routed_t5(t5_base, heads=1, tasks=3)
    inputs = t5_inputs()
    with pytest.raises(RoutingError, match=r"must lie in \[0, 3\)"):
        with adapterkit.route(model, [0, 1, 3, 0, 0]):
            pass
    with pytest.raises(RoutingError, match="must lie"):
        with adapterkit.route(model, -1):
            pass
    with pytest.raises(RoutingError, match="adapterkit.route"):
        output(model, inputs)  # routed model, no task ids
    with pytest.raises(RoutingError, match="2 task ids for a batch of 5"):
        with adapterkit.route(model, [0, 1]):
            output(model, inputs)


def test_heads_must_divide_the_dims() -> None:
    with pytest.raises(AttachError, match=r"site '0': mhr heads=5 must divide the input size 12"):
        adapterkit.attach(mlp(), poly_recipe(["0"], heads=5))
    with pytest.raises(AttachError, match=r"site '2': mhr heads=3 must divide the output size 8"):
        adapterkit.attach(mlp(d_in=12, hidden=12, d_out=8), poly_recipe(["0", "2"], heads=3))
    with pytest.raises(RecipeError, match="tasks"):
        adapterkit.attach(mlp(), {"adapter": {"kind": "lora", "targets": ["0"], "skills": 2},
                                  "router": {"name": "poly"}})


def test_router_init_and_param_groups(t5_base) -> None:
    from adapterkit.training import param_groups

    model = adapterkit.attach(copy.deepcopy(t5_base), poly_recipe(["q", "v"], heads=4, skills=2, tasks=5))
    routers = [s.router for s in adapterkit.sites(model).values()]
    assert all(isinstance(r, PolyRouter) and r.logits.shape == (5, 8) for r in routers)
    assert all(r.logits.abs().max() <= 1e-3 and r.logits.abs().min() > 0 for r in routers)
    for site in adapterkit.sites(model).values():
        assert site.projections["B"].weight.abs().max() == 0  # B starts at zero: the model starts as the base
    groups = {g["name"]: g for g in param_groups(model, lr=1e-3, router_lr=0.1, weight_decay=0.01)}
    assert groups["routers"]["lr"] == 0.1 and groups["routers"]["weight_decay"] == 0.0
    assert {id(p) for p in groups["routers"]["params"]} == {id(r.logits) for r in routers}


def test_authors_a_init_has_the_full_input_bound_and_peft_is_sqrt_3h_wider() -> None:
    """``init_a = "uniform"``: A ~ U(±1/sqrt(3 d_in)) over the full input (mttl, polytropon), for
    every skill and head alike; the default (PEFT's Kaiming per head) reaches sqrt(3 H) times that."""
    d_in, heads, skills, r = 192, 4, 8, 16
    model = nn.Sequential(nn.Linear(d_in, 64))
    bound = 1 / (3 * d_in) ** 0.5
    widths = {}
    for init in ("uniform", "kaiming"):
        recipe = poly_recipe(["0"], heads=heads, skills=skills, r=r, init_a=init)
        a = adapterkit.attach(copy.deepcopy(model), recipe)[0].projections["A"].weight.detach()
        assert a.shape == (skills, d_in, r)
        per_head = a.view(skills, heads, d_in // heads, r).abs().amax(dim=(0, 2, 3))
        widths[init] = per_head
        if init == "uniform":
            assert a.abs().max() <= bound and a.abs().max() > 0.99 * bound  # 24,576 draws reach the edge
            assert abs(a.mean()) < 0.02 * bound and abs(a.var() / (bound**2 / 3) - 1) < 0.05  # uniform
    ratio = widths["kaiming"] / widths["uniform"]
    torch.testing.assert_close(ratio, torch.full((heads,), (3 * heads) ** 0.5), rtol=0.02, atol=0)
    with pytest.raises(RecipeError, match="init_a"):
        adapterkit.attach(copy.deepcopy(model), poly_recipe(["0"], init_a="normal"))


@pytest.mark.parametrize("training", [True, False])
def test_compile_fullgraph_has_no_graph_breaks(t5_base, training: bool) -> None:
    model = routed_t5(t5_base, heads=4, tasks=3).train(training)
    inputs = t5_inputs()
    with adapterkit.route(model, torch.tensor([0, 1, 2, 1, 0])):
        explained = torch._dynamo.explain(model)(**inputs)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    torch._dynamo.reset()


@pytest.mark.parametrize("training", [True, False])
def test_compiled_fullgraph_step_matches_eager(training: bool) -> None:
    model = adapterkit.attach(mlp(), poly_recipe(["0", "2"], heads=4, skills=3, tasks=4, r=2)).train(training)
    randomize(model, ("projections.", "router."), seed=1)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # fullgraph: any break raises
    x = torch.randn(6, 5, 12)
    grads = []
    with adapterkit.route(model, 2):  # one id for the batch: the shared-weight path compiles whole too
        compiled(x)
    for run in (compiled, model):
        for p in model.parameters():
            p.grad = None
        with adapterkit.route(model, [0, 3, 1, 1, 2, 0]):
            out = run(x)
        if training:
            out.square().mean().backward()  # the backward compiles too
            grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
        else:
            grads.append([out.detach()])
    if training:  # noise differs between compiled and eager RNG; gradients exist and are finite
        assert all(g.isfinite().all() and g.abs().sum() > 0 for g in grads[0])
    else:
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()
