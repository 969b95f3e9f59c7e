"""``adapterkit library init|add|rm|get|ls|select|rebuild``: local folders and moto S3
with ``-o``, ``--json`` everywhere, one ``error:`` line and exit 1 on bad input."""

from __future__ import annotations

import json
from typing import Any

import pytest
from click.testing import CliRunner, Result
from library_helpers import tiny

import adapterkit
from adapterkit.cli import cli


def run(*args: str) -> str:
    result = CliRunner().invoke(cli, ["library", *args])
    assert result.exit_code == 0, (result.output, result.exception)
    return result.stdout


def fail(*args: str) -> Result:
    result = CliRunner().invoke(cli, ["library", *args])
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    return result


@pytest.fixture
def sources(tmp_path: Any) -> dict[str, str]:
    out = {}
    for i, (name, task) in enumerate([("airline", "sentiment"), ("apple", "sentiment"), ("digits", "vision")]):
        out[name] = f"{tmp_path}/src/{name}.safetensors"
        adapterkit.save(tiny(i), out[name], metadata={"task": task})
    return out


def test_local_round_trip(tmp_path: Any, sources: dict[str, str]) -> None:
    lib = f"{tmp_path}/lib"
    assert json.loads(run("init", lib, "--json")) == {"url": lib}
    assert "library created" in run("init", lib, "--exist-ok")
    fail("init", lib)
    added = json.loads(run("add", lib, sources["airline"], "--tag", "tweets", "--tag", "en", "--base", "mlp", "--json"))
    assert added["name"] == "airline" and added["task"] == "sentiment" and added["tags"] == ["en", "tweets"]
    assert "added apple (lora" in run("add", lib, sources["apple"], "--task", "tech")
    run("add", lib, sources["digits"], "--name", "vision/digits")
    listing = json.loads(run("ls", lib, "--json"))
    assert [(e["name"], e["task"]) for e in listing] == [("airline", "sentiment"), ("apple", "tech"),
                                                          ("vision/digits", "vision")]
    table = run("ls", lib).splitlines()
    assert table[0].split() == ["name", "size", "kind", "method", "task", "tags"]
    assert table[1].split()[0] == "airline" and table[1].split()[-1] == "en,tweets"
    picked = json.loads(run("select", lib, "--task", "sentiment", "--task", "vision", "--json"))
    assert [e["name"] for e in picked] == ["airline", "vision/digits"]
    assert [e["name"] for e in json.loads(run("select", lib, "--tag", "tweets", "--base", "mlp", "--json"))] == [
        "airline"]
    assert [e["name"] for e in json.loads(run("select", lib, "--name", "vision/*", "--kind", "lora", "--json"))] == [
        "vision/digits"]
    assert run("select", lib, "--task", "none").strip() == "no entry matches"
    got = json.loads(run("get", lib, "apple", "--json"))
    assert got["url"] == f"{lib}/apple.safetensors" and got["digest"] == adapterkit.inspect(sources["apple"]).digest
    assert "task      tech" in run("get", lib, "apple")
    assert json.loads(run("rm", lib, "apple", "--json"))[0]["name"] == "apple"
    assert [e["name"] for e in json.loads(run("ls", lib, "--json"))] == ["airline", "vision/digits"]
    fail("rm", lib, "apple")
    fail("get", lib, "nope")
    fail("add", lib, sources["airline"])  # the name is taken
    fail("add", lib, sources["airline"], "--name", "../x")
    fail("ls", f"{tmp_path}/nowhere")
    # behind its back, then rebuild
    adapterkit.save(tiny(7), f"{lib}/late.safetensors", metadata={"task": "late"})
    dry = run("rebuild", lib, "--dry-run")
    assert dry.splitlines()[0] == "would add 1, would update 0, would remove 0, keep 2, skip 0" and "+ late" in dry
    report = json.loads(run("rebuild", lib, "--json"))
    assert report["added"] == ["late"] and report["written"] and not json.loads(run("rebuild", lib, "--json"))["stale"]


def test_s3_with_storage_options(s3: dict[str, Any], sources: dict[str, str]) -> None:
    endpoint = f"client_kwargs.endpoint_url={s3['endpoint']}"
    lib = s3["url"]
    fail("ls", lib, "-o", endpoint)  # not a library yet
    run("init", lib, "-o", endpoint)
    run("add", lib, sources["airline"], "-o", endpoint, "--tag", "tweets")
    copied = f"s3://{s3['bucket']}/elsewhere/apple.safetensors"
    adapterkit.cp(sources["apple"], copied, dst_storage_options=s3["options"])
    run("add", lib, copied, "--storage-option", endpoint, "--src-option", endpoint)
    assert [e["name"] for e in json.loads(run("ls", lib, "-o", endpoint, "--json"))] == ["airline", "apple"]
    assert [e["name"] for e in json.loads(run("select", lib, "-o", endpoint, "--tag", "tweets", "--json"))] == [
        "airline"]
    fail("add", lib, copied, "-o", endpoint)  # the source is on S3 too: it needs --src-option
    fail("ls", lib, "-o", "client_kwargs.endpoint_urll=http://x")  # unknown option: named, one line
    run("rm", lib, "airline", "-o", endpoint)
    assert json.loads(run("rebuild", lib, "-o", endpoint, "--json"))["kept"] == 1


def test_read_only_url(tmp_path: Any, sources: dict[str, str]) -> None:
    import zipfile

    lib = f"{tmp_path}/lib"
    run("init", lib)
    run("add", lib, sources["airline"])
    archive = f"{tmp_path}/lib.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(f"{lib}/adapterkit-library.json", "adapterkit-library.json")
        zf.write(f"{lib}/airline.safetensors", "airline.safetensors")
        zf.write(f"{lib}/.adapterkit-library/log/0000000000/0000000000.json",
                 ".adapterkit-library/log/0000000000/0000000000.json")
    zipped = f"zip://::{archive}"
    assert [e["name"] for e in json.loads(run("ls", zipped, "--json"))] == ["airline"]
    assert "read-only" in fail("add", zipped, sources["apple"]).stderr
    assert "read-only" in fail("rm", zipped, "airline").stderr
    assert json.loads(run("rebuild", zipped, "--dry-run", "--json"))["stale"] is False
