"""Storage throughput: ``adapterkit.save``/``load`` versus a raw fsspec write/read of the
same bytes, on ``memory://``, local files and S3 (a moto server on loopback).

What each variant does:

- ``save``: ``adapterkit.save(model, url)``: serialise, digest every tensor (XXH3-128),
  write atomically.
- ``raw write``: ``with fsspec.open(url, "wb") as f: f.write(blob)`` of the very bytes
  ``save`` produces (already in memory: no serialising, no hashing, no atomic rename).
- ``load``: ``adapterkit.load(url, model)``: read, check header and every digest, copy the
  tensors into the attached model.
- ``load_tensors``: ``adapterkit.load_tensors(url)``: read and verify, tensors aliasing the read buffer.
- ``load_tensors unverified``: the same with ``verify=False`` (header still checked, no
  digest of the data): shows how much of the gap is the digest.
- ``raw read``: ``with fsspec.open(url, "rb") as f: f.read()``. (On ``memory://`` this
  returns the stored bytes object itself, without a copy: no reader can match it.)
- ``digest``: hashing the tensor data alone, as save and load do, against the raw read:
  where raw I/O runs at memcpy speed, this alone bounds the ratio. (Format 1 used sha256,
  ~1.7 GB/s here, which held local loads to 0.04-0.37x; XXH3-128 runs at ~20 GB/s.)

Ratio = raw time / adapterkit time (1.0: as fast as raw fsspec; target >= 0.8). Variants
are interleaved; medians of several rounds after warm-up.

    python benchmarks/storage.py [--sizes 8,64] [--rounds 9] [--s3-rounds 5] [--quick] [--out DIR]

``--quick`` is a smoke run (one 8 MiB adapter, 3 rounds everywhere; ratios are noisy).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import uuid
from typing import Any

import fsspec
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from common import interleaved, median, print_table, start_moto, write_json  # noqa: E402

import adapterkit  # noqa: E402
from adapterkit.storage.tensors import hash_all  # noqa: E402


def adapter_model(megabytes: int) -> nn.Module:
    """16 LoRA sites on 1024x1024 linears; the rank sets the adapter size (r=64: 8 MiB)."""
    rank = max(1, megabytes * 8)
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(16)])
    adapterkit.attach(model, {"adapter": {"kind": "lora", "targets": [r"re:\d+"], "r": rank}})
    with torch.no_grad():
        for tensor in adapterkit.adapter_state_dict(model).values():
            tensor.normal_()
    return model


def measure(backend: str, base: str, options: dict[str, Any], model: nn.Module, rounds: int) -> list[dict[str, Any]]:
    url, raw_url = f"{base}/adapter.safetensors", f"{base}/raw.safetensors"
    info = adapterkit.save(model, url, storage_options=options)
    with fsspec.open(url, "rb", **options) as file:
        blob = file.read()
    assert len(blob) == info.size

    def raw_write() -> None:
        with fsspec.open(raw_url, "wb", **options) as file:
            file.write(blob)

    def raw_read() -> bytes:
        with fsspec.open(url, "rb", **options) as file:
            return file.read()  # type: ignore[no-any-return]

    views = [memoryview(blob)[info.header_size + t.offsets[0] : info.header_size + t.offsets[1]]
             for t in info.tensors]
    times = interleaved(
        {
            "digest (what verifying costs)": lambda: hash_all(views),
            "save": lambda: adapterkit.save(model, url, storage_options=options),
            "raw write": raw_write,
            "load": lambda: adapterkit.load(url, model, storage_options=options),
            "load_tensors": lambda: adapterkit.load_tensors(url, storage_options=options),
            "load_tensors unverified": lambda: adapterkit.load_tensors(url, storage_options=options, verify=False),
            "raw read": raw_read,
        },
        rounds=rounds,
        warmup=2,
    )
    mb = info.size / 1e6
    rows = []
    pairs = [("save", "raw write"), ("load", "raw read"), ("load_tensors", "raw read"),
             ("load_tensors unverified", "raw read"), ("digest (what verifying costs)", "raw read")]
    for op, raw in pairs:
        ours_s, raw_s = median(times[op]), median(times[raw])
        rows.append({
            "backend": backend, "size_MB": round(mb, 1), "op": op, "ours_s": ours_s, "raw_s": raw_s,
            "ours_MBps": mb / ours_s, "raw_MBps": mb / raw_s, "ratio": raw_s / ours_s, "rounds": rounds,
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="8,64", help="adapter sizes in MiB, comma separated")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--s3-rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="one 8 MiB adapter, 3 rounds (smoke test)")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.rounds, args.s3_rounds = "8", 3, 3
    server, s3_options = start_moto()
    rows: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for size in (int(s) for s in args.sizes.split(",")):
                model = adapter_model(size)
                tag = uuid.uuid4().hex[:8]
                rows += measure("memory", f"memory://bench-{tag}", {}, model, args.rounds)
                rows += measure("local", f"{tmp}/{tag}", {}, model, args.rounds)
                rows += measure("s3 (moto)", f"s3://bench/{tag}", s3_options, model, args.s3_rounds)
    finally:
        server.stop()
    columns = ["backend", "size_MB", "op", "ours_s", "raw_s", "ours_MBps", "raw_MBps", "ratio"]
    print_table("adapterkit storage vs raw fsspec (ratio = raw time / adapterkit time; target >= 0.8)", rows, columns)
    path = write_json("storage", {"args": vars(args), "rows": rows, "definitions": __doc__}, args.out)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
