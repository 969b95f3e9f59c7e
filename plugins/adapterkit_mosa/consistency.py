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
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
from torch import Tensor
from torch.nn import functional as F

from adapterkit.plugin_api import LossTerm


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
