"""Helpers of the merging tests: small expert adapters saved to memory://, reference updates."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

import adapterkit


def small_base(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8)).eval()


def expert(base: nn.Module, adapter: dict[str, Any], seed: int, std: float = 0.3, **roles: Any) -> nn.Module:
    """``base`` (copied) with an adapter whose every tensor is random (stands in for training)."""
    model = adapterkit.attach(copy.deepcopy(base), {"adapter": {"targets": ["0", "2"], **adapter}, **roles})
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in adapterkit.adapter_state_dict(model).items():
            if p.is_floating_point() and "cell_ids" not in name:
                p.copy_(torch.randn(p.shape, generator=generator) * std)
    return model.eval()


def save_experts(base: nn.Module, prefix: str, adapters: Sequence[dict[str, Any]], **roles: Any) -> list[str]:
    urls = []
    for i, adapter in enumerate(adapters):
        url = f"{prefix}/expert{i}.safetensors"
        adapterkit.save(expert(base, adapter, seed=100 + i, **roles), url)
        urls.append(url)
    return urls


def lora_delta(site: Any) -> Tensor:
    """A single-skill LoRA site's update by definition: ``(alpha / r) * (A B)^T``, in float64."""
    w = site.mixed_weights()
    return (site.config.scale * (w["A"].double() @ w["B"].double())).T


def deltas_of(model: nn.Module) -> dict[str, Tensor]:
    return {name: lora_delta(site) for name, site in adapterkit.sites(model).items()}


def stacked_deltas(model: nn.Module) -> dict[str, list[Tensor]]:
    """Each skill's update at each site of a stacked model (float32, as ``delta_weight``)."""
    out = {}
    for name, site in adapterkit.sites(model).items():
        w = site.expected_weights()
        out[name] = [(site.scale * (w["A"][k] @ w["B"][k])).T for k in range(site.skills)]
    return out
