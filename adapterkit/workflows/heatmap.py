"""Routing heatmaps: which skills each task uses, per head (matplotlib: ``adapterkit[plot]``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ..attach import match_target, sites
from ..errors import AdapterkitError
from ..objectives import device_of
from ..zoo import WorkflowModel


@torch.no_grad()
def routing_table(classifier: WorkflowModel, n_tasks: int, site: str | None = None) -> Tensor:
    """Eval-mode skill weights ``(tasks, heads, skills)``, averaged over routed sites
    (or over the sites matching the pattern ``site``)."""
    tables = []
    for name, s in sites(classifier.body).items():
        if not s.router.needs_task_ids or (site is not None and not match_target(name, site)):
            continue
        router = s.router
        training = router.training
        router.eval()
        weights = router(torch.arange(n_tasks, device=device_of(classifier)))
        router.train(training)
        if weights is not None:
            tables.append(weights.float().cpu())
    if not tables:
        where = f" matching {site!r}" if site else ""
        raise AdapterkitError(f"no routed site{where}: the adapter has no task x skill routing to plot")
    return torch.stack(tables).mean(0)


def plot(
    table: Tensor,
    tasks: Sequence[str],
    url: str,
    title: str = "",
    storage_options: Mapping[str, Any] | None = None,
) -> None:
    """Write a PNG (any fsspec URL): one task x skill panel per head."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise AdapterkitError("the heatmap needs matplotlib: pip install 'adapterkit[plot]'") from None
    import io

    import fsspec

    n_tasks, heads, skills = table.shape
    cols = min(heads, 4)
    rows = (heads + cols - 1) // cols
    fig, axes = plt.subplots(
        rows, cols, figsize=(1.2 + 0.5 * skills * cols + 1.5, 0.8 + 0.45 * n_tasks * rows), squeeze=False
    )
    for h in range(rows * cols):
        ax = axes[h // cols][h % cols]
        if h >= heads:
            ax.axis("off")
            continue
        image = ax.imshow(table[:, h].numpy(), vmin=0.0, vmax=float(table.max()), cmap="viridis", aspect="auto")
        ax.set_xticks(range(skills), [str(k) for k in range(skills)])
        ax.set_yticks(range(n_tasks), list(tasks) if h % cols == 0 else [""] * n_tasks)
        ax.set_xlabel("skill")
        if heads > 1:
            ax.set_title(f"head {h}", fontsize=9)
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="routing weight")
    if title:
        fig.suptitle(title, fontsize=10, y=1.0 + 0.08 / rows)  # above the head titles
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    with fsspec.open(url, "wb", **(storage_options or {})) as f:
        f.write(buffer.getvalue())
