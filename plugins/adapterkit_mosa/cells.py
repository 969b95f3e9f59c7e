"""Random element-wise cells: the partitions behind MoSA and its hierarchical variant.

Every element of a projection gets a random score from a CPU generator; sorting the
scores and cutting them into ``n`` equal bins by quantile gives ``n`` disjoint cells
that cover the projection (sizes differ by at most one). Nested levels reuse the same
scores: a level with ``n`` cells groups ``F / n`` consecutive bins of the finest level
``F``, so each coarser cell is exactly a union of finer ones.

Cell ids are stored compactly (``uint8`` up to 256 cells) and saved with the adapter,
so a resumed run reproduces its cells exactly on any torch version or device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def id_dtype(n_cells: int) -> torch.dtype:
    """The smallest dtype that holds ``n_cells`` ids."""
    return torch.uint8 if n_cells <= 256 else torch.int32


def random_cells(shape: Sequence[int], n_cells: int, generator: torch.Generator) -> Tensor:
    """Cell id of every element of ``shape``: ``n_cells`` equal quantile bins of random scores."""
    numel = 1
    for size in shape:
        numel *= size
    if n_cells < 1:
        raise ValueError(f"n_cells must be at least 1, got {n_cells}")
    if n_cells > numel:
        raise ValueError(f"n_cells={n_cells} exceeds the {numel} elements of a {tuple(shape)} projection")
    scores = torch.rand(numel, generator=generator, dtype=torch.float64)
    order = torch.argsort(scores, stable=True)
    ids = torch.empty(numel, dtype=torch.int64)
    ids[order] = torch.arange(numel) * n_cells // numel  # rank -> quantile bin
    return ids.to(id_dtype(n_cells)).reshape(tuple(shape))


def check_levels(levels: Sequence[int]) -> None:
    """Raise ``ValueError`` unless ``levels`` are increasing cell counts, each refining the previous."""
    if not levels:
        raise ValueError("levels must list at least one cell count, e.g. [2, 4, 8]")
    for n in levels:
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"levels must be positive integers, got {list(levels)}")
    for coarse, fine in zip(levels[:-1], levels[1:], strict=True):
        if fine <= coarse or fine % coarse:
            raise ValueError(
                f"levels {list(levels)} do not nest: each level must refine the previous one "
                f"(a multiple of it), but {fine} does not refine {coarse}"
            )


def coarse_ids(fine_ids: Tensor, levels: Sequence[int], level: int) -> Tensor:
    """Cell ids at ``levels[level]`` of elements whose finest-level ids are ``fine_ids``."""
    return fine_ids.long() // (levels[-1] // levels[level])
