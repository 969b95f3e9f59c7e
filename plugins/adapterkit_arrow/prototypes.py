"""Arrow's prototypes: each expert's top right singular vector of ``ΔW = s (A B)^T``, computed
without forming ``ΔW``; and GenKnowSub, the general adapters' average subtracted first.

Ours is the LoRA layout ``A [d_in, r]``, ``B [r, d_out]`` (PEFT's ``lora_A.weight`` and
``lora_B.weight`` transposed): ``ΔW^T = A B`` (``d_in x d_out``), so the right singular
vectors of ``ΔW`` are the left ones of ``A B``. With ``A = Q R`` (reduced QR, ``Q [d_in, r]``)
and the small SVD ``R B = U S V^T`` (``r x d_out``), ``A B = (Q U) S V^T``: the top one is
``Q U[:, 0]``. One batched QR and one batched SVD for all experts, in float64, exact (PEFT
runs 15 power iterations from a random start, which converge only when ``σ2/σ1`` is small).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


@torch.no_grad()
def top_right_singular_vectors(a: Tensor, b: Tensor) -> Tensor:
    """``a [K, d_in, r]``, ``b [K, r, d_out]`` -> ``[K, d_in]``: unit top right singular vector of
    each ``(a_k b_k)^T``, signed so that its largest-magnitude entry is positive (a
    deterministic choice; Arrow's scores ``|<h, p>|`` ignore the sign). Same dtype as ``a``."""
    if a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[0] or a.shape[2] != b.shape[1]:
        raise ValueError(f"expected A [K, d_in, r] and B [K, r, d_out], got {list(a.shape)} and {list(b.shape)}")
    q, r = torch.linalg.qr(a.double())  # q [K, d_in, m], r [K, m, r'] with m = min(d_in, r)
    u, _, _ = torch.linalg.svd(r @ b.double(), full_matrices=False)  # [K, m, .]
    v = (q @ u[..., :1]).squeeze(-1)  # [K, d_in], unit norm
    peak = v.gather(-1, v.abs().argmax(-1, keepdim=True))
    v = v * torch.where(peak < 0, -1.0, 1.0)
    return (v / v.norm(dim=-1, keepdim=True).clamp_min(1e-300)).to(a.dtype)


def subtract_general(a: Tensor, b: Tensor, general_a: Sequence[Tensor], general_b: Sequence[Tensor]) -> tuple[
        Tensor, Tensor]:
    """GenKnowSub as PEFT does it: the mean of the general adapters' factors subtracted from
    each expert's factors, ``A_k - mean(A_g)`` and ``B_k - mean(B_g)`` (factor-wise, on the raw
    factors: every adapter has the same rank). ``a [K, d_in, r]``, ``b [K, r, d_out]``."""
    mean_a = torch.stack(list(general_a)).mean(0)
    mean_b = torch.stack(list(general_b)).mean(0)
    if mean_a.shape != a.shape[1:] or mean_b.shape != b.shape[1:]:
        raise ValueError(f"general adapters of shapes {list(mean_a.shape)}/{list(mean_b.shape)} do not fit experts "
                         f"of {list(a.shape[1:])}/{list(b.shape[1:])}")
    return a - mean_a.to(a.dtype), b - mean_b.to(b.dtype)
