"""Few-shot adaptation of a trained skill inventory to a new task.

Modes (the papers' names; ``poly``/``mhr`` and ``poly-mu``/``mhr-mu`` are the same
operation, the head count comes from the inventory):

- ``poly`` / ``mhr``: a fresh routing row for the new task; the skills and that row train.
- ``mhr-z``: the skills are frozen; only the routing row trains, so the per-task state is
  the row alone (:func:`save_routing` writes ``sites * H * K`` numbers).
- ``mhr-mu`` / ``poly-mu``: routing is dropped and the skills averaged: each site becomes
  one plain LoRA (exactly the uniform-routing model), which then trains.

After ``poly``/``mhr``/``mhr-z`` the model routes one task: call it with
``adapterkit.route(model, 0)``. The recipe kept on the model is updated to match.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import attrs
import torch
from torch import Tensor, nn

import adapterkit
from adapterkit.plugin_api import AdapterkitError, AdapterSite, AdaptMode, replace_sites, sites

from .mergers import Average
from .routers import PolyRouter

ROW_INITS: tuple[str, ...] = ("uniform", "mean", "random")


def routed_sites(model: nn.Module) -> dict[str, AdapterSite]:
    """Sites routed by a ``poly`` router (the learned task x skill logits)."""
    return {n: s for n, s in sites(model).items() if isinstance(s.router, PolyRouter)}


def _router(site: AdapterSite) -> PolyRouter:
    router = site.router
    assert isinstance(router, PolyRouter)
    return router


@torch.no_grad()
def new_row(router: PolyRouter, init: str | int, generator: torch.Generator) -> Tensor:
    """The initial routing row ``[1, H*K]`` of a new task.

    ``uniform``: zeros (equal weights in eval); ``mean``: the mean of the trained rows;
    ``random``: ``U(-init_range, init_range)`` as a fresh router; an int ``t``: task t's row.
    """
    logits = router.logits
    if isinstance(init, int) and not isinstance(init, bool):
        if not 0 <= init < logits.shape[0]:
            raise AdapterkitError(f"init task {init} is out of range: the inventory has tasks [0, {logits.shape[0]})")
        return logits[init : init + 1].clone()
    if init == "uniform":
        return torch.zeros_like(logits[:1])
    if init == "mean":
        return logits.mean(0, keepdim=True)
    if init == "random":
        bound = router.config.init_range
        row = torch.empty(1, logits.shape[1]).uniform_(-bound, bound, generator=generator)
        return row.to(logits)
    raise AdapterkitError(f"unknown routing-row init {init!r}; choose {', '.join(ROW_INITS)} or a trained task id")


def _routed(model: nn.Module) -> dict[str, AdapterSite]:
    routed = routed_sites(model)
    if not routed:
        raise ValueError("it needs a model whose sites use router 'poly' (a trained skill inventory)")
    return routed


def _init(value: Any) -> str | int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if value not in ROW_INITS:
        raise ValueError(f"unknown routing-row init {value!r}; choose {', '.join(ROW_INITS)} or a trained task id")
    return str(value)


class NewRow(AdaptMode):
    """``poly``/``mhr``: a fresh routing row for the new task; the skills and that row train."""

    frozen_skills: ClassVar[bool] = False

    @attrs.frozen
    class Config:
        init: str | int = attrs.field(default="uniform", converter=_init)

    def prepare(self, model: nn.Module, *, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        routed = _routed(model)
        rows = {name: new_row(_router(site), self.config.init, generator) for name, site in routed.items()}
        for name, site in routed.items():
            router = _router(site)
            router.logits = nn.Parameter(rows[name])
            router.config = attrs.evolve(router.config, tasks=1)
            for pname, param in site.named_parameters():
                if not pname.startswith(("base.", "router.")):
                    param.requires_grad_(not self.frozen_skills)


class RowOnly(NewRow):
    """``mhr-z``: the skills are frozen; only the routing row trains, so the per-task state is
    the row alone (:meth:`compact_state`: ``sites * H * K`` numbers)."""

    frozen_skills: ClassVar[bool] = True
    train_head: ClassVar[bool] = False

    def compact_state(self, model: nn.Module) -> dict[str, Tensor]:
        return routing_state_dict(model)


class Averaged(AdaptMode):
    """``mhr-mu``/``poly-mu``: routing is dropped and the skills averaged: each site becomes one
    plain LoRA (exactly the uniform-routing model), which then trains."""

    def prepare(self, model: nn.Module, *, seed: int) -> None:
        average = Average()
        merged = {name: average.merge_site(site) for name, site in _routed(model).items()}
        for site in merged.values():
            for param in site.adapter_parameters():
                param.requires_grad_(True)
        replace_sites(model, merged)


MODE_CLASSES: dict[str, type[AdaptMode]] = {
    "poly": NewRow, "mhr": NewRow, "mhr-z": RowOnly, "mhr-mu": Averaged, "poly-mu": Averaged,
}
MODES: tuple[str, ...] = tuple(MODE_CLASSES)


def adapt(model: nn.Module, mode: str, *, init: str | int = "uniform", seed: int = 0) -> nn.Module:
    """Prepare a trained inventory (``poly``-routed model) for few-shot training on a new task:
    :func:`adapterkit.adapt` with this plugin's modes (``init`` applies to the row modes).

    In place; sets which parameters train (``requires_grad``) per ``mode`` and returns
    the model. Build the optimizer afterwards, e.g. with ``adapterkit.training.param_groups``.
    """
    if mode not in MODE_CLASSES:
        raise AdapterkitError(f"unknown adaptation mode {mode!r}; choose one of {', '.join(MODES)}")
    args: dict[str, Any] = {"init": init} if issubclass(MODE_CLASSES[mode], NewRow) else {}
    adapterkit.adapt(model, mode, seed=seed, **args)
    return model


def routing_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Only the routing logits of every ``poly`` site: the whole per-task state of MHR-z."""
    routed = routed_sites(model).items()
    return {f"{name}.router.logits": _router(site).logits.detach().clone() for name, site in routed}


@torch.no_grad()
def load_routing_state_dict(model: nn.Module, tensors: Mapping[str, Tensor]) -> nn.Module:
    """Load :func:`routing_state_dict` output onto a model adapted the same way."""
    routed = routed_sites(model)
    wanted = {f"{name}.router.logits": site for name, site in routed.items()}
    missing, unexpected = sorted(set(wanted) - set(tensors)), sorted(set(tensors) - set(wanted))
    if missing or unexpected:
        raise AdapterkitError(
            f"routing state does not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    for key, site in wanted.items():
        value = tensors[key]
        logits = _router(site).logits
        if value.shape != logits.shape:
            raise AdapterkitError(f"routing state {key!r}: shape {tuple(value.shape)}, model has {tuple(logits.shape)}")
        logits.copy_(value)
    return model


def save_routing(model: nn.Module, url: str, *, storage_options: Mapping[str, Any] | None = None) -> Any:
    """Write only the routing rows (the MHR-z per-task state) as one small safetensors file;
    returns its header (``file_size``: the bytes written)."""
    from adapterkit.plugin_api import save_tensors

    return save_tensors(
        routing_state_dict(model), url, metadata={"content": "poly routing"}, storage_options=storage_options
    )


def load_routing(url: str, model: nn.Module, *, storage_options: Mapping[str, Any] | None = None) -> nn.Module:
    """Load a file written by :func:`save_routing` onto a model adapted the same way."""
    from adapterkit.plugin_api import load_tensors

    return load_routing_state_dict(model, load_tensors(url, storage_options=storage_options))
