"""The newcomer walkthrough (docs/walkthrough.md) is true: its ``bash`` blocks run, in
order, as one shell script of real CLI subprocesses: train on EfficientNet-Lite0 +
digits, merge, evaluate, store on S3 (a moto server on loopback started by the script,
exactly as the page says), train a multi-task MHR inventory on MiniLM + tweets straight
to S3, adapt it to a held-out task (MHR-z), and pip-install the example plugin package
and train its softmax router from the CLI. The checks then compare what the commands
printed and wrote.

Two substitutions, and only these, adapt the page to a test machine: a free port
instead of 5555, and ``pip install --target DIR`` (on ``PYTHONPATH``) instead of an
install into the test environment. ``OMP_NUM_THREADS=1`` keeps the small runs fast on
shared cores.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator

import attrs
import pytest
import tomllib

import adapterkit

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PAGE = os.path.join(ROOT, "docs", "walkthrough.md")
PIP = "python -m pip install ./docs/examples/adapterkit_softmax"
TIMEOUT = 900


@attrs.frozen
class Run:
    cwd: str
    returncode: int
    stdout: str
    stderr: str

    def check(self) -> None:
        assert self.returncode == 0, f"walkthrough failed:\n{self.stdout[-3000:]}\n{self.stderr[-3000:]}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bash_blocks() -> list[str]:
    text = open(PAGE, encoding="utf-8").read()
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def script(port: int, target: str) -> str:
    text = "\n".join(bash_blocks())
    assert text.count("PORT=5555") == 1 and text.count(PIP) == 1
    text = text.replace("PORT=5555", f"PORT={port}")
    text = text.replace(PIP, f"python -m pip install -q --no-deps --no-build-isolation --target {target} "
                             "./docs/examples/adapterkit_softmax")
    return "set -euo pipefail\n" + text


@pytest.fixture(scope="module")
def walkthrough(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    bin_dir = os.path.dirname(sys.executable)
    for tool, where in (("curl", None), ("timeout", None), ("moto_server", bin_dir), ("adapterkit", bin_dir)):
        if shutil.which(tool, path=where) is None:
            pytest.skip(f"the walkthrough needs {tool!r} on PATH")
    cwd = tmp_path_factory.mktemp("walkthrough")
    for name in ("docs", "examples"):  # the page runs from the repository root
        os.symlink(os.path.join(ROOT, name), cwd / name)
    target = str(tmp_path_factory.mktemp("site-packages"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FSSPEC_", "ADAPTERKIT_"))}
    env.update(
        PATH=bin_dir + os.pathsep + env.get("PATH", ""),
        PYTHONPATH=os.pathsep.join(p for p in (target, env.get("PYTHONPATH")) if p),
        HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
    )
    proc = subprocess.Popen(
        ["bash", "-c", script(free_port(), target)], cwd=cwd, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:  # the script's own process group: the moto server if the script failed early
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    yield Run(str(cwd), proc.returncode, out, err)


def table_rows(stdout: str, label: str) -> list[tuple[int, str, str]]:
    """``(n, accuracy, macro-F1)`` of every printed table row ``<label> all ...``."""
    pattern = rf"^{re.escape(label)}\s+all\s+(\d+)\s+([\d.]+)\s+([\d.]+)$"
    return [(int(n), acc, f1) for n, acc, f1 in re.findall(pattern, stdout, flags=re.M)]


def test_walkthrough_runs(walkthrough: Run) -> None:
    walkthrough.check()
    for path in ("runs/digits/adapter.safetensors", "runs/digits/merged.safetensors", "runs/adapt.json",
                 "runs/softmax/adapter.safetensors"):
        assert os.path.isfile(os.path.join(walkthrough.cwd, path)), path


def test_merge_and_s3_round_trip_keep_the_trained_scores(walkthrough: Run) -> None:
    walkthrough.check()
    (expected,) = table_rows(walkthrough.stdout, "merged (mosa)")  # as `adapterkit train` printed it
    # `adapterkit eval` of the merge (local file, then its copy on S3) scores what training reported
    assert table_rows(walkthrough.stdout, "merged.safetensors") == [expected, expected]


def test_s3_listing_shows_the_copied_files(walkthrough: Run) -> None:
    walkthrough.check()
    for name in ("adapter", "merged"):
        local = adapterkit.inspect(os.path.join(walkthrough.cwd, f"runs/digits/{name}.safetensors"))
        assert local.digest is not None
        digest = local.digest.removeprefix("sha256:")
        assert f"-> s3://adapters/digits/{name}.safetensors" in walkthrough.stdout
        assert re.search(rf"^digits/{name}\.safetensors\s+.*\s{digest[:12]}$", walkthrough.stdout, flags=re.M)
    assert re.search(r"^inventory\.safetensors\s", walkthrough.stdout, flags=re.M)
    assert re.search(r"^adapted/selfdriving-mhr-z-k8-seed0\.safetensors\s", walkthrough.stdout, flags=re.M)


def test_mhr_z_trains_only_the_new_routing_rows(walkthrough: Run) -> None:
    walkthrough.check()
    with open(os.path.join(walkthrough.cwd, "runs/tweets.toml"), "rb") as fh:
        recipe = tomllib.load(fh)["recipe"]
    sites = 6 * len(recipe["adapter"]["targets"])  # MiniLM: 6 layers
    with open(os.path.join(walkthrough.cwd, "runs/adapt.json"), encoding="utf-8") as fh:
        adapted = json.load(fh)
    (run,) = adapted["runs"]
    assert adapted["mode"] == "mhr-z" and adapted["task"] == "selfdriving"
    assert run["trainable"] == sites * recipe["splitter"]["heads"] * recipe["adapter"]["skills"]
    assert run["url"] == "s3://adapters/tweets/adapted/selfdriving-mhr-z-k8-seed0.safetensors"


def test_example_plugin_installs_and_trains_from_the_cli(walkthrough: Run) -> None:
    walkthrough.check()
    assert re.search(r"^softmax\s+0\.1\.0\s+router: softmax$", walkthrough.stdout, flags=re.M)
    url = os.path.join(walkthrough.cwd, "runs/softmax/adapter.safetensors")
    workflow = json.loads(adapterkit.inspect(url).metadata["workflow"])
    assert workflow["config"]["recipe"]["router"] == {"name": "softmax", "temperature": 0.5, "tasks": 3}
    logits = {k: v for k, v in adapterkit.load_tensors(url).items() if k.endswith(".router.logits")}
    assert len(logits) == 12  # query and value of 6 layers
    for name, value in logits.items():
        assert value.shape == (3, 1, 3), name  # (tasks, heads, skills)
        assert value.abs().sum() > 0, f"{name} never trained (it starts at zeros)"
