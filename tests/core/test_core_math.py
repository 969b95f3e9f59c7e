"""The built-in kinds compute exactly the math they document (checked against hand-written
formulas in float64 with non-zero up/B weights), the fold merger, tuple outputs, summary
counts, and task ids reaching a routed site through ``adapterkit.route``."""

from __future__ import annotations

from typing import Any

import attrs
import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

import adapterkit
from adapterkit import PluginHost, Registry, Router, RoutingError, hookimpl

TIGHT = {"rtol": 1e-12, "atol": 1e-12}


def randomize(site: adapterkit.AdapterSite, generator: torch.Generator) -> dict[str, Tensor]:
    """Give every projection random values (zero-init up/B would hide the adapter's math)."""
    out = {}
    with torch.no_grad():
        for name, module in site.projections.items():
            module.weight.copy_(torch.randn(module.weight.shape, generator=generator, dtype=module.weight.dtype))
            out[name] = module.weight[0].clone()
    return out


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


# LoRA --------------------------------------------------------------------------------------
def test_lora_equals_hand_computation(builtin_host: PluginHost, gen: torch.Generator) -> None:
    model = nn.Sequential(nn.Linear(6, 5)).double()
    weight, bias = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    adapterkit.attach(model, {"adapter": {"kind": "lora", "targets": ["0"], "r": 3, "alpha": 6}}, host=builtin_host)
    w = randomize(model[0], gen)
    assert w["A"].shape == (6, 3) and w["B"].shape == (3, 5)
    for shape in [(4, 6), (2, 3, 6)]:
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
        expected = x @ weight.T + bias + 2.0 * (x @ w["A"]) @ w["B"]
        torch.testing.assert_close(model(x), expected, **TIGHT)


def test_lora_init_is_kaiming_a_and_zero_b(builtin_host: PluginHost) -> None:
    model = adapterkit.attach(nn.Sequential(nn.Linear(64, 32)), {"adapter": {"kind": "lora", "targets": ["0"]}},
                              host=builtin_host)
    a, b = (model[0].projections[p].weight for p in "AB")
    bound = 1 / 64**0.5  # kaiming_uniform(a=sqrt 5) on (r, d_in): U(-1/sqrt(d_in), 1/sqrt(d_in))
    assert a.abs().max() <= bound and a.abs().max() > 0.8 * bound
    assert torch.count_nonzero(b) == 0


