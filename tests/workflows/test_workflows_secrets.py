"""No secrets at rest: storage options and credentials given to a run never reach a file.

A real run through the CLI reads its data from a moto S3 bucket with ``[data]
storage_options`` holding an access key and a secret, and writes its checkpoint, adapter
and merged adapter to that bucket with the same key and secret as ``-o`` options; it
stops, resumes (the checkpoint's config fingerprint matches without them) and
finishes. The raw bytes of every file written, and what ``inspect``/``ls`` print, hold
neither, nor the endpoint; the files still rebuild the model (``eval``).
"""

from __future__ import annotations

import json
import os
from typing import Any

import fsspec
import numpy as np
import pytest
from click.testing import CliRunner
from wf_helpers import mlp_config, toml

from adapterkit.cli import cli
from adapterkit.workflows import config as cfg

KEY = "AKIASECRETKEY123"
SECRET = "s3cr3t-value-xyz"


def _invoke(runner: CliRunner, args: list[str]) -> Any:
    result = runner.invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def _digits_jsonl(n: int = 240) -> str:
    from sklearn.datasets import load_digits

    digits = load_digits()
    lines = [
        json.dumps({"image": np.round(digits.images[i] / 16.0, 4).tolist(), "label": str(int(digits.target[i]))})
        for i in range(n)
    ]
    return "\n".join(lines) + "\n"


def test_no_storage_options_or_credentials_in_any_file(runner: CliRunner, tmp_path: Any, s3_bucket: str) -> None:
    import s3fs

    endpoint = fsspec.config.conf["s3"]["client_kwargs"]["endpoint_url"]
    options = {"key": KEY, "secret": SECRET, "client_kwargs": {"endpoint_url": endpoint}}
    run = f"{s3_bucket}/secrets"
    with fsspec.open(f"{run}/digits.jsonl", "w", **options) as f:
        f.write(_digits_jsonl())
    urls = {
        "checkpoint": f"{run}/run.ckpt",
        "adapter": f"{run}/adapter.safetensors",
        "merged": f"{run}/merged.safetensors",
    }
    config = mlp_config(
        data={"dataset": "files", "train": f"{run}/digits.jsonl", "test_fraction": 0.25, "storage_options": options},
        train={"steps": 6, "batch_size": 16, "seed": 3},
        checkpoint={"url": urls["checkpoint"], "every": 3},
        output={"adapter": urls["adapter"], "merged": urls["merged"]},
    )
    del config["data"]["train_per_task"], config["data"]["test_per_task"]
    path = os.path.join(str(tmp_path), "run.toml")
    with open(path, "w") as f:
        f.write(toml(config))
    assert KEY in open(path).read()  # the config itself does hold them
    cli_options = ["-o", f"key={KEY}", "-o", f"secret={SECRET}", "-o", f"client_kwargs.endpoint_url={endpoint}"]

    # only the options reach the moto server: fsspec's S3 endpoint config is removed
    saved_conf = fsspec.config.conf.pop("s3")
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        first = _invoke(runner, ["train", path, "--no-progress", "--stop-at", "3", *cli_options])
        assert "stopped at step 3" in first.output
        resumed = _invoke(runner, ["train", path, "--no-progress", "--resume", *cli_options])
        assert "resumed from" in resumed.output and "saved merged adapter" in resumed.output
        raw = {name: fsspec.open(url, "rb", **options).open().read() for name, url in urls.items()}
        shown = [_invoke(runner, ["inspect", url, *cli_options]).output for url in urls.values()]
        shown += [_invoke(runner, ["inspect", url, "--json", *cli_options]).output for url in urls.values()]
        shown.append(_invoke(runner, ["ls", f"{run}/", "--json", *cli_options]).output)
        shown.append(_invoke(runner, ["ls", f"{run}/", *cli_options]).output)
    finally:
        fsspec.config.conf["s3"] = saved_conf
        s3fs.S3FileSystem.clear_instance_cache()

    for name, data in raw.items():
        assert len(data) > 1000, name
        for secret in (KEY, SECRET, endpoint, "storage_options"):
            assert secret.encode() not in data, (name, secret)
    for text in shown:
        assert KEY not in text and SECRET not in text and endpoint not in text
    assert any("workflow" in text for text in shown)  # inspect did print the run's metadata

    # the stored config still rebuilds the run: eval reads the data with the
    # environment's credentials (here fsspec's config and AWS_* variables); the file names
    # its own model (wf_helpers:mlp) and data URL, so it is rebuilt only when trusted
    rows = json.loads(_invoke(runner, ["eval", urls["adapter"], "--json", "--trust-file"]).output)["rows"]
    assert rows and 0.0 <= rows[-1]["accuracy"] <= 1.0


def test_without_secrets_drops_options_credential_names_and_values() -> None:
    config = {
        "recipe": {"seed": 0, "adapter": {"kind": "lora", "targets": ["1"]}},
        "model": {
            "backbone": "pkg.mod:factory", "hidden": 8, "hf_token": "x", "headers": {"Authorization": "Bearer y"}
        },
        "data": {
            "dataset": "files",
            "train": "simplecache::s3://AKIAIOSFODNN7EXAMPLE:wJalr@bucket/train.jsonl",
            "test": "https://user:pw@host/test.jsonl?X-Amz-Signature=abc&X-Amz-Credential=def&versionId=7",
            "storage_options": {"key": KEY, "secret": SECRET},
            "classes": ["a", "b"],
            "label_column": "label",
            "extra": ["fine", "ghp_" + "a" * 36],
            "awsSecretAccessKey": "z",
        },
        "checkpoint": {"url": "s3://k:s@bucket/ckpt", "every": 5},
        "output": {"adapter": "runs/adapter.safetensors"},
    }
    clean = cfg.without_secrets(config)
    assert clean["recipe"] == config["recipe"]
    assert clean["model"] == {"backbone": "pkg.mod:factory", "hidden": 8, "headers": {}}
    assert clean["data"] == {
        "dataset": "files",
        "train": "simplecache::s3://bucket/train.jsonl",
        "test": "https://host/test.jsonl?versionId=7",
        "classes": ["a", "b"],
        "label_column": "label",
        "extra": ["fine"],
    }
    assert clean["checkpoint"] == {"url": "s3://bucket/ckpt", "every": 5}
    assert clean["output"] == config["output"]


def test_to_dict_is_secret_free_and_overrides_keep_options() -> None:
    data = mlp_config(data={"dataset": "files", "train": "memory://x/train.jsonl", "storage_options": {"key": KEY}})
    config = cfg.from_dict(data)
    assert "storage_options" not in config.to_dict()["data"]
    assert KEY not in json.dumps(config.to_dict())
    assert config.to_dict(include_secrets=True)["data"]["storage_options"] == {"key": KEY}
    # --set overrides rebuild the config in memory: the run still gets its options
    changed = cfg.with_overrides(config, {"train.steps": 2})
    assert changed.data.args["storage_options"] == {"key": KEY} and changed.train.steps == 2


@pytest.mark.parametrize("name", ["key", "secret", "token", "password", "aws_access_key_id", "X-Amz-Security-Token"])
def test_credential_names(name: str) -> None:
    assert cfg.is_secret_name(name)
    assert not cfg.is_secret_name("label_column") and not cfg.is_secret_name("endpoint_url")
