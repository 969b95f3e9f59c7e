"""The merger plugins on stacked experts: exact ΔW merges, the A/B-separate form and its
cross-terms, SVD ranks, negative weights, save -> load of every result, DARE's draws,
bottleneck adapters in parameter space, one-line errors."""

from __future__ import annotations

import copy

import pytest
import torch
from adapterkit_merging import methods
from merginglib import deltas_of, save_experts, small_base, stacked_deltas

import adapterkit
from adapterkit.errors import AdapterkitError

LORAS = [{"kind": "lora", "r": 4}, {"kind": "lora", "r": 2, "alpha": 4.0}, {"kind": "lora", "r": 3}]
WEIGHTS = [0.7, -0.4, 1.2]
METHODS = {
    "task-arithmetic": {},
    "ties": {"density": 0.4},
    "dare-linear": {"density": 0.5, "seed": 3},
    "dare-ties": {"density": 0.5, "seed": 3, "majority_sign_method": "frequency"},
    "magnitude-prune": {"density": 0.3},
}


@pytest.fixture
def stacked(lib: str) -> torch.nn.Module:
    base = small_base()
    return adapterkit.stack(save_experts(base, lib, LORAS), copy.deepcopy(base))


def merged_delta(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: site.delta_weight().double() for name, site in adapterkit.sites(model).items()}


def test_task_arithmetic_is_the_exact_sum_of_updates_and_separate_is_not(stacked: torch.nn.Module) -> None:
    experts = stacked_deltas(stacked)
    exact = adapterkit.merge(copy.deepcopy(stacked), "task-arithmetic", weights=WEIGHTS)
    separate = adapterkit.merge(copy.deepcopy(stacked), "task-arithmetic", weights=WEIGHTS, form="separate")
    for name, got in merged_delta(exact).items():
        want = sum(w * d.double() for w, d in zip(WEIGHTS, experts[name], strict=True))
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        assert adapterkit.sites(exact)[name].config.r == 4 + 2 + 3  # sum of the experts' ranks: padding dropped
        gap = (merged_delta(separate)[name] - want).norm() / want.norm()
        assert gap > 0.1  # cross-terms A_j B_k: the product of merged factors is another update
    x, delta = torch.randn(6, 16), merged_delta(exact)
    with torch.no_grad():  # the merged model is each base layer plus the summed updates
        hidden = torch.nn.functional.gelu(exact[0].base(x) + x @ delta["0"].float().T)
        torch.testing.assert_close(exact(x), exact[2].base(hidden) + hidden @ delta["2"].float().T,
                                   rtol=1e-5, atol=1e-5)


def test_separate_form_is_the_product_of_merged_factors(stacked: torch.nn.Module) -> None:
    merged = adapterkit.merge(copy.deepcopy(stacked), "task-arithmetic", weights=WEIGHTS, form="separate")
    for name, site in adapterkit.sites(stacked).items():
        w = site.expected_weights()
        s = [x * site.scale for x in WEIGHTS]
        a = sum(abs(v) ** 0.5 * (1 if v >= 0 else -1) * w["A"][k] for k, v in enumerate(s))
        b = sum(abs(v) ** 0.5 * w["B"][k] for k, v in enumerate(s))
        got = adapterkit.sites(merged)[name]
        assert got.config.r == 4 and got.scale == 1.0
        torch.testing.assert_close(got.delta_weight(), (a @ b).T, rtol=1e-5, atol=1e-6)


