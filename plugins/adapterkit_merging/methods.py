"""The merge methods on task tensors: ``tensors[K, *shape]`` (one per expert) -> ``[*shape]``.

Each follows PEFT's ``peft.utils.merge_utils`` definition operation for operation, so
the same task tensors (and, for DARE, the same random draws) give the same result:

- ``task_arithmetic``: ``sum_k w_k T_k``;
- ``magnitude_prune``: keep each ``T_k``'s ``int(density * numel)`` largest magnitudes, then
  ``sum_k w_k T_k``;
- ``ties``: trim as ``magnitude_prune``; elect a sign per element (``total``: the sign of
  ``sum_k T_k``; ``frequency``: of ``sum_k sign(T_k)``; zero counts as +); disjoint mean:
  ``sum_k w_k T_k [sign T_k = elected] / max(1, #{k: sign T_k = elected})``;
- ``dare_linear``/``dare_ties``: keep each element with probability ``density`` and divide
  by ``density`` (so ``E[kept] = T``), then sum (linear) or elect and take the disjoint mean.

``density >= 1`` prunes nothing (and draws nothing). DARE's masks are drawn per expert in
order with ``torch.bernoulli(full_like(T_k, density), generator=generator)`` on the CPU
(``generator=None``: torch's global generator, as PEFT), or given as ``masks[K, *shape]``.
Sign election is on the pruned, unweighted tensors (PEFT's order), so a negative weight
flips an expert's contribution, not the vote.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

SIGN_METHODS = ("total", "frequency")


def _weights(tensors: Tensor, weights: Sequence[float] | Tensor) -> Tensor:
    """``weights`` shaped ``[K, 1, ...]`` to broadcast over ``tensors[K, *shape]`` (float32 as PEFT's)."""
    w = weights.to(tensors.device) if isinstance(weights, Tensor) else torch.tensor(list(weights)).to(tensors.device)
    if w.shape != (tensors.shape[0],):
        raise ValueError(f"{w.numel()} weights for {tensors.shape[0]} task tensors")
    return w.view(w.shape + (1,) * (tensors.dim() - 1))


def magnitude_mask(tensor: Tensor, density: float) -> Tensor:
    """A float mask of the ``int(density * numel)`` largest-magnitude elements of ``tensor``."""
    mask = torch.zeros_like(tensor).reshape(-1)
    k = int(density * tensor.numel())
    top = torch.topk(tensor.abs().reshape(-1), k=k, largest=True)
    mask[top[1]] = 1
    return mask.reshape(tensor.shape)


def trim(tensors: Tensor, density: float) -> Tensor:
    """Each task tensor pruned to its ``density`` largest magnitudes (TIES' trim)."""
    _check_density(density)
    if density >= 1:
        return tensors
    return torch.stack([t * magnitude_mask(t, density) for t in tensors])


def random_masks(tensors: Tensor, density: float, generator: torch.Generator | None = None) -> Tensor:
    """DARE's keep masks ``[K, *shape]``: Bernoulli(``density``) per element, expert by expert,
    drawn on the CPU (``generator`` or torch's global one) so any device gets the same masks."""
    return torch.stack([
        torch.bernoulli(torch.full(t.shape, float(density), dtype=t.dtype), generator=generator).to(t.device)
        for t in tensors
    ])


def drop(tensors: Tensor, density: float, *, generator: torch.Generator | None = None,
         masks: Tensor | None = None) -> Tensor:
    """DARE's drop and rescale: ``T_k * M_k / density`` with random (or the given) masks."""
    _check_density(density)
    if density >= 1:
        return tensors
    if masks is None:
        masks = random_masks(tensors, density, generator)
    elif masks.shape != tensors.shape:
        raise ValueError(f"masks of shape {list(masks.shape)} for task tensors of shape {list(tensors.shape)}")
    return torch.stack([t * m / density for t, m in zip(tensors, masks.to(tensors), strict=True)])


def elect_sign(tensors: Tensor, method: str = "total") -> Tensor:
    """Where each task tensor agrees with the elected sign (a bool mask ``[K, *shape]``)."""
    sign = tensors.sign()
    if method == "total":
        magnitude = tensors.sum(dim=0)
    elif method == "frequency":
        magnitude = sign.sum(dim=0)
    else:
        raise ValueError(f"majority_sign_method must be one of {', '.join(map(repr, SIGN_METHODS))}, got {method!r}")
    return sign == torch.where(magnitude >= 0, 1, -1)


def disjoint_mean(weighted: Tensor, agree: Tensor) -> Tensor:
    """The mean over the experts that agree with the elected sign (0 where none does)."""
    return (weighted * agree).sum(dim=0) / torch.clamp(agree.sum(dim=0), min=1.0)


def task_arithmetic(tensors: Tensor, weights: Sequence[float] | Tensor) -> Tensor:
    return (tensors * _weights(tensors, weights)).sum(dim=0)


def magnitude_prune(tensors: Tensor, weights: Sequence[float] | Tensor, density: float) -> Tensor:
    return task_arithmetic(trim(tensors, density), weights)


def ties(
    tensors: Tensor, weights: Sequence[float] | Tensor, density: float, majority_sign_method: str = "total"
) -> Tensor:
    trimmed = trim(tensors, density)
    agree = elect_sign(trimmed, majority_sign_method)
    return disjoint_mean(trimmed * _weights(trimmed, weights), agree)


def dare_linear(tensors: Tensor, weights: Sequence[float] | Tensor, density: float, *,
                generator: torch.Generator | None = None, masks: Tensor | None = None) -> Tensor:
    return task_arithmetic(drop(tensors, density, generator=generator, masks=masks), weights)


def dare_ties(tensors: Tensor, weights: Sequence[float] | Tensor, density: float, majority_sign_method: str = "total",
              *, generator: torch.Generator | None = None, masks: Tensor | None = None) -> Tensor:
    dropped = drop(tensors, density, generator=generator, masks=masks)
    agree = elect_sign(dropped, majority_sign_method)
    return disjoint_mean(dropped * _weights(dropped, weights), agree)


def _check_density(density: float) -> None:
    if not 0 < density:
        raise ValueError(f"density must be in (0, 1], got {density!r}")
