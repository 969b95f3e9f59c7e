"""``inspect`` and ``ls`` read the header only: counted through an fsspec filesystem that
tallies every byte its files return, and on the wire from a local HTTP server."""

from __future__ import annotations

import os
from typing import Any

import fsspec
import pytest
import torch
from fsspec.implementations.local import LocalFileSystem
from torch import nn

import adapterkit

PROBE = 64 * 1024


class CountingReader:
    """A file object that counts the bytes its reads return."""

    def __init__(self, file: Any, counter: list[int]) -> None:
        self._file, self._counter = file, counter

    def read(self, size: int = -1) -> bytes:
        data = self._file.read(size)
        self._counter.append(len(data))
        return data

    def readinto(self, buffer: Any) -> int:
        got = self._file.readinto(buffer)
        self._counter.append(got or 0)
        return got  # type: ignore[no-any-return]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)

    def __enter__(self) -> CountingReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._file.close()


class CountingFileSystem(LocalFileSystem):
    """Local files under ``countingfile://`` with every byte read tallied in ``reads``."""

    protocol = ("countingfile",)
    reads: list[int] = []

    @classmethod
    def _strip_protocol(cls, path: Any) -> str:
        path = str(path)
        if path.startswith("countingfile://"):
            path = path[len("countingfile://"):]
        return super()._strip_protocol(path)  # type: ignore[no-any-return]

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        file = super()._open(path, mode, **kwargs)
        return CountingReader(file, self.reads) if "r" in mode else file


@pytest.fixture(scope="module", autouse=True)
def counting_protocol() -> None:
    fsspec.register_implementation("countingfile", CountingFileSystem, clobber=True)


@pytest.fixture(scope="module")
def big_adapter(tmp_path_factory: Any) -> str:
    """A >= 50 MB LoRA adapter: 13 sites of rank 512 on 1024x1024 linears (54.5 MB)."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(13)])
    adapterkit.attach(model, {"adapter": {"kind": "lora", "targets": [r"re:\d+"], "r": 512}})
    path = f"{tmp_path_factory.mktemp('big')}/big.safetensors"
    adapterkit.save(model, path)
    assert os.path.getsize(path) >= 50_000_000
    return path


def test_inspect_reads_header_plus_at_most_64k(big_adapter: str) -> None:
    CountingFileSystem.reads.clear()
    info = adapterkit.inspect(f"countingfile://{big_adapter}")
    read = sum(CountingFileSystem.reads)
    assert info.size == os.path.getsize(big_adapter) and len(info.tensors) == 26
    assert info.header_size <= read <= info.header_size + PROBE, (read, info.header_size)
    assert read < info.size / 500


def test_ls_reads_headers_only(big_adapter: str) -> None:
    folder = os.path.dirname(big_adapter)
    CountingFileSystem.reads.clear()
    entries = adapterkit.ls(f"countingfile://{folder}")
    assert [e.name for e in entries] == ["big.safetensors"] and entries[0].info is not None
    assert sum(CountingFileSystem.reads) <= entries[0].info.header_size + PROBE


def test_header_larger_than_the_probe(tmp_path: Any) -> None:
    """A header over 64 KiB costs one more ranged read of exactly the rest of it."""
    tensors = {f"routing.task_{i:05d}": torch.zeros(4) for i in range(2500)}
    path = f"{tmp_path}/many.safetensors"
    adapterkit.save_tensors(tensors, path)
    CountingFileSystem.reads.clear()
    info = adapterkit.inspect(f"countingfile://{path}")
    assert info.header_size > 2 * PROBE and len(info.tensors) == 2500
    assert sum(CountingFileSystem.reads) == info.header_size


def test_inspect_over_http_sends_header_only(big_adapter: str, http_root: tuple[str, str, list[int]]) -> None:
    root, base, sent = http_root
    os.link(big_adapter, f"{root}/big.safetensors")
    sent.clear()
    info = adapterkit.inspect(f"{base}/big.safetensors")
    assert info.header_size <= sum(sent) <= info.header_size + PROBE, (sum(sent), info.header_size)
