"""Helpers any training loop can use: optimizer parameter groups, sampler progress."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from .attach import sites


def param_groups(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float = 0.0,
    router_lr: float | None = None,
    no_decay: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Optimizer groups for an attached model: adapters, then routers.

    Router parameters get their own learning rate (``router_lr``, default ``lr``) and no
    weight decay, as in the Poly/MHR reference training. Adapter parameters whose name
    contains one of ``no_decay`` get no weight decay either (MoSA's official optimizer:
    ``("bias", "LayerNorm.bias", "LayerNorm.weight")``); they form a group of their own.
    """
    router_ids: set[int] = set()
    routers = []
    for site in sites(model).values():
        for p in site.router.parameters():
            if p.requires_grad and id(p) not in router_ids:
                router_ids.add(id(p))
                routers.append(p)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in router_ids]
    exempt = [p for n, p in named if any(word in n for word in no_decay)]
    adapters = [p for n, p in named if not any(word in n for word in no_decay)]
    groups: list[dict[str, Any]] = [{"params": adapters, "lr": lr, "weight_decay": weight_decay, "name": "adapters"}]
    if exempt:
        groups.append({"params": exempt, "lr": lr, "weight_decay": 0.0, "name": "no decay"})
    if routers:
        router_lr = router_lr if router_lr is not None else lr
        groups.append({"params": routers, "lr": router_lr, "weight_decay": 0.0, "name": "routers"})
    return groups


def set_progress(model: nn.Module, fraction: float) -> None:
    """Report training progress in ``[0, 1]`` to every sampler of an attached model, once
    each (``Sampler.set_progress``); loops call it before each step with ``step / total``."""
    for sampler in {id(s.sampler): s.sampler for s in sites(model).values()}.values():
        sampler.set_progress(fraction)


def freeze_norm_statistics(model: nn.Module) -> nn.Module:
    """Put frozen batch-norm layers in eval mode so training adapters leaves the base intact.

    ``attach`` freezes base parameters, but a BatchNorm in train mode would still update
    its running statistics; call this after ``model.train()``.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
            p.requires_grad for p in module.parameters(recurse=False)
        ):
            module.eval()
    return model
