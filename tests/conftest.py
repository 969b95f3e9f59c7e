"""Shared fixtures for every test area (keep this small; areas have their own conftest)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

# Real models ship inside packages: never reach for the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def restore_host() -> Iterator[None]:
    """Put the process-wide plugin host back after a test that replaces it (``set_host``)."""
    from adapterkit import plugins

    saved = plugins._host
    yield
    plugins.set_host(saved)
