"""``transformers.Trainer`` under ``accelerate`` with 2 CPU processes (gloo), started as
``accelerate launch``/``torchrun`` start them (``RANK``/``WORLD_SIZE``/``MASTER_ADDR``
environment), here with ``torch.multiprocessing.spawn``: with ``trainer_kwargs`` alone,
both ranks end with the same trained adapter for the MHR and the MoSA recipe (MoSA's
cells are drawn from the seeded RNG, the same on every rank), and the folder rank 0
saved reloads to it."""

from __future__ import annotations

import os
import socket
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from hf_helpers import RECIPES, accelerate_worker, minilm

import adapterkit
from adapterkit.integrations.transformers import load_adapter

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_processes_train_the_same_adapter(tmp_path: Any) -> None:
    out = str(tmp_path)
    mp.spawn(accelerate_worker, args=(2, free_port(), out), nprocs=2, join=True)
    for name in sorted(RECIPES):
        rank0 = adapterkit.load_tensors(os.path.join(out, f"{name}-rank0.safetensors"))
        rank1 = adapterkit.load_tensors(os.path.join(out, f"{name}-rank1.safetensors"))
        initial = adapterkit.adapter_state_dict(adapterkit.attach(minilm(), RECIPES[name]))
        assert rank0.keys() == rank1.keys() == initial.keys()
        assert all(torch.equal(rank0[k], rank1[k]) for k in rank0), name
        assert any(not torch.equal(rank0[k], initial[k]) for k in rank0), name  # training moved it
        saved = adapterkit.adapter_state_dict(load_adapter(os.path.join(out, name), minilm()))
        assert all(torch.equal(saved[k], rank0[k]) for k in rank0), name
