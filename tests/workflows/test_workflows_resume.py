"""Checkpoint/resume: a run stopped at step k and resumed ends bit-identical to an
uninterrupted run (adapter, head and optimizer state), on real data with MoSA (random
cell draws), LoRA dropout (per-example noise) and the consistency regulariser."""

from __future__ import annotations

import pytest
import torch
from wf_helpers import mlp_config, state

from adapterkit import workflows
from adapterkit.errors import AdapterkitError
from adapterkit.storage import inspect


def _config(url: str, **train: object) -> workflows.WorkflowConfig:
    cfg = mlp_config(
        train={"steps": 10, "batch_size": 16, "loss": {"name": "consistency", "weight": 1.0}, **train},
        checkpoint={"url": url, "every": 4},
    )
    cfg["recipe"]["adapter"]["dropout"] = 0.1
    return workflows.from_dict(cfg)


def test_stopped_and_resumed_run_is_bit_identical(mem: str) -> None:
    quiet = {"progress": False, "echo": lambda _: None}
    full = workflows.train(_config(f"{mem}/a.ckpt"), **quiet)
    assert full.steps == 10 and not full.stopped

    first = workflows.train(_config(f"{mem}/b.ckpt"), stop_at=3, **quiet)
    assert first.stopped and first.steps == 3
    assert first.results == {}  # nothing saved or evaluated before the end
    resumed = workflows.train(_config(f"{mem}/b.ckpt"), resume=True, **quiet)
    assert resumed.steps == 10

    expected, got = state(full.classifier), state(resumed.classifier)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    # and training really moved the adapters (the comparison is not between two inits)
    assert not torch.equal(state(first.classifier)["head.weight"], expected["head.weight"])
    assert full.results["trained"][-1].to_dict() == resumed.results["trained"][-1].to_dict()


def test_checkpoints_written_every_n_steps(mem: str) -> None:
    url = f"{mem}/c.ckpt"
    workflows.train(_config(url, steps=5), stop_at=4, progress=False, echo=lambda _: None)
    meta = inspect(url).metadata["checkpoint"]
    assert '"step": 4' in meta
    tensors = inspect(url).tensors
    names = {t.name for t in tensors}
    assert any(n.startswith("optim.") and n.endswith("exp_avg") for n in names)
    assert "model.head.weight" in names


def test_resume_refuses_a_different_config(mem: str) -> None:
    url = f"{mem}/d.ckpt"
    workflows.train(_config(url), stop_at=2, progress=False, echo=lambda _: None)
    other = workflows.with_overrides(_config(url), {"optim.lr": 0.5})
    with pytest.raises(AdapterkitError, match="different \\[optim\\] config"):
        workflows.train(other, resume=True, progress=False, echo=lambda _: None)
