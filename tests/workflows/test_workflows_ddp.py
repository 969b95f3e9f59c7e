"""Data-parallel training on 2 gloo processes (torch.multiprocessing.spawn, file://
rendezvous): both ranks end with identical adapters, and they match single-process
training on the same global batches.

The recipe draws random MoSA cells at every forward (twice per step: the consistency
regulariser's second pass), so the match also shows that every rank draws the cells a
single process draws. Tolerance: DDP averages two half-batch gradients where one
process sums one full batch, so results agree to float32 rounding (measured here
~4e-7 after 8 AdamW steps, while training moves weights by ~5e-2); we assert max |diff| <= 1e-5."""

from __future__ import annotations

import os

import torch
import torch.multiprocessing as mp
from wf_helpers import ddp_worker, mlp_config, state

from adapterkit import workflows
from adapterkit.storage import load_tensors

TOLERANCE = 1e-5


def test_two_gloo_ranks_match_each_other_and_one_process(tmp_path: os.PathLike[str]) -> None:
    config = mlp_config(train={"steps": 8, "batch_size": 32, "consistency": 1.0})
    out = str(tmp_path)
    mp.spawn(ddp_worker, args=(2, os.path.join(out, "rendezvous"), config, out), nprocs=2, join=True)
    rank0 = load_tensors(os.path.join(out, "rank0.safetensors"))
    rank1 = load_tensors(os.path.join(out, "rank1.safetensors"))
    assert rank0.keys() == rank1.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name

    single = state(workflows.train(workflows.from_dict(config), progress=False, echo=lambda _: None).classifier)
    initial = state(workflows.run.prepare(workflows.from_dict(config))[2])
    worst = max(float((rank0[n] - single[n]).abs().max()) for n in single)
    moved = max(float((initial[n] - single[n]).abs().max()) for n in single)
    print(f"DDP vs single max|diff| {worst:.3g}, moved {moved:.3g}")
    assert worst <= TOLERANCE, worst
    assert moved > 100 * TOLERANCE  # training moved the weights far more than the DDP/single gap
