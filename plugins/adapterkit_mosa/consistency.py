"""MoSA's consistency regulariser, for any training loop.

Two training forwards of the same batch draw different cells (fresh draws at every
forward); the regulariser pulls their predictions together::

    loss = task_loss(o1) + weight * 1/2 [ KL(o1 || sg o2) + KL(o2 || sg o1) ]

where ``KL(a || sg b) = sum softmax(b) (log softmax(b) - log softmax(a))`` with ``b``
detached (stop-gradient), averaged over the examples: each pass is pulled towards the
other's frozen prediction, so both draws get gradient. ``weight`` defaults to 1.0 as in
every official script. Usage::

    out = consistency_loss(lambda: model(x), lambda logits: F.cross_entropy(logits, y))
    out.loss.backward()

The official Stanford Cars setting adds a hidden-state term (``DEEPREG``), the loss term
``consistency-hidden``: ``weight * 0.01 / L * sum_{i < 6} MSE(h1_i, h2_i)`` over the first
6 of the L hidden states of the two passes, with gradient through both (no stop-gradient).
Here the hidden states are the outputs of the adapted sites, in call order: with the
presets' targets (``encoder.layer.N.output``) exactly each transformer block's output.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import attrs
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.modules.module import register_module_forward_hook

from adapterkit.plugin_api import AdapterSite, LossTerm, positive


def kl_to_detached(logits: Tensor, target_logits: Tensor) -> Tensor:
    """``KL(logits || sg target)``: ``sum p_t (log p_t - log p)`` per example, batch mean."""
    log_p = F.log_softmax(logits.float(), dim=-1)
    log_t = F.log_softmax(target_logits.detach().float(), dim=-1)
    return F.kl_div(log_p.flatten(0, -2), log_t.flatten(0, -2), reduction="batchmean", log_target=True)


def symmetric_kl(o1: Tensor, o2: Tensor) -> Tensor:
    """``1/2 [KL(o1 || sg o2) + KL(o2 || sg o1)]`` over the last axis (class logits)."""
    return 0.5 * (kl_to_detached(o1, o2) + kl_to_detached(o2, o1))


@attrs.frozen
class ConsistencyLoss:
    """The total loss and its parts; ``logits`` are pass 1's (for metrics)."""

    loss: Tensor
    task: Tensor
    consistency: Tensor
    logits: Tensor


def consistency_loss(
    forward: Callable[[], Tensor], task_loss: Callable[[Tensor], Tensor], weight: float = 1.0
) -> ConsistencyLoss:
    """Run ``forward`` twice (fresh cell draws each time) and combine as in the module docstring.

    ``forward()`` returns class logits ``[..., classes]``; ``task_loss(logits)`` is the
    task loss of pass 1. With ``weight = 0`` the second pass is skipped.
    """
    o1 = forward()
    task = task_loss(o1)
    if weight == 0:
        zero = task.detach() * 0
        return ConsistencyLoss(task, task, zero, o1)
    o2 = forward()
    consistency = symmetric_kl(o1, o2)
    return ConsistencyLoss(task + weight * consistency, task, consistency, o1)


class Consistency(LossTerm):
    """The loss term ``consistency`` for workflow configs (``[train.loss]``): :func:`consistency_loss`
    with ``weight`` (1.0 as in every official script)."""

    def __call__(self, forward: Callable[[], Tensor], task_loss: Callable[[Tensor], Tensor]) -> Tensor:
        return consistency_loss(forward, task_loss, self.config.weight).loss


HIDDEN_LAYERS = 6  # the official regulariser compares the first 6 hidden states
HIDDEN_SCALE = 0.01  # ... and scales their summed MSE by 0.01 / (number of hidden states)


def hidden_mse(h1: Sequence[Tensor], h2: Sequence[Tensor], layers: int = HIDDEN_LAYERS) -> Tensor:
    """``0.01 / L * sum_{i < layers} MSE(h1_i, h2_i)`` for L hidden states per pass (both get gradient)."""
    if not h1 or len(h1) != len(h2):
        raise ValueError(f"the two passes recorded {len(h1)} and {len(h2)} hidden states; need equal, non-zero counts")
    total = sum(F.mse_loss(a.float(), b.float()) for a, b in zip(h1[:layers], h2[:layers], strict=True))
    return total / len(h1) * HIDDEN_SCALE  # type: ignore[return-value]


@contextlib.contextmanager
def site_outputs() -> Iterator[list[Tensor]]:
    """Record the output of every adapter site that runs inside the block, in call order."""
    outputs: list[Tensor] = []

    def record(module: nn.Module, args: Any, output: Any) -> None:
        if isinstance(module, AdapterSite):
            outputs.append(output[0] if isinstance(output, tuple) else output)

    handle = register_module_forward_hook(record)
    try:
        yield outputs
    finally:
        handle.remove()


class ConsistencyHidden(LossTerm):
    """The loss term ``consistency-hidden`` (the official Stanford Cars setting): the
    consistency regulariser (``weight``) plus ``hidden_weight`` times :func:`hidden_mse`
    of the two passes' site outputs (the first ``layers`` of them). Both weights are the
    official ``REG_WEIGHT`` (1.0)."""

    @attrs.frozen
    class Config:
        weight: float = 1.0
        hidden_weight: float = 1.0
        layers: int = attrs.field(default=HIDDEN_LAYERS, validator=positive)

    def __call__(self, forward: Callable[[], Tensor], task_loss: Callable[[Tensor], Tensor]) -> Tensor:
        if self.config.weight == 0 and self.config.hidden_weight == 0:
            return task_loss(forward())
        with site_outputs() as h1:
            o1 = forward()
        with site_outputs() as h2:
            o2 = forward()
        loss = task_loss(o1) + self.config.weight * symmetric_kl(o1, o2)
        return loss + self.config.hidden_weight * hidden_mse(h1, h2, self.config.layers)