def test_negative_weights_negate_an_expert(lib: str) -> None:
    base = small_base()
    url = save_experts(base, lib, LORAS[:1])[0]
    twice = adapterkit.stack({"a": url, "b": url}, copy.deepcopy(base))
    zero = adapterkit.merge(copy.deepcopy(twice), "task-arithmetic", weights=[1.0, -1.0])
    assert all(d.abs().max() < 1e-6 for d in merged_delta(zero).values())
    x = torch.randn(3, 16)
    torch.testing.assert_close(zero(x), base(x), rtol=1e-5, atol=1e-6)
    one = adapterkit.merge(copy.deepcopy(twice), "task-arithmetic", weights=[2.0, -1.0])
    expert = deltas_of(adapterkit.load(url, copy.deepcopy(base)))
    for name, got in merged_delta(one).items():
        torch.testing.assert_close(got, expert[name], rtol=1e-5, atol=1e-6)
    for merger, factor in (("ties", -1.0), ("magnitude-prune", -2.0)):  # ties: a mean; prune: a sum
        neg = adapterkit.merge(copy.deepcopy(twice), merger, weights=[-1.0, -1.0], density=1.0)
        for name, got in merged_delta(neg).items():
            torch.testing.assert_close(got, factor * expert[name], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("merger", list(METHODS))
def test_nonlinear_results_hold_the_merged_update(stacked: torch.nn.Module, merger: str) -> None:
    merged = adapterkit.merge(copy.deepcopy(stacked), merger, weights=WEIGHTS, **METHODS[merger])
    experts = stacked_deltas(stacked)
    generator = torch.Generator().manual_seed(METHODS[merger].get("seed", 0))
    for name in adapterkit.sites(stacked):  # site order = the order of the draws
        tensors = torch.stack(experts[name])
        args = {k: v for k, v in METHODS[merger].items() if k != "seed"}
        fn = getattr(methods, merger.replace("-", "_"))
        want = fn(tensors, WEIGHTS, generator=generator, **args) if "dare" in merger else fn(tensors, WEIGHTS, **args)
        got = adapterkit.sites(merged)[name]
        torch.testing.assert_close(got.delta_weight(), want, rtol=1e-5, atol=1e-6)
        if merger != "task-arithmetic":
            assert got.config.r == 16  # full rank min(d_in, d_out) = 16 at site 0; site 2 (8) padded to it


@pytest.mark.parametrize("form", ["delta", "separate"])
@pytest.mark.parametrize("merger", list(METHODS))
def test_every_result_saves_and_loads_onto_a_fresh_base(lib: str, stacked: torch.nn.Module, merger: str,
                                                        form: str) -> None:
    merged = adapterkit.merge(copy.deepcopy(stacked), merger, weights=WEIGHTS, form=form, **METHODS[merger])
    info = adapterkit.save(merged, f"{lib}/{merger}-{form}.safetensors")
    assert info.history[-1]["name"] == merger and info.history[-1]["plugin"] == "merging"
    assert [s["op"] for s in info.history] == ["attach", "stack", "merge"]
    fresh = adapterkit.load(f"{lib}/{merger}-{form}.safetensors", small_base())
    x = torch.randn(4, 16)
    assert torch.equal(fresh(x), merged(x))


def test_rank_gives_the_best_approximation(stacked: torch.nn.Module) -> None:
    exact = merged_delta(adapterkit.merge(copy.deepcopy(stacked), "task-arithmetic", weights=WEIGHTS))
    for merger, args in (("task-arithmetic", {}), ("ties", {"density": 0.5})):
        full = merged_delta(adapterkit.merge(copy.deepcopy(stacked), merger, weights=WEIGHTS, **args))
        low = adapterkit.merge(copy.deepcopy(stacked), merger, weights=WEIGHTS, rank=3, **args)
        assert {s.config.r for s in adapterkit.sites(low).values()} == {3}
        for name, got in merged_delta(low).items():
            s = torch.linalg.svdvals(full[name])
            torch.testing.assert_close((got - full[name]).norm(), s[3:].square().sum().sqrt(), rtol=1e-4, atol=1e-6)
    assert exact  # (the exact sum is rank 9: rank=9 is exact again)
    nine = merged_delta(adapterkit.merge(copy.deepcopy(stacked), "task-arithmetic", weights=WEIGHTS, rank=9))
    for name, got in nine.items():
        torch.testing.assert_close(got, exact[name], rtol=1e-5, atol=1e-6)


def test_dare_is_seeded_keeps_density_and_leaves_global_rng_alone(stacked: torch.nn.Module) -> None:
    state = torch.get_rng_state()
    one = merged_delta(adapterkit.merge(copy.deepcopy(stacked), "dare-linear", density=0.5, seed=1))
    again = merged_delta(adapterkit.merge(copy.deepcopy(stacked), "dare-linear", density=0.5, seed=1))
    other = merged_delta(adapterkit.merge(copy.deepcopy(stacked), "dare-linear", density=0.5, seed=2))
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(one[n], again[n]) for n in one)
    assert not any(torch.allclose(one[n], other[n]) for n in one)
    # distribution: keep ~density of each expert, rescaled, so the mean over draws is the task vector
    tensors = torch.randn(3, 200, 300, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(0)
    dropped = methods.drop(tensors, 0.3, generator=generator)
    kept = (dropped != 0).double().mean().item()
    assert abs(kept - 0.3) < 0.005
    nonzero = dropped != 0
    torch.testing.assert_close(dropped[nonzero], tensors[nonzero] / 0.3)
    small = tensors[:1, :40, :50]
    mean = torch.stack([methods.drop(small, 0.3, generator=generator) for _ in range(1000)]).mean(0)
    assert ((mean - small).abs().mean() / small.abs().mean()).item() < 0.06  # ~0.04 expected


def test_bottlenecks_merge_in_parameter_space(lib: str) -> None:
    base = small_base()
    specs = [{"kind": "bottleneck", "r": 4, "dropout": 0.0}, {"kind": "bottleneck", "r": 4, "dropout": 0.0}]
    stacked = adapterkit.stack(save_experts(base, lib, specs), copy.deepcopy(base))
    for merger, args in METHODS.items():
        merged = adapterkit.merge(copy.deepcopy(stacked), merger, weights=[0.5, 0.5], form="separate", **args)
        generator = torch.Generator().manual_seed(args.get("seed", 0))
        fn = getattr(methods, merger.replace("-", "_"))
        extra = {k: v for k, v in args.items() if k != "seed"}
        for name, site in adapterkit.sites(stacked).items():  # draws: site by site, weight by weight
            got = adapterkit.sites(merged)[name].expected_weights()
            for proj, value in site.expected_weights().items():  # the same method on every weight
                want = fn(value, [0.5, 0.5], generator=generator, **extra) if "dare" in merger else \
                    fn(value, [0.5, 0.5], **extra)
                torch.testing.assert_close(got[proj][0], want)
        adapterkit.save(merged, f"{lib}/b-{merger}.safetensors")
        x = torch.randn(3, 16)
        assert torch.equal(adapterkit.load(f"{lib}/b-{merger}.safetensors", small_base())(x), merged(x))
    with pytest.raises(AdapterkitError) as info:
        adapterkit.merge(copy.deepcopy(stacked), "ties", density=0.5)
    assert str(info.value).startswith("cannot merge with 'ties': site '0': kind 'bottleneck' has no weight update")
    assert "form='separate'" in str(info.value) and "\n" not in str(info.value)


def test_merging_a_trained_inventory_works_too() -> None:
    model = adapterkit.attach(small_base(), {"adapter": {"kind": "lora", "targets": ["0", "2"], "r": 4, "skills": 3},
                                             "router": {"name": "poly", "tasks": 2}})
    with torch.no_grad():
        for p in adapterkit.adapter_state_dict(model).values():
            p.normal_()
    merged = adapterkit.merge(copy.deepcopy(model), "ties", density=0.5)
    assert all(s.skills == 1 for s in adapterkit.sites(merged).values())


ERRORS = [
    ("ties", {"density": 0.5, "weights": [1.0, 2.0]},
     "cannot merge with 'ties': site '0' holds 3 experts (skills) but 2 weights were given"),
    ("task-arithmetic", {"rank": 2, "form": "separate"},
     "cannot merge with 'task-arithmetic': rank applies to form='delta' only"),
    ("ties", {"density": 0.0}, "density must be in (0, 1]"),
    ("dare-linear", {"density": 1.5}, "density must be in (0, 1]"),
    ("ties", {}, "density"),
    ("task-arithmetic", {"form": "cat"}, "form must be one of 'delta', 'separate', got 'cat'"),
    ("ties", {"density": 0.5, "majority_sign_method": "vote"}, "majority_sign_method must be one of"),
    ("task-arithmetic", {"weights": "heavy"}, "weights must be a list of numbers"),
    ("task-arithmetic", {"weights": [1.0, float("nan"), 1.0]}, "weights must be a list of finite numbers"),
    ("dare-ties", {"density": 0.5, "seed": -1}, "seed must be a non-negative integer"),
    ("task-arithmetic", {"rank": 0}, "rank must be a positive integer"),
]


@pytest.mark.parametrize(("merger", "args", "message"), ERRORS)
def test_errors_are_one_line(stacked: torch.nn.Module, merger: str, args: dict, message: str) -> None:
    before = {k: v.clone() for k, v in adapterkit.adapter_state_dict(stacked).items()}
    with pytest.raises(AdapterkitError) as info:
        adapterkit.merge(stacked, merger, **args)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert all(torch.equal(v, before[k]) for k, v in adapterkit.adapter_state_dict(stacked).items())
    assert all(s.skills == 3 for s in adapterkit.sites(stacked).values())  # a refused merge changes nothing


def test_sites_needing_more_rank_than_the_first_say_so(lib: str) -> None:
    base = torch.nn.Sequential(torch.nn.Linear(16, 4), torch.nn.Linear(4, 16), torch.nn.Linear(16, 16)).eval()
    stacked = adapterkit.stack(save_experts(base, lib, LORAS), copy.deepcopy(base))
    with pytest.raises(AdapterkitError) as info:  # full rank: 4 at site '0', 16 at site '2'
        adapterkit.merge(copy.deepcopy(stacked), "ties", density=0.5)
    assert "site '2' needs rank 16" in str(info.value) and "pass rank=16" in str(info.value)
    fixed = adapterkit.merge(copy.deepcopy(stacked), "ties", density=0.5, rank=16)
    assert {s.config.r for s in adapterkit.sites(fixed).values()} == {16}