def test_fold_gives_plain_linear_with_same_output(builtin_host: PluginHost, gen: torch.Generator) -> None:
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).double()
    weight = model[0].weight.detach().clone()
    adapterkit.attach(model, {"adapter": {"kind": "lora", "targets": ["0", "2"], "r": 2, "alpha": 1},
                              "merger": {"name": "fold"}}, host=builtin_host)
    w = randomize(model[0], gen)
    randomize(model[2], gen)
    model.eval()
    x = torch.randn(5, 6, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
        merged = adapterkit.merge(model, host=builtin_host)  # the recipe's merger
    assert merged is model and type(model[0]) is nn.Linear and type(model[2]) is nn.Linear
    assert not adapterkit.sites(model)
    torch.testing.assert_close(model[0].weight, weight + 0.5 * (w["A"] @ w["B"]).T, **TIGHT)
    torch.testing.assert_close(model(x), expected, **TIGHT)


# bottleneck --------------------------------------------------------------------------------
def adapter_math(
    h: Tensor, w: dict[str, Tensor], scale: float, act: Any = F.gelu, norm: nn.Module | None = None
) -> Tensor:
    """``scale * (act(norm(h) down + down_bias) up + up_bias)``, written out by hand."""
    if norm is not None:
        h = norm(h)
    return (act(h @ w["down"] + w["down_bias"]) @ w["up"] + w["up_bias"]) * scale


def test_bottleneck_parallel_equals_hand_computation(builtin_host: PluginHost, gen: torch.Generator) -> None:
    model = nn.Sequential(nn.Linear(8, 8)).double()
    base = nn.Linear(8, 8).double()
    base.load_state_dict(model[0].state_dict())
    recipe = {"adapter": {"kind": "bottleneck", "targets": ["0"], "r": 3, "norm": True, "dropout": 0.3}}
    adapterkit.attach(model, recipe, host=builtin_host)
    site = model[0]
    w = randomize(site, gen)
    with torch.no_grad():  # a trained-looking LayerNorm
        site.norm.weight.copy_(torch.rand(8, generator=gen, dtype=torch.float64) + 0.5)
        site.norm.bias.copy_(torch.randn(8, generator=gen, dtype=torch.float64))
    assert site.scale == 0.1
    model.eval()  # dropout off
    x = torch.randn(3, 4, 8, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(model(x), base(x) + adapter_math(x, w, 0.1, norm=site.norm), **TIGHT)


class Residual(nn.Module):
    """Like a BERT output block: ``LayerNorm(dense(hidden) + input)``."""

    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Linear(16, 8)
        self.ln = nn.LayerNorm(8)

    def forward(self, hidden: Tensor, input_tensor: Tensor) -> Tensor:
        return self.ln(self.dense(hidden) + input_tensor)


@pytest.mark.parametrize("input_arg", [1, "input_tensor"])
def test_bottleneck_parallel_reads_the_named_input(
    builtin_host: PluginHost, gen: torch.Generator, input_arg: int | str
) -> None:
    holder = nn.ModuleDict({"out": Residual()}).double()
    reference = Residual().double()
    reference.load_state_dict(holder["out"].state_dict())
    recipe = {"adapter": {"kind": "bottleneck", "targets": ["out"], "r": 2, "input_arg": input_arg,
                          "act": "relu", "scale": 0.5, "dropout": 0.0}}
    adapterkit.attach(holder, recipe, host=builtin_host)
    site = holder["out"]
    w = randomize(site, gen)
    assert w["down"].shape == (8, 2) and w["up"].shape == (2, 8)  # d_in follows the residual stream, not dense's 16
    hidden = torch.randn(3, 16, generator=gen, dtype=torch.float64)
    inp = torch.randn(3, 8, generator=gen, dtype=torch.float64)
    out = site(hidden, inp) if input_arg == 1 else site(hidden, input_tensor=inp)
    torch.testing.assert_close(out, reference(hidden, inp) + adapter_math(inp, w, 0.5, act=F.relu), **TIGHT)


def test_bottleneck_sequential_equals_hand_computation(builtin_host: PluginHost, gen: torch.Generator) -> None:
    model = nn.Sequential(nn.Linear(6, 10)).double()
    base = nn.Linear(6, 10).double()
    base.load_state_dict(model[0].state_dict())
    recipe = {"adapter": {"kind": "bottleneck", "targets": ["0"], "r": 4, "placement": "sequential", "act": "silu"}}
    adapterkit.attach(model, recipe, host=builtin_host)
    w = randomize(model[0], gen)
    assert w["down"].shape == (10, 4) and model[0].scale == 1.0
    model.eval()
    x = torch.randn(7, 6, generator=gen, dtype=torch.float64)
    y = base(x)
    torch.testing.assert_close(model(x), y + adapter_math(y, w, 1.0, act=F.silu), **TIGHT)


def test_bottleneck_channels_first(builtin_host: PluginHost, gen: torch.Generator) -> None:
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)).double()
    model.eval()
    x = torch.randn(2, 3, 5, 4, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        y = model(x)
    holder = nn.Sequential(model)
    recipe = {"adapter": {"kind": "bottleneck", "targets": ["0"], "r": 2, "placement": "sequential", "channel_dim": 1}}
    adapterkit.attach(holder, recipe, host=builtin_host)
    w = randomize(holder[0], gen)
    assert w["down"].shape == (6, 2)  # channels, inferred from the block's last sized layer
    holder.eval()
    expected = y + adapter_math(y.movedim(1, -1), w, 1.0).movedim(-1, 1)
    torch.testing.assert_close(holder(x), expected, **TIGHT)


class WithAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.proj(x), x.sum(-1)


@pytest.mark.parametrize("placement", ["parallel", "sequential"])
def test_tuple_outputs_adapt_the_first_element(builtin_host: PluginHost, gen: torch.Generator, placement: str) -> None:
    holder = nn.ModuleDict({"block": WithAttention()}).double()
    reference = WithAttention().double()
    reference.load_state_dict(holder["block"].state_dict())
    recipe = {"adapter": {"kind": "bottleneck", "targets": ["block"], "r": 2, "placement": placement, "dropout": 0.0}}
    adapterkit.attach(holder, recipe, host=builtin_host)
    w = randomize(holder["block"], gen)
    x = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    out = holder["block"](x)
    y, extra = reference(x)
    assert isinstance(out, tuple) and len(out) == 2
    scale = 0.1 if placement == "parallel" else 1.0
    torch.testing.assert_close(out[0], y + adapter_math(x if placement == "parallel" else y, w, scale), **TIGHT)
    assert torch.equal(out[1], extra)


# summary and state -------------------------------------------------------------------------
def test_summary_counts_equal_adapter_parameters(builtin_host: PluginHost) -> None:
    model = nn.Sequential(nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 12), nn.LayerNorm(12))
    recipe = {"adapter": {"kind": "bottleneck", "targets": ["0", "2"], "r": 3, "norm": True}}
    adapterkit.attach(model, recipe, host=builtin_host)
    result = adapterkit.summary(model)
    found = adapterkit.sites(model)
    assert [s.name for s in result.sites] == list(found) == ["0", "2"]
    for row in result.sites:
        assert row.base == "Linear"
        assert row.trainable == sum(p.numel() for p in found[row.name].adapter_parameters())
    per_site = 12 * 3 + 3 + 3 * 12 + 12 + 2 * 12  # down, down bias, up, up bias, LayerNorm
    assert result.trainable == 2 * per_site == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert result.total == 2 * (12 * 12 + 12) + 2 * 12 + 2 * per_site
    assert str(result).splitlines()[-1] == (
        f"2 sites; trainable {2 * per_site:,} of {result.total:,} parameters "
        f"({100 * 2 * per_site / result.total:.3f}%)"
    )
    state = adapterkit.adapter_state_dict(model)
    assert sum(t.numel() for t in state.values()) == result.trainable
    assert all(not k.split(".", 1)[1].startswith("base.") for k in state)


