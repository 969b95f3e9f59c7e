"""Low-rank factor algebra for mergers: sums of LoRA updates held exactly, and SVD ranks.

A LoRA skill's update is the product of its factors, ``A_k [p, r]`` times ``B_k [r, q]``.
:func:`concat_factors` holds ``sum_k w_k A_k B_k`` exactly as one pair of factors (the
columns of the weighted ``A_k`` side by side, the rows of the ``B_k`` stacked);
:func:`truncate` re-factorises a product to its best rank-``n`` approximation
(Eckart-Young) without forming it; :func:`factorize` does the same for a dense matrix.
SVDs run in float64 and the factors come back in the inputs' dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def concat_factors(
    a: Tensor, b: Tensor, weights: Sequence[float] | Tensor, *, drop_padding: bool = False
) -> tuple[Tensor, Tensor]:
    """``(A', B')`` with ``A' B' = sum_k w_k A_k B_k`` exactly, from ``a[K, p, r]``, ``b[K, r, q]``.

    ``A' = [w_1 A_1 | ... | w_K A_K]`` (``[p, K r]``), ``B'`` the ``B_k`` stacked (``[K r, q]``).
    ``drop_padding`` leaves out, per skill, the trailing components that are zero in both
    ``A_k`` and ``B_k`` (the zero padding that stacks experts of smaller ranks): the result
    has rank ``sum_k r_k``, still exact.
    """
    if a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[0] or a.shape[2] != b.shape[1]:
        raise ValueError(f"factors of shapes {list(a.shape)} and {list(b.shape)} are not [K, p, r] and [K, r, q]")
    w = torch.as_tensor(weights, dtype=a.dtype, device=a.device)
    if w.shape != (a.shape[0],):
        raise ValueError(f"{w.numel()} weights for {a.shape[0]} skills")
    cols, rows = [], []
    for k in range(a.shape[0]):
        keep = effective_rank(a[k], b[k]) if drop_padding else a.shape[2]
        cols.append(a[k, :, :keep] * w[k])
        rows.append(b[k, :keep])
    if sum(c.shape[1] for c in cols) == 0:  # every skill is zero: one zero component
        return a.new_zeros(a.shape[1], 1), b.new_zeros(1, b.shape[2])
    return torch.cat(cols, dim=1), torch.cat(rows, dim=0)


def effective_rank(a: Tensor, b: Tensor) -> int:
    """``r`` minus the trailing components zero in both ``a[p, r]`` (column) and ``b[r, q]`` (row)."""
    live = (a != 0).any(0) | (b != 0).any(1)
    found = torch.nonzero(live)
    return int(found[-1]) + 1 if found.numel() else 0


@torch.no_grad()
def truncate(a: Tensor, b: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """The best rank-``rank`` approximation of ``a @ b`` (``[p, R] @ [R, q]``) as factors
    ``[p, rank]``, ``[rank, q]``: the SVD of a small ``R x R`` core (QR of each factor) when
    ``R`` is below ``min(p, q)``, of the product otherwise. Singular values are split evenly
    (``U sqrt(S)``, ``sqrt(S) V^T``); missing components are zeros, so the rank is always ``rank``."""
    p, big_r = a.shape
    q = b.shape[1]
    if big_r < min(p, q):
        qa, ra = torch.linalg.qr(a.double())
        qb, rb = torch.linalg.qr(b.double().T)
        u, s, vh = torch.linalg.svd(ra @ rb.T)
        u, vh = qa @ u, vh @ qb.T
    else:
        u, s, vh = torch.linalg.svd(a.double() @ b.double(), full_matrices=False)
    return _split(u, s, vh, rank, a.dtype)


@torch.no_grad()
def factorize(matrix: Tensor, rank: int | None = None) -> tuple[Tensor, Tensor]:
    """``matrix[p, q] ~ A @ B`` by SVD: the best rank-``rank`` approximation, or with ``rank``
    ``None`` the full rank ``min(p, q)`` (exact up to float rounding)."""
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return _split(u, s, vh, min(matrix.shape) if rank is None else rank, matrix.dtype)


def _split(u: Tensor, s: Tensor, vh: Tensor, rank: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    n = min(rank, s.shape[0])
    root = s[:n].sqrt()
    a, b = u[:, :n] * root, root[:, None] * vh[:n]
    if n < rank:
        a = torch.cat([a, a.new_zeros(a.shape[0], rank - n)], dim=1)
        b = torch.cat([b, b.new_zeros(rank - n, b.shape[1])], dim=0)
    return a.to(dtype), b.to(dtype)
