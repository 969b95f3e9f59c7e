"""Adapter libraries at scale on S3 (a moto server on loopback): requests and wall time.

A library of N small adapters (default 10,000 one-site r=1 LoRAs, ~1 KiB each, each with
its own task/tags metadata) is written under one S3 prefix, then:

- ``ls without manifest``: ``adapterkit.ls(prefix)``: the listing plus one ranged read
  per adapter (what any index-less library costs);
- ``rebuild``: ``Library.rebuild()`` creates the manifest from those headers (the same
  ranged reads, then one record and one compaction);
- ``ls`` / ``select``: ``Library.entries()`` / ``Library.select(task=..., tags=...)`` of
  the whole library from the manifest: a GetObject and a ListObjectsV2, whatever N;
- ``add one``: ``Library.add(model, name)`` into the N-entry library: a 128-byte ranged
  read of the manifest's head, the adapter and the record (create-only), one listing;
- ``ls after add``: the manifest plus the one record written since;
- ``compact``: folding that record into the manifest (reads and rewrites the manifest:
  the one cost that grows with N, paid once every ``COMPACT_EVERY`` changes);
- ``concurrent writers``: W threads, each its own ``Library`` handle, start together at a
  barrier and add P adapters each to a fresh library; every entry must be there at the end.

Requests are counted at the S3 client (botocore's ``before-send`` event on the s3fs client
the library uses: every HTTP request, retries included), per operation.

    python benchmarks/library.py [--n 10000] [--writers 8] [--per-writer 100] [--quick] [--out DIR]

``--quick``: N = 300, 4 writers x 10 (a smoke run, about a minute).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import fsspec
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from common import print_table, start_moto, write_json  # noqa: E402

import adapterkit  # noqa: E402
from adapterkit import Library, library  # noqa: E402

TASKS = 50


@contextlib.contextmanager
def counted(options: dict[str, Any]) -> Iterator[collections.Counter[str]]:
    """S3 requests sent by the s3fs client for ``options`` (fsspec caches one per options)."""
    fs = fsspec.filesystem("s3", **options)
    fs.connect()
    counts: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()

    def count(event_name: str, **_: Any) -> None:
        with lock:
            counts[event_name.rpartition(".")[2]] += 1

    fs.s3.meta.events.register("before-send.s3", count)
    try:
        yield counts
    finally:
        fs.s3.meta.events.unregister("before-send.s3", count)


def tiny_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 4))
    return adapterkit.attach(model, {"adapter": {"kind": "lora", "targets": ["0"], "r": 1}})


def populate(prefix: str, options: dict[str, Any], n: int) -> float:
    """N adapter files with distinct metadata: saved to memory:// (fast), then uploaded with
    one concurrent batch of PUTs (fsspec's pipe)."""
    start = time.perf_counter()
    model = tiny_model(0)
    blobs: dict[str, bytes] = {}
    memfs = fsspec.filesystem("memory")
    for i in range(n):
        tmp = f"memory://bench-library-staging/{i}.safetensors"
        meta = {"task": f"task{i % TASKS}", "tags": f"domain{i % 7},lang{i % 3}"}
        adapterkit.save(model, tmp, metadata=meta)
        blobs[f"{prefix}/adapter{i:05d}.safetensors".removeprefix("s3://")] = memfs.cat_file(tmp)
        memfs.rm_file(tmp)
    fsspec.filesystem("s3", **options).pipe(blobs)
    return time.perf_counter() - start


def timed(options: dict[str, Any], fn: Any) -> tuple[Any, float, collections.Counter[str]]:
    with counted(options) as counts:
        start = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - start
    return out, seconds, counts


def row(operation: str, seconds: float, counts: collections.Counter[str], **extra: Any) -> dict[str, Any]:
    return {"operation": operation, "requests": sum(counts.values()), "seconds": seconds,
            "by_operation": dict(sorted(counts.items())), **extra}


def concurrent_writers(options: dict[str, Any], writers: int, per_writer: int) -> dict[str, Any]:
    url = f"s3://bench/concurrent-{uuid.uuid4().hex[:8]}"
    Library.init(url, storage_options=options)
    models = [tiny_model(k) for k in range(writers)]
    barrier = threading.Barrier(writers)
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            lib = Library(url, storage_options=options)
            barrier.wait()
            for i in range(per_writer):
                lib.add(models[k], f"w{k}/{i:03d}", task=f"task{k}")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(writers)]
    with counted(options) as counts:
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        seconds = time.perf_counter() - start
    if errors:
        raise errors[0]
    entries = Library(url, storage_options=options).entries()
    expected = {f"w{k}/{i:03d}" for k in range(writers) for i in range(per_writer)}
    found = {e.name for e in entries}
    return {"writers": writers, "per_writer": per_writer, "entries": len(entries), "expected": len(expected),
            "all_present": found == expected, "seconds": seconds, "adds_per_second": len(expected) / seconds,
            "requests": sum(counts.values()), "requests_per_add": sum(counts.values()) / len(expected),
            "by_operation": dict(sorted(counts.items()))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10_000, help="adapters in the library")
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--per-writer", type=int, default=100)
    parser.add_argument("--quick", action="store_true", help="N=300, 4 writers x 10 (smoke run)")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args()
    if args.quick:
        args.n, args.writers, args.per_writer = 300, 4, 10
    torch.set_num_threads(1)
    server, options = start_moto()
    rows: list[dict[str, Any]] = []
    try:
        prefix = f"s3://bench/lib-{uuid.uuid4().hex[:8]}"
        populate_s = populate(prefix, options, args.n)
        print(f"{args.n} adapters written under {prefix} in {populate_s:.1f} s")
        lib = Library(prefix, storage_options=options)

        listing, seconds, counts = timed(options, lambda: adapterkit.ls(prefix, storage_options=options))
        assert len(listing) == args.n and all(e.info is not None for e in listing)
        rows.append(row("ls without manifest (adapterkit.ls)", seconds, counts, entries=len(listing)))

        report, seconds, counts = timed(options, lib.rebuild)
        assert len(report.added) == args.n
        rows.append(row("rebuild (manifest from headers)", seconds, counts, entries=len(report.added)))

        entries, seconds, counts = timed(options, lib.entries)
        assert len(entries) == args.n
        rows.append(row("ls (Library.entries)", seconds, counts, entries=len(entries)))

        picked, seconds, counts = timed(options, lambda: lib.select(task="task7", tags=["domain0"]))
        want = sum(1 for i in range(args.n) if i % TASKS == 7 and i % 7 == 0)
        assert len(picked) == want
        rows.append(row("select (task + tag)", seconds, counts, entries=len(picked)))

        model = tiny_model(99)
        entry, seconds, counts = timed(options, lambda: lib.add(model, "one-more", task="new"))
        rows.append(row("add one (to the N-entry library)", seconds, counts, entries=1))

        entries, seconds, counts = timed(options, lib.entries)
        assert len(entries) == args.n + 1
        rows.append(row("ls after add (1 record)", seconds, counts, entries=len(entries)))

        generation, seconds, counts = timed(options, lib.compact)
        rows.append(row("compact (fold 1 record)", seconds, counts, entries=args.n + 1))
        manifest_bytes = fsspec.filesystem("s3", **options).size(f"{prefix}/{library.MANIFEST}")

        concurrent = concurrent_writers(options, args.writers, args.per_writer)
    finally:
        server.stop()
    for r in rows:
        r["by_operation"] = ", ".join(f"{k} {v}" for k, v in r["by_operation"].items())
    print_table(f"Library of {args.n:,} adapters on S3 (moto): requests and wall time", rows,
                ["operation", "entries", "requests", "seconds", "by_operation"])
    print(f"\nmanifest: {manifest_bytes:,} bytes ({manifest_bytes / (args.n + 1):.0f} per entry)")
    print(f"concurrent writers: {concurrent['writers']} x {concurrent['per_writer']} adds -> "
          f"{concurrent['entries']} entries (all present: {concurrent['all_present']}), "
          f"{concurrent['seconds']:.1f} s, {concurrent['requests']:,} requests "
          f"({concurrent['requests_per_add']:.1f} per add: {concurrent['by_operation']})")
    payload = {"study": "library", "mode": "quick" if args.quick else "full", "args": vars(args),
               "populate_seconds": populate_s, "manifest_bytes": manifest_bytes,
               "compact_every": library.COMPACT_EVERY, "rows": rows, "concurrent": concurrent,
               "definitions": __doc__}
    path = write_json("library", payload, args.out)
    print(f"\nwrote {path}")
    if not concurrent["all_present"]:
        sys.exit("concurrent writers lost entries")


if __name__ == "__main__":
    main()
