"""Atomic writes: a writer killed mid-save leaves the previous adapter intact, and readers
racing a writer see one whole version or the other, never a mix."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any

import fsspec
import pytest
import torch
from storage_helpers import LORA, assert_same_adapter, base_model, trained

import adapterkit

# A child that builds a large adapter (16 LoRA sites of rank 2048 on 1024x1024: 256 MiB)
# filled with ones (so any zero byte in its data was never written) and saves it to
# argv[1]; argv[2] is an optional S3 endpoint.
BIG_SAVER = textwrap.dedent("""
    import sys, torch, adapterkit
    from torch import nn
    url = sys.argv[1]
    options = {"client_kwargs": {"endpoint_url": sys.argv[2]}} if len(sys.argv) > 2 else None
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(16)])
    adapterkit.attach(model, {"adapter": {"kind": "lora", "targets": ["re:\\\\d+"], "r": 2048}})
    with torch.no_grad():
        for tensor in adapterkit.adapter_state_dict(model).values():
            tensor.fill_(1.0)
    print("saving", flush=True)
    adapterkit.save(model, url, storage_options=options)
    print("saved", flush=True)
""")


def start_saver(*args: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", BIG_SAVER, *args], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "saving"
    return proc


def kill(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def test_sigkill_mid_write_keeps_previous_local_adapter(tmp_path: Any) -> None:
    folder = f"{tmp_path}/lib"
    url = f"{folder}/adapter.safetensors"
    previous = trained(LORA)
    adapterkit.save(previous, url)
    with open(url, "rb") as file:
        before = file.read()
    proc = start_saver(url)
    partial = None
    deadline = time.monotonic() + 60
    while partial is None and time.monotonic() < deadline:
        for name in os.listdir(folder):
            if name.startswith(".adapter.safetensors.tmp-") and os.path.getsize(f"{folder}/{name}") > 0:
                partial = name
        if proc.poll() is not None:
            break
    assert partial is not None, "the child never started writing"
    kill(proc)
    with open(f"{folder}/{partial}", "rb") as file:
        file.seek(-4096, os.SEEK_END)  # blocks may be reserved up front: an unwritten tail reads as zeros
        short = os.path.getsize(f"{folder}/{partial}") < 256 * 2**20
        assert short or file.read() == bytes(4096), "killed mid-write: a partial temp file"
    with open(url, "rb") as file:
        assert file.read() == before  # the final name still holds the previous adapter, whole
    fresh = base_model()
    adapterkit.load(url, fresh)  # ... and it loads and verifies
    assert_same_adapter(previous, fresh)
    assert [e.name for e in adapterkit.ls(folder)] == ["adapter.safetensors"]  # the partial file is hidden
    adapterkit.save(previous, url)  # the next save cleans up the dead writer's temp file
    assert os.listdir(folder) == ["adapter.safetensors"]


def test_sigkill_mid_upload_keeps_previous_s3_adapter(s3: dict[str, Any]) -> None:
    import boto3

    key = "lib/adapter.safetensors"
    url = f"s3://{s3['bucket']}/{key}"
    previous = trained(LORA)
    adapterkit.save(previous, url, storage_options=s3["options"])
    client = boto3.client("s3", endpoint_url=s3["endpoint"])
    before = client.get_object(Bucket=s3["bucket"], Key=key)["Body"].read()
    proc = start_saver(url, s3["endpoint"])
    deadline, uploading = time.monotonic() + 90, False
    while not uploading and proc.poll() is None and time.monotonic() < deadline:
        uploading = bool(client.list_multipart_uploads(Bucket=s3["bucket"]).get("Uploads"))
        time.sleep(0.02)
    assert uploading, "the child never started its multipart upload"
    kill(proc)
    assert client.get_object(Bucket=s3["bucket"], Key=key)["Body"].read() == before
    fresh = base_model()
    adapterkit.load(url, fresh, storage_options=s3["options"])
    assert_same_adapter(previous, fresh)
    # the killed upload is left behind (invisible, but its parts are stored) until the next save to that key
    assert [u["Key"] for u in client.list_multipart_uploads(Bucket=s3["bucket"]).get("Uploads", [])] == [key]
    adapterkit.save(previous, url, storage_options=s3["options"])
    assert not client.list_multipart_uploads(Bucket=s3["bucket"]).get("Uploads")


def versions() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    one = {f"skill_{i}": torch.randn(512, 512, generator=gen) for i in range(8)}  # 8 MiB
    two = {k: v + 1.0 for k, v in one.items()}
    return one, two


# moto (5.x) closes an overwritten object's buffer at once, so a GET in flight can fail
# server side ("ValueError: read of closed file"), which botocore reports as a checksum
# mismatch of an empty body. Real S3 serves the old object whole. Such reads fail loudly;
# what must never happen is a read that succeeds with a mix of versions.
MOTO_RACE = "did not match calculated checksum: AAAAAA=="


@pytest.mark.parametrize("backend", ["local", "memory", "s3"])
def test_readers_see_whole_versions(backend: str, tmp_path: Any, request: Any) -> None:
    options: dict[str, Any] | None = None
    if backend == "local":
        url = f"{tmp_path}/race.safetensors"
    elif backend == "memory":
        url = f"{request.getfixturevalue('memory_url')}/race.safetensors"
    else:
        s3 = request.getfixturevalue("s3")
        url, options = f"s3://{s3['bucket']}/race.safetensors", s3["options"]
    one, two = versions()
    adapterkit.save_tensors(one, url, storage_options=options)
    done, seen, errors, moto_failures = threading.Event(), {"one": 0, "two": 0}, [], []

    def reader() -> None:
        while not done.is_set():
            try:
                got = adapterkit.load_tensors(url, storage_options=options)
            except Exception as exc:  # any error is a failure of atomicity ...
                if backend == "s3" and MOTO_RACE in str(exc):
                    moto_failures.append(exc)  # ... except moto's own (see MOTO_RACE)
                    continue
                errors.append(exc)
                return
            which = "one" if torch.equal(got["skill_0"], one["skill_0"]) else "two"
            expected = one if which == "one" else two
            assert all(torch.equal(got[k], expected[k]) for k in expected)
            seen[which] += 1

    def enough() -> bool:  # reads that overlapped the writes (more than moto's failed ones)
        total = seen["one"] + seen["two"]
        return total >= 2 and total > len(moto_failures)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        # 12 writes at least, then on until the reader has read enough: however busy the
        # machine, the test waits for the reader instead of depending on its scheduling
        writes = 0
        while (writes < 12 or not enough()) and not errors and writes < 5000:
            adapterkit.save_tensors(two if writes % 2 == 0 else one, url, storage_options=options)
            writes += 1
    finally:
        done.set()
        thread.join()
    assert not errors, errors[0]
    assert enough(), (seen, len(moto_failures))
    with fsspec.open(url, "rb", **(options or {})) as file:
        assert len(file.read()) == adapterkit.inspect(url, storage_options=options).size
