"""Training-time math: gradients confined to the drawn cell; draws uniform, independent, seeded."""

from __future__ import annotations

import pytest
import torch
from mosa_testlib import (
    CHI2_999,
    active_cell,
    chi2_independent,
    chi2_uniform,
    mosa_recipe,
    randomize_deltas,
    split_modules,
    tiny_bert,
)
from torch import Tensor

import adapterkit


@pytest.mark.parametrize("share", ["down", "up", "none"])
def test_gradient_reaches_only_the_active_cell(make_model, batch, loss, share: str) -> None:
    model = make_model(share=share)
    randomize_deltas(model)  # so that every side gets gradient (a zero `up` blocks `down`'s)
    model.train()
    loss(model, batch).backward()
    split = split_modules(model)
    assert len(split) == (4 if share == "none" else 2)
    for module in split:
        mask = module.cell_ids == active_cell(module)
        grad = module.delta.grad
        assert torch.all(grad[:, ~mask] == 0)  # exact zeros outside the cell
        assert (grad[:, mask] != 0).float().mean() > 0.9
    for site in adapterkit.sites(model).values():
        for name, module in site.projections.items():
            if module not in split:  # shared sides and biases: dense gradient
                assert (module.weight.grad != 0).float().mean() > 0.9, name


def test_cells_are_shared_by_skills_and_compose_with_routing(routed_host, batch, loss) -> None:
    recipe = mosa_recipe(share="none")
    recipe["adapter"]["skills"] = 3
    recipe["router"] = {"name": "test-mix"}
    model = adapterkit.attach(tiny_bert(), recipe, host=routed_host)
    randomize_deltas(model)
    model.train()
    with adapterkit.route(model, torch.tensor([0, 1, 2, 1])):
        loss(model, batch).backward()
    for module in split_modules(model):
        assert module.delta.shape[0] == 3
        mask = module.cell_ids == active_cell(module)
        assert torch.all(module.delta.grad[:, ~mask] == 0)
        assert torch.all((module.delta.grad[:, mask] != 0).float().mean((1,)) > 0.9)  # every skill learns


def record_draws(model: torch.nn.Module, batch: dict[str, Tensor] | None, steps: int) -> Tensor:
    """``[steps, split projections]``: the cell each projection drew at each training forward.

    ``batch=None`` calls each site's ``weights`` (what its forward calls) instead of the model.
    """
    model.train()
    split = split_modules(model)
    rows = []
    for _ in range(steps):
        if batch is None:
            for site in adapterkit.sites(model).values():
                site.weights(1)
        else:
            model(**batch)
        rows.append([active_cell(m) for m in split])
    return torch.tensor(rows)


def test_draws_are_uniform_and_independent_across_layers_projections_and_steps(make_model) -> None:
    model = make_model(share="none")  # 2 layers x (down, up): 4 independent draws per forward
    torch.manual_seed(0)
    draws = record_draws(model, None, 1200)
    for column in draws.T:
        assert chi2_uniform(column, 4) < CHI2_999[3]
    pairs = [(0, 2), (1, 3), (0, 1), (2, 3)]  # across layers; down vs up of one layer
    for i, j in pairs:
        assert chi2_independent(draws[:, i], draws[:, j], 4) < CHI2_999[9]
    assert chi2_independent(draws[:-1, 0], draws[1:, 0], 4) < CHI2_999[9]  # fresh draw at every forward
    assert (draws[:, 0] == draws[:, 2]).float().mean() < 0.35  # not one draw shared by the layers


def test_same_seed_same_draws(make_model, batch) -> None:
    model = make_model()
    runs = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        runs.append(record_draws(model, batch, 20))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_eval_gates_are_activation_probabilities_and_mark_nothing(make_model, batch) -> None:
    model = make_model(n_cells=4)
    model.eval()
    model(**batch)
    site = adapterkit.sites(model)["encoder.layer.0.output"]
    partition = site.partition("up")
    assert torch.equal(site.sampler.gates(partition, False, torch.device("cpu")), torch.full((4,), 0.25))
    assert not any(m.touched.any() for m in split_modules(model))
    with torch.no_grad():  # a training-mode forward without autograd trains nothing: no mark either
        model.train()
        model(**batch)
    assert not any(m.touched.any() for m in split_modules(model))


def test_the_all_sampler_trains_every_cell_and_merges_w0_plus_d(make_model, batch, loss) -> None:
    model = make_model(share="none", sampler={"name": "all"})
    randomize_deltas(model)
    model.train()
    loss(model, batch).backward()
    for module in split_modules(model):
        assert bool(module.touched.all())
        assert (module.delta.grad != 0).float().mean() > 0.9
    module = split_modules(model)[0]
    expected = module.w0 + module.delta.detach()
    adapterkit.merge(model)
    torch.testing.assert_close(adapterkit.sites(model)["encoder.layer.0.output"].projections["down"].weight, expected)
