"""Shared fixtures for every test area (keep this small; areas have their own conftest)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

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


# --- S3: one real moto server on loopback for the session ------------------------------

S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """The endpoint URL of a moto S3 server on 127.0.0.1 (test credentials in the
    environment meanwhile); each test makes its own bucket."""
    pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer

    saved = {k: os.environ.get(k) for k in S3_ENV}
    os.environ.update(S3_ENV)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="session")
def t5_base() -> Any:
    """A small random T5 (``testlib.T5_VOCAB`` tokens), built once (Poly/MHR and PEFT tests)."""
    import torch
    from testlib import T5_VOCAB
    from transformers import T5Config, T5Model

    torch.manual_seed(0)
    config = T5Config(vocab_size=T5_VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
                      num_heads=4, dropout_rate=0.0)
    return T5Model(config).eval()
