"""Fixtures of the workflow tests: the helpers on sys.path (the user-model factory is
imported by path, also in spawned processes), a CLI runner, a bucket on the moto S3 server."""

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



@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def mem() -> str:
    return f"memory://wf-tests/{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="module")
def s3_bucket(moto_endpoint: str) -> Iterator[str]:
    """A bucket on the session's moto S3 server; fsspec reaches it through its config."""
    import fsspec
    import s3fs

    saved_conf = fsspec.config.conf.get("s3")
    fsspec.config.conf["s3"] = {"client_kwargs": {"endpoint_url": moto_endpoint}}
    bucket = f"wf-{uuid.uuid4().hex[:10]}"
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": moto_endpoint}).mkdir(bucket)
    try:
        yield f"s3://{bucket}"
    finally:
        if saved_conf is None:
            fsspec.config.conf.pop("s3", None)
        else:
            fsspec.config.conf["s3"] = saved_conf
        s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="session")
def lm_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Hugging Face model folders of a tiny Llama, GPT-2 and T5 with a word-level tokenizer
    (built once: see lm_helpers)."""
    from lm_helpers import gpt2, llama, t5, tokenizer

    root = tmp_path_factory.mktemp("lm")
    tok = tokenizer()
    return {"llama": llama(str(root / "llama"), tok), "gpt2": gpt2(str(root / "gpt2"), tok),
            "t5": t5(str(root / "t5"), tok)}


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread: these tests run small batches, where a second thread buys
    little and, on a busy 2-core machine, costs up to 30x in thread-pool contention."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