# routing: task ids reach a routed site without changing the forward signature --------------
class OneHot(Router):
    """Test-only router: task t uses skill t."""

    needs_task_ids = True

    @attrs.frozen
    class Config:
        tasks: int = 2

    @property
    def n_tasks(self) -> int:  # declared: route() validates ids against it
        return int(self.config.tasks)

    def forward(self, task_ids: Tensor | None) -> Tensor | None:
        assert task_ids is not None
        return F.one_hot(task_ids, self.skills).to(torch.float64)[:, None, :]


class OneHotPlugin:
    @hookimpl
    def adapterkit_register_routers(self, registry: Registry[Router]) -> None:
        registry.add("onehot", OneHot)


def test_route_mixes_skills_per_example(builtin_host: PluginHost, gen: torch.Generator) -> None:
    assert builtin_host.register(OneHotPlugin(), "onehot") is not None
    model = nn.Sequential(nn.Linear(5, 3)).double()
    base = nn.Linear(5, 3).double()
    base.load_state_dict(model[0].state_dict())
    recipe = {"adapter": {"kind": "lora", "targets": ["0"], "r": 2, "skills": 3},
              "router": {"name": "onehot", "tasks": 3}}
    adapterkit.attach(model, recipe, host=builtin_host)
    with torch.no_grad():
        for p in model[0].projections.values():
            p.weight.copy_(torch.randn(p.weight.shape, generator=gen, dtype=torch.float64))
    a, b = model[0].projections["A"].weight, model[0].projections["B"].weight
    x = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    tasks = [2, 0, 1, 2]
    with adapterkit.route(model, tasks) as ids:
        out = model(x)
    assert ids.tolist() == tasks
    expected = torch.stack([base(x[i]) + x[i] @ a[t] @ b[t] for i, t in enumerate(tasks)])
    torch.testing.assert_close(out, expected, **TIGHT)
    with adapterkit.route(model, 1):  # one id for the whole batch of one
        torch.testing.assert_close(model(x[:1]), base(x[:1]) + x[:1] @ a[1] @ b[1], **TIGHT)
    assert model[0].routing.task_ids is None  # restored on exit

    with pytest.raises(RoutingError, match=r"^site '0' is routed: call the model with `task_ids=` or inside `with"):
        model(x)
    with pytest.raises(RoutingError, match=r"^task ids must lie in \[0, 3\); out of range: \[3\]"):
        with adapterkit.route(model, [0, 3, 1, 1]):
            pass
    with pytest.raises(RoutingError, match="^task ids must be a 1-D integer tensor"):
        with adapterkit.route(model, torch.tensor([0.0, 1.0])):
            pass
    with pytest.raises(RoutingError, match="^site '0': 2 task ids for a batch of 4"):
        with adapterkit.route(model, [0, 1]):
            model(x)
