"""An AdamW that never moves inactive cells of cell-sparse parameters.

Some splitters (MoSA) train only a random cell of a parameter at each step; their
gradient is exactly zero elsewhere. A zero gradient does not stop AdamW: its momentum
and decoupled weight decay keep moving an element after its gradient vanishes (the
drift of the reference MoSA code). A parameterisation with cells exposes a
``cell_masks()`` method yielding ``(parameter, cell_ids, touched)``: ``cell_ids`` gives
every element's cell (broadcast over the parameter's leading skill axis) and
``touched`` (bool, one per cell) the cells used by a training forward since the last
step. :class:`MaskedAdamW` updates only touched cells, keeps a step count per cell and
leaves every other element, and its optimizer state, bit-identical: each cell trains
exactly as if it were its own parameter that ``torch.optim.AdamW`` skips while its
gradient is ``None``. Parameters without cells get plain AdamW. No host syncs.

Use :func:`adamw` for an attached model (it also applies the router learning rate).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from .training import param_groups


@runtime_checkable
class CellMasked(Protocol):
    """A module whose parameters train cell by cell."""

    def cell_masks(self) -> Iterator[tuple[nn.Parameter, Tensor, Tensor]]:
        """Yield ``(parameter, cell_ids, touched)`` for each cell-sparse parameter."""
        ...


def cell_masked_modules(model: nn.Module) -> list[CellMasked]:
    return [m for m in model.modules() if isinstance(m, CellMasked)]


class MaskedAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, as ``torch.optim.AdamW``) that is exact for cells.

    ``masked`` lists the modules (see :class:`CellMasked`) whose parameters train cell
    by cell; their buffers are read at each step, so moving the model to another
    device after building the optimizer is fine.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        masked: Iterable[CellMasked] = (),
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(
                f"invalid AdamW hyperparameters: lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}"
            )
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.masked = list(masked)

    def _masks(self) -> dict[int, tuple[Tensor, Tensor]]:
        return {id(p): (ids, touched) for m in self.masked for p, ids, touched in m.cell_masks()}

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        masks = self._masks()
        stepped: list[Tensor] = []
        for group in self.param_groups:
            hyper = (group["lr"], *group["betas"], group["eps"], group["weight_decay"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("MaskedAdamW does not support sparse gradients")
                state = self.state[p]
                if id(p) in masks:
                    ids, touched = masks[id(p)]
                    _cells_step(p, p.grad, state, ids, touched, *hyper)
                    stepped.append(touched)
                else:
                    _dense_step(p, p.grad, state, *hyper)
        for touched in stepped:
            touched.zero_()
        return loss


def _moments(state: dict[str, Any], p: Tensor) -> tuple[Tensor, Tensor]:
    if "exp_avg" not in state:
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return state["exp_avg"], state["exp_avg_sq"]


def _dense_step(
    p: Tensor, grad: Tensor, state: dict[str, Any], lr: float, beta1: float, beta2: float, eps: float, wd: float
) -> None:
    exp_avg, exp_avg_sq = _moments(state, p)
    state["step"] = step = state.get("step", 0) + 1  # a Python int: no device sync
    p.mul_(1 - lr * wd)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (exp_avg_sq.sqrt() / (1 - beta2**step) ** 0.5).add_(eps)
    p.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1**step))


def _cells_step(
    p: Tensor, grad: Tensor, state: dict[str, Any], ids: Tensor, touched: Tensor,
    lr: float, beta1: float, beta2: float, eps: float, wd: float,
) -> None:
    exp_avg, exp_avg_sq = _moments(state, p)
    if "cell_step" not in state:
        state["cell_step"] = torch.zeros(touched.shape, dtype=torch.float32, device=p.device)
    cell_step = state["cell_step"]
    cell_step.add_(touched.to(cell_step.dtype))
    steps = cell_step.clamp(min=1)  # never-touched cells are masked out below
    bias1 = 1 - torch.pow(beta1, steps)
    bias2_sqrt = (1 - torch.pow(beta2, steps)).sqrt()
    index = ids.long()
    active = touched[index]  # bool [*shape], broadcast over leading axes
    new_avg = exp_avg.lerp(grad, 1 - beta1)
    new_avg_sq = exp_avg_sq.mul(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (new_avg_sq.sqrt() / bias2_sqrt[index].to(p.dtype)).add_(eps)
    new_p = p.mul(1 - lr * wd).sub_(new_avg / denom * (lr / bias1[index]).to(p.dtype))
    exp_avg.copy_(torch.where(active, new_avg, exp_avg))
    exp_avg_sq.copy_(torch.where(active, new_avg_sq, exp_avg_sq))
    p.copy_(torch.where(active, new_p, p))


def adamw(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float = 0.01,
    router_lr: float | None = None,
    no_decay: Sequence[str] = (),
    **kwargs: Any,
) -> MaskedAdamW:
    """A :class:`MaskedAdamW` over an attached model's trainable parameters.

    Uses :func:`adapterkit.training.param_groups` (routers: own learning rate, no weight
    decay; parameters named with a ``no_decay`` word: no weight decay) and every
    cell-sparse module of the model. For a model without cells it is plain AdamW.
    """
    groups = param_groups(model, lr=lr, weight_decay=weight_decay, router_lr=router_lr, no_decay=no_decay)
    return MaskedAdamW(groups, lr=lr, weight_decay=weight_decay, masked=cell_masked_modules(model), **kwargs)
