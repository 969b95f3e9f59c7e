"""Adapted layers keep the forward free of host syncs: ``torch.compile(fullgraph=True)``
traces an attached model with zero graph breaks and trains a step like eager does."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
from torch import nn
from torch.nn import functional as F

import adapterkit
from adapterkit import PluginHost

RECIPES = {
    "lora": {"adapter": {"kind": "lora", "targets": ["0", "2"], "r": 4, "alpha": 8}},
    "bottleneck": {"adapter": {"kind": "bottleneck", "targets": ["0", "2"], "r": 4, "norm": True, "dropout": 0.0}},
    "sequential": {"adapter": {"kind": "bottleneck", "targets": ["2"], "r": 4, "placement": "sequential",
                               "dropout": 0.0}},
}


def attached(name: str, host: PluginHost) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 10))
    adapterkit.attach(model, RECIPES[name], host=host)
    with torch.no_grad():  # non-zero up/B so every adapter parameter gets a real gradient
        for site in adapterkit.sites(model).values():
            for proj in site.projections.values():
                proj.weight.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_no_graph_breaks(name: str, builtin_host: PluginHost) -> None:
    torch._dynamo.reset()
    model = attached(name, builtin_host).train()
    explanation = torch._dynamo.explain(model)(torch.randn(4, 16))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("name", ["lora", "bottleneck"])
def test_fullgraph_compiled_step_matches_eager(name: str, builtin_host: PluginHost) -> None:
    torch._dynamo.reset()
    eager = attached(name, builtin_host).train()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    x, y = torch.randn(8, 16), torch.randint(0, 10, (8,))
    params = {}
    for label, model, fn in (("eager", eager, eager), ("compiled", compiled_model, compiled)):
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        loss = F.cross_entropy(fn(x), y)
        loss.backward()
        optimizer.step()
        params[label] = {n: p.detach().clone() for n, p in model.named_parameters()}
    for n, value in params["eager"].items():
        torch.testing.assert_close(params["compiled"][n], value, rtol=1e-5, atol=1e-6)
    trainable = [n for n, p in eager.named_parameters() if p.requires_grad]
    assert all(not torch.equal(params["compiled"][n], attached(name, builtin_host).state_dict()[n]) for n in trainable)


def test_split_and_sampled_lora_has_no_graph_breaks(with_stripes, discover) -> None:
    """Cells gated by a third-party sampler (a random draw per forward, on the device)."""
    torch._dynamo.reset()
    host = discover()
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 10))
    recipe = {"adapter": {"kind": "lora", "targets": ["0", "2"], "r": 4},
              "splitter": {"name": "stripes", "n_cells": 4, "by": "elements"}, "sampler": {"name": "one_stripe"}}
    adapterkit.attach(model, recipe, host=host)
    for training in (True, False):
        explanation = torch._dynamo.explain(model.train(training))(torch.randn(4, 16))
        assert explanation.graph_break_count == 0, explanation.break_reasons
