"""Shared helpers of the workflow tests: a small user model (through the ``module:factory``
path, as users plug their own) and configs on the real bundled data."""

from __future__ import annotations

import os
from typing import Any

import torch
from click.testing import CliRunner
from torch import nn

from adapterkit.cli import cli

HERE = os.path.dirname(os.path.abspath(__file__))


def mlp(hidden: int = 32) -> nn.Module:
    """A small image model over raw 8x8 digits: the body the tests attach LoRA to."""
    torch.manual_seed(1234)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU())


class WithSpare(nn.Module):
    """:func:`mlp` beside a layer its forward never calls: an adapter on ``spare`` gets no gradient."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.net = mlp(hidden)
        self.spare = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # type: ignore[no-any-return]


def mlp_with_spare(hidden: int = 32) -> nn.Module:
    return WithSpare(hidden)


def mlp_config(**sections: dict[str, Any]) -> dict[str, Any]:
    """Digits + the MLP above + MoSA over LoRA: seconds on a CPU, real data."""
    config: dict[str, Any] = {
        "model": {"backbone": "wf_helpers:mlp", "hidden": 32},
        "data": {"dataset": "digits", "train_per_task": 256, "test_per_task": 100},
        "recipe": {
            "seed": 0,
            "adapter": {"kind": "lora", "targets": ["1", "3"], "r": 4, "dropout": 0.0},
            "splitter": {"name": "mosa", "n_cells": 2, "share": "none"},
            "sampler": {"name": "mosa"},
            "merger": {"name": "mosa"},
        },
        "optim": {"lr": 1e-2, "warmup": 2},
        "train": {"steps": 8, "batch_size": 16, "seed": 3},
        "eval": {"every_epoch": False},
    }
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    return config


def toml(config: dict[str, Any]) -> str:
    """A minimal TOML writer for the configs above (tables, scalars, lists)."""
    lines: list[str] = []

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return repr(v)

    def table(prefix: str, data: dict[str, Any]) -> None:
        scalars = {k: v for k, v in data.items() if not isinstance(v, dict)}
        if prefix:
            lines.append(f"[{prefix}]")
        lines.extend(f"{k} = {value(v)}" for k, v in scalars.items())
        for k, v in data.items():
            if isinstance(v, dict):
                table(f"{prefix}.{k}" if prefix else k, v)

    table("", config)
    return "\n".join(lines) + "\n"


def state(classifier: nn.Module) -> dict[str, torch.Tensor]:
    from adapterkit.workflows.models import trainable_state

    return {k: v.detach().clone() for k, v in trainable_state(classifier).items()}  # type: ignore[arg-type]


def ddp_worker(rank: int, world: int, init_file: str, config: dict[str, Any], out_dir: str) -> None:
    """One rank of a gloo process group (file:// rendezvous) training ``config``."""
    import torch.distributed as dist

    from adapterkit import workflows
    from adapterkit.storage import save_tensors

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result = workflows.train(workflows.from_dict(config), progress=False, echo=lambda _: None)
        save_tensors(state(result.classifier), f"{out_dir}/rank{rank}.safetensors")
    finally:
        dist.destroy_process_group()


def cli_fails(runner: CliRunner, args: list[str], *expected: str) -> str:
    """Run the CLI expecting one ``error: ...`` line on stderr (exit 1, no traceback) containing
    every ``expected`` text; returns the line."""
    result = runner.invoke(cli, args)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]
