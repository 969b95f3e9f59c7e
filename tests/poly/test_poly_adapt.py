"""Few-shot adaptation modes on a trained inventory: poly/mhr, mhr-z, mhr-mu."""

from __future__ import annotations

import copy

import pytest
import torch
from adapterkit_poly import adapt, load_routing, load_routing_state_dict, routing_state_dict, save_routing
from polylib import output, poly_recipe, routed_t5, t5_inputs

import adapterkit
from adapterkit.errors import AdapterkitError, RoutingError
from adapterkit.peft_interop import to_peft
from adapterkit.training import param_groups


def train_steps(model: torch.nn.Module, steps: int = 3) -> None:
    groups = param_groups(model, lr=1e-2, router_lr=0.1, weight_decay=0.01)
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]])
    model.train()
    for step in range(steps):
        inputs = t5_inputs(seed=10 + step)
        with adapterkit.route(model, 0):
            loss = output(model, inputs).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_mhr_z_trains_only_the_routing_row(t5_base) -> None:
    model = adapt(routed_t5(t5_base, heads=4, tasks=3), "mhr-z", init="mean")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith("router.logits") for n in trainable)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_steps(model)
    after = model.state_dict()
    for key, value in before.items():
        if key.endswith("router.logits"):
            assert not torch.equal(after[key], value), key
        else:
            assert torch.equal(after[key], value), key  # bit-identical
    rows = routing_state_dict(model)
    sites = adapterkit.sites(model)
    assert set(rows) == {f"{n}.router.logits" for n in sites}
    assert sum(v.numel() for v in rows.values()) == len(sites) * 4 * 4  # sites x H x K: the whole per-task state

    save_routing(model, "memory://poly-tests/task.safetensors")
    info = adapterkit.inspect("memory://poly-tests/task.safetensors")
    assert info.data_size == sum(v.numel() * 4 for v in rows.values())  # a few KiB: rows only, float32
    fresh = load_routing("memory://poly-tests/task.safetensors", adapt(routed_t5(t5_base, heads=4, tasks=3), "mhr-z"))
    model.eval()
    fresh.eval()
    inputs = t5_inputs()
    with torch.no_grad(), adapterkit.route(model, 0), adapterkit.route(fresh, 0):
        torch.testing.assert_close(output(fresh, inputs), output(model, inputs), rtol=0, atol=0)
    with pytest.raises(AdapterkitError, match="does not fit"):
        load_routing_state_dict(fresh, {"x.router.logits": torch.zeros(1, 16)})


@pytest.mark.parametrize("mode", ["poly", "mhr"])
def test_poly_mode_trains_skills_and_the_new_row(t5_base, mode: str) -> None:
    model = adapt(routed_t5(t5_base, heads=4, tasks=3), mode, init="uniform")
    for site in adapterkit.sites(model).values():
        assert site.router.logits.shape == (1, 16) and torch.equal(site.router.logits, torch.zeros(1, 16))
        assert site.projections["A"].weight.requires_grad and site.projections["B"].weight.requires_grad
    assert adapterkit.summary(model).recipe.router.args["tasks"] == 3  # the summary is of the attach
    from adapterkit.attach import state_of

    assert state_of(model).recipe.router.args["tasks"] == 1
    before = {k: v.clone() for k, v in adapterkit.adapter_state_dict(model).items()}
    train_steps(model, steps=2)
    after = adapterkit.adapter_state_dict(model)
    assert all(not torch.equal(after[k], v) for k, v in before.items())
    with pytest.raises(RoutingError, match=r"\[0, 1\)"):
        with adapterkit.route(model, 1):
            pass


def test_new_row_init_options(t5_base) -> None:
    inventory = routed_t5(t5_base, heads=2, tasks=3)
    trained = {n: s.router.logits.detach().clone() for n, s in adapterkit.sites(inventory).items()}
    mean = adapt(copy.deepcopy(inventory), "poly", init="mean")
    copied = adapt(copy.deepcopy(inventory), "poly", init=2)
    random = adapt(copy.deepcopy(inventory), "poly", init="random", seed=1)
    for name, rows in trained.items():
        torch.testing.assert_close(adapterkit.sites(mean)[name].router.logits, rows.mean(0, keepdim=True))
        assert torch.equal(adapterkit.sites(copied)[name].router.logits, rows[2:3])
        row = adapterkit.sites(random)[name].router.logits
        assert row.abs().max() <= 1e-3 and row.abs().min() > 0
    with pytest.raises(AdapterkitError, match="unknown routing-row init"):
        adapt(copy.deepcopy(inventory), "poly", init="zeros")
    with pytest.raises(AdapterkitError, match="out of range"):
        adapt(copy.deepcopy(inventory), "poly", init=3)
    with pytest.raises(AdapterkitError, match="unknown adaptation mode"):
        adapt(copy.deepcopy(inventory), "mhr-x")
    plain = adapterkit.attach(copy.deepcopy(t5_base), {"adapter": {"kind": "lora", "targets": ["q"]}})
    with pytest.raises(AdapterkitError, match="router 'poly'"):
        adapt(plain, "mhr-z")


@pytest.mark.parametrize("mode", ["mhr-mu", "poly-mu"])
def test_mu_collapses_to_the_uniform_model_then_trains(t5_base, mode: str) -> None:
    inventory = routed_t5(t5_base, heads=4, tasks=3)
    uniform = adapterkit.attach(copy.deepcopy(t5_base), poly_recipe(["q", "v"], heads=4, router="uniform")).eval()
    uniform.load_state_dict({k: v for k, v in adapterkit.adapter_state_dict(inventory).items() if "projections" in k},
                            strict=False)
    model = adapt(inventory, mode).eval()
    for site in adapterkit.sites(model).values():
        assert site.skills == 1 and site.projections["A"].weight.requires_grad
    inputs = t5_inputs()
    with torch.no_grad():
        torch.testing.assert_close(output(model, inputs), output(uniform, inputs), rtol=1e-5, atol=1e-5)
    config, _ = to_peft(model)  # one plain LoRA: PEFT LoRA can hold it
    assert config["peft_type"] == "LORA" and config["lora_alpha"] == 1.0
    before = {k: v.clone() for k, v in adapterkit.adapter_state_dict(model).items()}
    train_steps(model, steps=1)
    assert all(not torch.equal(adapterkit.adapter_state_dict(model)[k], v) for k, v in before.items())
