"""Fixtures of the workflow tests: the helpers on sys.path (the user-model factory is
imported by path, also in spawned processes), a CLI runner, a moto S3 server."""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator

import pytest
from click.testing import CliRunner

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def mem() -> str:
    return f"memory://wf-tests/{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="module")
def s3_bucket() -> Iterator[str]:
    """A bucket on a real moto S3 server on loopback; fsspec reaches it through its config."""
    pytest.importorskip("s3fs")
    import fsspec
    import s3fs
    from moto.server import ThreadedMotoServer

    saved_env = {k: os.environ.get(k) for k in S3_ENV}
    os.environ.update(S3_ENV)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    saved_conf = fsspec.config.conf.get("s3")
    fsspec.config.conf["s3"] = {"client_kwargs": {"endpoint_url": f"http://{host}:{port}"}}
    bucket = f"wf-{uuid.uuid4().hex[:10]}"
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": f"http://{host}:{port}"}).mkdir(bucket)
    try:
        yield f"s3://{bucket}"
    finally:
        server.stop()
        if saved_conf is None:
            fsspec.config.conf.pop("s3", None)
        else:
            fsspec.config.conf["s3"] = saved_conf
        s3fs.S3FileSystem.clear_instance_cache()
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread: these tests run small batches, where a second thread buys
    little and, on a busy 2-core machine, costs up to 30x in thread-pool contention."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
