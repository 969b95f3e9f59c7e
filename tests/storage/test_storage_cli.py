"""``adapterkit inspect``, ``ls`` and ``cp`` against local files and the moto S3 server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from click.testing import CliRunner
from storage_helpers import BOTTLENECK, LORA, trained

import adapterkit
from adapterkit.cli import cli
from adapterkit.storage import parse_options


def run(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 0, (result.output, result.exception)
    return result.stdout


def test_inspect_human_and_json(tmp_path: Any) -> None:
    url = f"{tmp_path}/a.safetensors"
    info = adapterkit.save(trained(LORA), url, metadata={"task": "airline"})
    text = run("inspect", url)
    assert "content   adapter (format 3)" in text and "method    lora" in text
    assert "meta      task = airline" in text and "0.projections.A.weight" in text
    data = json.loads(run("inspect", "--json", url))
    assert data["digest"] == info.digest and data["recipe"] == info.recipe.to_dict()  # type: ignore[union-attr]
    assert data["tensors"][0] == {"name": "0.projections.A.weight", "dtype": "F32", "shape": [1, 8, 4], "nbytes": 128}
    assert data["size"] == os.path.getsize(url) and data["metadata"] == {"task": "airline"}


def test_ls_and_cp_through_s3_with_storage_options(tmp_path: Any, s3: dict[str, Any]) -> None:
    endpoint = f"client_kwargs.endpoint_url={s3['endpoint']}"
    lib = f"s3://{s3['bucket']}/skills"
    adapterkit.save(trained(LORA), f"{tmp_path}/lora.safetensors")
    adapterkit.save(trained(BOTTLENECK), f"{tmp_path}/bottleneck.safetensors")
    out = json.loads(run("cp", "--json", f"{tmp_path}/lora.safetensors", f"{lib}/", "--dst-option", endpoint))
    assert out["dst"] == f"{lib}/lora.safetensors"
    run("cp", f"{tmp_path}/bottleneck.safetensors", f"{lib}/nested/b.safetensors", "--dst-option", endpoint)
    listing = json.loads(run("ls", "--json", lib, "-o", endpoint))
    assert [(e["name"], e["kind"], e["method"]) for e in listing] == [
        ("lora.safetensors", "lora", "lora"), ("nested/b.safetensors", "bottleneck", "bottleneck")]
    assert all(e["error"] is None and e["size"] > 0 for e in listing)
    table = run("ls", lib, "--storage-option", endpoint)
    assert table.splitlines()[0].split() == ["name", "size", "kind", "method", "digest"]
    assert "nested/b.safetensors" in table
    text = run("inspect", f"{lib}/lora.safetensors", "-o", endpoint)
    assert "method    lora" in text
    back = f"{tmp_path}/back.safetensors"
    run("cp", f"{lib}/nested/b.safetensors", back, "--src-option", endpoint)
    with open(back, "rb") as a, open(f"{tmp_path}/bottleneck.safetensors", "rb") as b:
        assert a.read() == b.read()


def test_endpoint_from_fsspec_environment(s3: dict[str, Any], tmp_path: Any) -> None:
    """fsspec's own configuration (FSSPEC_S3=json) reaches s3fs with no option given."""
    url = f"s3://{s3['bucket']}/env/a.safetensors"
    adapterkit.save(trained(LORA), url, storage_options=s3["options"])
    env = {**os.environ, "FSSPEC_S3": json.dumps(s3["options"])}
    done = subprocess.run([sys.executable, "-m", "adapterkit", "ls", "--json", f"s3://{s3['bucket']}/env"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert [e["name"] for e in json.loads(done.stdout)] == ["a.safetensors"]


def test_parse_options() -> None:
    got = parse_options(["anon=true", "client_kwargs.endpoint_url=http://h:1", "client_kwargs.verify=false",
                         "block_size=1024", "key=abc=def"])
    assert got == {"anon": True, "client_kwargs": {"endpoint_url": "http://h:1", "verify": False},
                   "block_size": 1024, "key": "abc=def"}
