"""Fixtures for the MoSA tests: a small random BERT (the real model is not the point here)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from mosa_testlib import VOCAB, TaskMix, loss_of, mosa_recipe, tiny_bert
from torch import nn

import adapterkit
from adapterkit.plugins import PluginHost


@pytest.fixture
def make_model() -> Callable[..., nn.Module]:
    """``make_model(**recipe_options)``: a tiny BERT with MoSA attached (see :func:`mosa_recipe`)."""

    def make(recipe: dict[str, Any] | None = None, **options: Any) -> nn.Module:
        return adapterkit.attach(tiny_bert(), recipe or mosa_recipe(**options))

    return make


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(0, VOCAB, (4, 6), generator=generator)}


@pytest.fixture
def loss() -> Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]:
    return loss_of


@pytest.fixture
def routed_host() -> PluginHost:
    host = PluginHost()
    host.load_entry_points()
    host.routers.add("test-mix", TaskMix)
    return host
