"""Real backends for the storage tests: a moto S3 server and a Range-capable HTTP server
on loopback, plus small attached models."""

from __future__ import annotations

import functools
import http.server
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from storage_helpers import LORA, RangeHandler, trained
from torch import nn


@pytest.fixture
def lora_model() -> nn.Module:
    return trained(LORA)


@pytest.fixture
def memory_url() -> str:
    return f"memory://adapterkit-tests/{uuid.uuid4().hex}"


# --- S3: a real moto server on loopback --------------------------------------------------




@pytest.fixture
def s3(moto_endpoint: str) -> dict[str, Any]:
    """A fresh bucket; ``options`` are the storage options that reach it."""
    import s3fs

    options = {"client_kwargs": {"endpoint_url": moto_endpoint}}
    bucket = f"ak-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(**options).mkdir(bucket)
    return {"bucket": bucket, "options": options, "endpoint": moto_endpoint}


# --- HTTP: a local server that honours Range requests and counts what it sends -----------


@pytest.fixture
def http_root(tmp_path: Any) -> Iterator[tuple[str, str, list[int]]]:
    """(directory served, base URL, list of body byte counts sent)."""
    root = tmp_path / "www"
    root.mkdir()
    sent: list[int] = []
    handler = type("Handler", (RangeHandler,), {"sent": sent})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield str(root), f"http://127.0.0.1:{server.server_port}", sent
    finally:
        server.shutdown()
        server.server_close()

