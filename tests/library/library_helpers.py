"""Small attached models and the worker of the multi-process test."""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

import adapterkit

RECIPE = {"adapter": {"kind": "lora", "targets": ["0", "2"], "r": 2}, "seed": 1}


def base_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def tiny(seed: int = 1, recipe: dict[str, Any] | None = None) -> nn.Module:
    """An attached model with random adapter values (distinct per seed, so distinct digests)."""
    model = adapterkit.attach(base_model(), recipe or RECIPE)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in adapterkit.adapter_state_dict(model).values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=gen))
    return model


def add_in_process(url: str, worker: int, count: int, compact_every: int, barrier: Any) -> list[str]:
    """A writer process: wait for every writer at the barrier, then add ``count`` entries."""
    from adapterkit import library

    library.COMPACT_EVERY = compact_every
    torch.set_num_threads(1)
    lib = library.Library(url)
    model = tiny(seed=worker)
    barrier.wait()
    names = [f"p{worker}-{i}" for i in range(count)]
    for name in names:
        lib.add(model, name, task=f"task{worker}")
    return names


@contextlib.contextmanager
def s3_requests(options: dict[str, Any]) -> Iterator[collections.Counter[str]]:
    """Count the S3 requests (by operation) that the s3fs client for ``options`` sends."""
    import s3fs

    fs = s3fs.S3FileSystem(**options)  # fsspec's instance cache: the library's own client
    fs.connect()
    counts: collections.Counter[str] = collections.Counter()

    def count(event_name: str, **_: Any) -> None:
        counts[event_name.rpartition(".")[2]] += 1

    fs.s3.meta.events.register("before-send.s3", count)
    try:
        yield counts
    finally:
        fs.s3.meta.events.unregister("before-send.s3", count)
