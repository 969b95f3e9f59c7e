"""A user's ``module:factory`` model is the same model in every process: the factory runs
under the run's seed, so an adapter trained on it loads onto the same base weights."""

from __future__ import annotations

import sys
import types

import torch
from torch import nn

from adapterkit.workflows.config import ModelConfig
from adapterkit.workflows.models import resolve_backbone


def test_an_unseeded_factory_builds_the_same_model_under_the_run_seed(monkeypatch) -> None:
    module = types.ModuleType("unseeded_user_model")
    module.make = lambda hidden=8: nn.Sequential(nn.Flatten(), nn.Linear(64, hidden))  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "unseeded_user_model", module)
    config = ModelConfig(backbone="unseeded_user_model:make", args={"hidden": 8})
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = resolve_backbone(config, seed=7).build().state_dict()
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG stream is untouched
    torch.rand(5)  # whatever the global RNG did in between (another process, another order)
    second = resolve_backbone(config, seed=7).build().state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    other = resolve_backbone(config, seed=8).build().state_dict()
    assert not torch.equal(first["1.weight"], other["1.weight"])
