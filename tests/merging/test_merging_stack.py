"""adapterkit.stack: N adapter files as the K skills of one site per target.

Ranks padded with zeros and differing LoRA scales folded into B, both exact; digests
verified; the history names each expert and its digest, never a URL; the stacked model
saves and loads; incompatible files are refused in one line naming both."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from merginglib import deltas_of, expert, lora_delta, save_experts, small_base, stacked_deltas

import adapterkit
from adapterkit.errors import AdapterkitError
from adapterkit.storage import StorageError

LORAS = [{"kind": "lora", "r": 4}, {"kind": "lora", "r": 2, "alpha": 4.0}, {"kind": "lora", "r": 3, "alpha": 1.5}]


def one_hot(k: int, n: int) -> list[float]:
    return [1.0 if i == k else 0.0 for i in range(n)]


def test_stack_pads_ranks_and_folds_scales_exactly(lib: str) -> None:
    base = small_base()
    urls = save_experts(base, lib, LORAS)
    experts = [adapterkit.load(u, copy.deepcopy(base)) for u in urls]
    stacked = adapterkit.stack(urls, copy.deepcopy(base))
    recipe = adapterkit.recipe_of(stacked)
    assert recipe is not None and recipe.skills == 3 and recipe.router.name == "uniform"
    assert dict(recipe.kind_args) == {"r": 4, "alpha": 4}  # scales 1, 2, 0.5 differ: the stack has scale 1
    for site in adapterkit.sites(stacked).values():
        assert site.projections["A"].weight.shape == (3, site.base.in_features, 4)
        assert not site.projections["A"].weight[1, :, 2:].any()  # expert 1 (r = 2) padded with zeros
    got = stacked_deltas(stacked)
    for k, model in enumerate(experts):
        for name, want in deltas_of(model).items():
            torch.testing.assert_close(got[name][k].double(), want, rtol=1e-6, atol=1e-6)
    x = torch.randn(5, 16)
    for k, model in enumerate(experts):  # each expert alone, selected from the stack, is that expert
        alone = adapterkit.merge(copy.deepcopy(stacked), "task-arithmetic", weights=one_hot(k, 3))
        torch.testing.assert_close(alone(x), model(x), rtol=1e-5, atol=1e-6)


def test_equal_scales_are_kept_and_factors_copied_bit_for_bit(lib: str) -> None:
    base = small_base()
    urls = save_experts(base, lib, [{"kind": "lora", "r": 2, "alpha": 4.0}, {"kind": "lora", "r": 4, "alpha": 8.0}])
    stacked = adapterkit.stack(urls, copy.deepcopy(base))
    assert dict(adapterkit.recipe_of(stacked).kind_args) == {"r": 4, "alpha": 8.0}
    first = adapterkit.load(urls[0], copy.deepcopy(base))
    for name, site in adapterkit.sites(stacked).items():
        mine = adapterkit.sites(first)[name]
        assert torch.equal(site.projections["B"].weight[0, :2], mine.projections["B"].weight[0])
        assert torch.equal(site.projections["A"].weight[0, :, :2], mine.projections["A"].weight[0])


def test_history_names_experts_and_digests_never_urls(lib: str) -> None:
    base = small_base()
    urls = save_experts(base, lib, LORAS[:2])
    secret = f"{lib}/user:hunter2@vault/medical.safetensors?token=hunter2"
    adapterkit.cp(urls[1], secret.split("?")[0])
    stacked = adapterkit.stack([urls[0], secret.split("?")[0]], copy.deepcopy(base))
    step = adapterkit.history(stacked)[-1]
    assert step["op"] == "stack"
    assert [s["name"] for s in step["sources"]] == ["expert0", "medical"]
    assert [s["digest"] for s in step["sources"]] == [adapterkit.inspect(u).digest for u in urls]
    assert [s["r"] for s in step["sources"]] == [4, 2]
    named = adapterkit.stack({"general": urls[0], "law": urls[1]}, copy.deepcopy(base))
    assert [s["name"] for s in adapterkit.history(named)[-1]["sources"]] == ["general", "law"]
    info = adapterkit.save(stacked, f"{lib}/stacked.safetensors")
    text = json.dumps([dict(s) for s in info.history])
    assert "hunter2" not in text and "memory://" not in text and lib not in text
    assert info.history[-1]["op"] == "stack"


def test_stacked_model_saves_and_loads_onto_a_fresh_base(lib: str) -> None:
    base = small_base()
    stacked = adapterkit.stack(save_experts(base, lib, LORAS), copy.deepcopy(base))
    info = adapterkit.save(stacked, f"{lib}/stacked.safetensors")
    fresh = adapterkit.load(f"{lib}/stacked.safetensors", copy.deepcopy(base))
    x = torch.randn(4, 16)
    assert torch.equal(fresh(x), stacked(x))
    assert adapterkit.recipe_of(fresh) == adapterkit.recipe_of(stacked) == info.recipe
    assert [s["op"] for s in adapterkit.history(fresh)] == ["attach", "stack", "load"]


def test_stack_bottlenecks_pads_ranks_exactly(lib: str) -> None:
    base = small_base()
    specs = [{"kind": "bottleneck", "r": 4, "dropout": 0.0}, {"kind": "bottleneck", "r": 6, "dropout": 0.0}]
    urls = save_experts(base, lib, specs)
    stacked = adapterkit.stack(urls, copy.deepcopy(base))
    assert adapterkit.recipe_of(stacked).kind_args["r"] == 6
    x = torch.randn(5, 16)
    for k, url in enumerate(urls):
        alone = adapterkit.merge(copy.deepcopy(stacked), "task-arithmetic", weights=one_hot(k, 2), form="separate")
        torch.testing.assert_close(alone(x), adapterkit.load(url, copy.deepcopy(base))(x), rtol=1e-5, atol=1e-6)


def test_stack_a_split_expert_by_its_expectation(lib: str) -> None:
    base = small_base()
    mosa = expert(base, {"kind": "lora", "r": 4}, seed=3, splitter={"name": "mosa", "n_cells": 2},
                  sampler={"name": "mosa"})
    adapterkit.save(mosa, f"{lib}/mosa.safetensors")
    urls = [f"{lib}/mosa.safetensors", *save_experts(base, lib, LORAS[:1])]
    stacked = adapterkit.stack(urls, copy.deepcopy(base))
    for name, site in adapterkit.sites(mosa).items():
        want = site.mixed_weights()
        got = adapterkit.sites(stacked)[name].expected_weights()
        assert torch.equal(got["A"][0], want["A"]) and torch.equal(got["B"][0], want["B"])
        torch.testing.assert_close(stacked_deltas(stacked)[name][0].double(),
                                   lora_delta(adapterkit.merge(copy.deepcopy(mosa), "mosa").get_submodule(name)))


def _refusal(lib: str, case: str) -> tuple[list[str] | dict[str, str], str]:
    base = small_base()
    lora = save_experts(base, f"{lib}/a", [{"kind": "lora", "r": 4}])[0]
    if case == "kind":
        other = save_experts(base, f"{lib}/b", [{"kind": "bottleneck", "r": 4}])[0]
        return {"lora": lora, "adapter": other}, "cannot stack 'adapter' with 'lora': kind 'bottleneck' vs 'lora'"
    if case == "sites":
        model = adapterkit.attach(copy.deepcopy(base), {"adapter": {"kind": "lora", "targets": ["0"], "r": 4}})
        adapterkit.save(model, f"{lib}/first_only.safetensors")
        return ({"general": lora, "narrow": f"{lib}/first_only.safetensors"},
                "cannot stack 'narrow' with 'general': they adapt different sites (only in 'general': 2; "
                "only in 'narrow': none)")
    if case == "argument":
        urls = save_experts(base, f"{lib}/c", [{"kind": "bottleneck", "r": 4},
                                               {"kind": "bottleneck", "r": 4, "placement": "sequential"}])
        return urls, "cannot stack 'expert1' with 'expert0': bottleneck argument 'placement' is 'sequential' vs " \
                     "'parallel'"
    if case == "norm":
        urls = save_experts(base, f"{lib}/d", [{"kind": "bottleneck", "r": 4, "norm": True}] * 2)
        return urls, "cannot stack 'expert1' with 'expert0': site '0' holds a different 'norm.weight'"
    if case == "skills":
        routed = expert(base, {"kind": "lora", "r": 4, "skills": 2}, seed=1, router={"name": "uniform"})
        adapterkit.save(routed, f"{lib}/routed.safetensors")
        return [lora, f"{lib}/routed.safetensors"], "cannot stack 'routed': it holds 2 skills"
    if case == "folded":
        folded = adapterkit.merge(expert(base, {"kind": "lora", "r": 4}, seed=1), "fold")
        adapterkit.save(folded, f"{lib}/folded.safetensors")
        return [lora, f"{lib}/folded.safetensors"], "cannot stack 'folded': its updates are folded into base weights"
    if case == "tensors":
        adapterkit.save_tensors({"w": torch.zeros(2)}, f"{lib}/plain.safetensors")
        return [lora, f"{lib}/plain.safetensors"], "cannot stack 'plain': it holds tensors, not an adapter"
    if case == "duplicate":
        return [lora, lora], "two adapters named 'expert0'"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["kind", "sites", "argument", "norm", "skills", "folded", "tensors", "duplicate"])
def test_stack_refuses_in_one_line_naming_both(lib: str, case: str) -> None:
    sources, message = _refusal(lib, case)
    model = small_base()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(AdapterkitError) as info:
        adapterkit.stack(sources, model)
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    assert not adapterkit.is_attached(model)  # the model is as it was
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_stack_verifies_digests_and_refuses_an_attached_model(lib: str) -> None:
    base = small_base()
    urls = save_experts(base, lib, LORAS[:2])
    import fsspec

    with fsspec.open(urls[1], "rb") as f:
        data = bytearray(f.read())
    data[-3] ^= 0x01  # one bit of tensor data
    with fsspec.open(f"{lib}/flipped.safetensors", "wb") as f:
        f.write(bytes(data))
    model = small_base()
    with pytest.raises(StorageError, match="digest"):
        adapterkit.stack([urls[0], f"{lib}/flipped.safetensors"], model)
    assert not adapterkit.is_attached(model)
    attached = adapterkit.stack(urls, small_base())
    with pytest.raises(AdapterkitError, match="stack onto a fresh base model"):
        adapterkit.stack(urls, attached)
    with pytest.raises(AdapterkitError, match="not one string"):
        adapterkit.stack(urls[0], small_base())  # type: ignore[arg-type]
    with pytest.raises(AdapterkitError, match="URLs as strings"):
        adapterkit.stack([urls[0], 3], small_base())  # type: ignore[list-item]
