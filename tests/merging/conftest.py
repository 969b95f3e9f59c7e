"""Fixtures of the merging tests: a private memory:// folder per test."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import fsspec
import pytest


@pytest.fixture
def lib() -> Iterator[str]:
    """A fresh memory:// folder, removed afterwards."""
    prefix = f"memory://merging-{uuid.uuid4().hex[:8]}"
    yield prefix
    fs = fsspec.filesystem("memory")
    if fs.exists(prefix):
        fs.rm(prefix, recursive=True)
