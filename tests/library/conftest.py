"""Backends for the library tests: memory://, local folders, a real moto S3 server and a
Range-capable HTTP server on loopback (which records the paths it serves)."""

from __future__ import annotations

import functools
import http.server
import os
import sys
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "storage"))
from storage_helpers import RangeHandler  # noqa: E402


@pytest.fixture
def memory_url() -> str:
    return f"memory://adapterkit-library-tests/{uuid.uuid4().hex}/lib"



@pytest.fixture
def s3(moto_endpoint: str) -> dict[str, Any]:
    """A fresh bucket: ``url`` of a library prefix in it, ``options`` that reach it."""
    import s3fs

    options = {"client_kwargs": {"endpoint_url": moto_endpoint}}
    bucket = f"lib-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(**options).mkdir(bucket)
    return {"bucket": bucket, "options": options, "endpoint": moto_endpoint, "url": f"s3://{bucket}/lib"}


@pytest.fixture(params=["memory", "local", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Any) -> tuple[str, dict[str, Any]]:
    """(library URL, storage options) on each writable backend."""
    if request.param == "memory":
        return f"memory://adapterkit-library-tests/{uuid.uuid4().hex}/lib", {}
    if request.param == "local":
        return str(tmp_path / "lib"), {}
    s3 = request.getfixturevalue("s3")
    return s3["url"], s3["options"]


@pytest.fixture
def http_root(tmp_path: Any) -> Iterator[tuple[str, str, list[str]]]:
    """(directory served, base URL, paths requested)."""
    root = tmp_path / "www"
    root.mkdir()
    paths: list[str] = []

    class Recording(RangeHandler):
        sent: list[int] = []

        def do_GET(self) -> None:  # noqa: N802
            paths.append(self.path)
            super().do_GET()

        def do_HEAD(self) -> None:  # noqa: N802
            paths.append(self.path)
            super().do_HEAD()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Recording, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield str(root), f"http://127.0.0.1:{server.server_port}", paths
    finally:
        server.shutdown()
        server.server_close()
