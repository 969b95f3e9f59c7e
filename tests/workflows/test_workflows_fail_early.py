"""Fail before the work, in one line: devices, output/checkpoint/report URLs and the
router's task count are checked before any data is read or any model is built; a
checkpoint whose metadata is malformed (its digests valid) is a one-line error."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import fsspec
import pytest
import torch
from click.testing import CliRunner
from wf_helpers import cli_fails, mlp_config, toml

from adapterkit import workflows
from adapterkit.cli import cli
from adapterkit.errors import AdapterkitError
from adapterkit.storage import inspect, load_tensors, save_tensors
from adapterkit.workflows import ConfigError
from adapterkit.workflows.data import Corpus


def _config(tmp_path: Any, **sections: dict[str, Any]) -> str:
    path = os.path.join(str(tmp_path), "run.toml")
    with open(path, "w") as f:
        f.write(toml(mlp_config(**sections)))
    return path


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Reading any data is the work starting: it fails the test (not with an ``error:`` line)."""

    def started(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("the work started before the check")

    monkeypatch.setattr(Corpus, "load", classmethod(started))
    yield


# --- devices -------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["bogus", "cuda:77", "cuda:-1", "mps:0", ""])
def test_unknown_devices_are_refused_up_front(runner: CliRunner, tmp_path: Any, device: str, no_work: None) -> None:
    path = _config(tmp_path)
    line = cli_fails(runner, ["train", path, "--set", f'train.device="{device}"'], "config key 'train.device'")
    assert f"is {device!r}, which this machine does not have; available here: auto, cpu" in line


def test_device_names_follow_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    from adapterkit.workflows.distributed import check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for ok in ("auto", "cpu", "cuda", "cuda:0", "cuda:1"):
        check_device(ok, 0)
    with pytest.raises(ConfigError, match=r"'cuda:2', which .*; available here: auto, cpu, cuda, cuda:0, cuda:1"):
        check_device("cuda:2", 0)
    with pytest.raises(ConfigError, match="'cuda', but this process \\(LOCAL_RANK 3\\) has no cuda:3"):
        check_device("cuda", 3)  # torchrun's 4th process on a 2-GPU machine
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="'cuda', which this machine does not have; available here: auto, cpu"):
        check_device("cuda", 0)


def test_load_artifact_checks_its_device() -> None:
    with pytest.raises(ConfigError, match="device is 'cuda:77'"):
        workflows.load_artifact("memory://never/read.safetensors", device="cuda:77")


# --- output, checkpoint and report URLs ------------------------------------------------


def test_unwritable_outputs_are_refused_before_training(
    runner: CliRunner, tmp_path: Any, mem: str, no_work: None
) -> None:
    folder = tmp_path / "existing"
    folder.mkdir()
    plain = tmp_path / "plain.txt"
    plain.write_text("a file, not a folder")
    cases = [
        ({"output": {"adapter": f"{mem}/runs/"}}, [], "output.adapter: cannot write", "names a folder"),
        ({"output": {"adapter": str(folder)}}, [], "output.adapter: cannot write", "that is a folder"),
        ({"output": {"merged": "https://example.invalid/m.safetensors"}}, [], "output.merged", "read-only"),
        ({"output": {"adapter": f"{plain}/a.safetensors"}}, [], "output.adapter", "is not a folder"),
        ({"checkpoint": {"url": "http://127.0.0.1:9/c.ckpt", "every": 2}}, [], "checkpoint.url", "read-only"),
        ({"checkpoint": {"url": f"{mem}/ck/"}}, ["--stop-at", "1"], "checkpoint.url", "names a folder"),
    ]
    for sections, extra, *expected in cases:
        cli_fails(runner, ["train", _config(tmp_path, **sections), "--no-progress", *extra], *expected)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes to read-only folders")
def test_a_read_only_local_folder_is_refused(runner: CliRunner, tmp_path: Any, no_work: None) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        path = _config(tmp_path, output={"adapter": str(locked / "sub" / "a.safetensors")})
        cli_fails(runner, ["train", path], "output.adapter", "is not writable")
    finally:
        locked.chmod(0o700)


def test_a_checkpoint_url_that_is_never_written_is_not_checked(tmp_path: Any, mem: str) -> None:
    from adapterkit.workflows.run import check_run

    config = workflows.from_dict(mlp_config(checkpoint={"url": "https://example.invalid/c.ckpt"}))
    check_run(config)  # every = 0 and no --stop-at: the run only reads it (on --resume)
    with pytest.raises(AdapterkitError, match="checkpoint.url"):
        check_run(config, stop_at=3)


def test_adapt_merge_heatmap_check_their_outputs_first(runner: CliRunner, tmp_path: Any, mem: str) -> None:
    never = f"{mem}/never-read.safetensors"  # the outputs are refused before the input is opened
    cli_fails(runner, ["adapt", never, "--task", "t", "--mode", "poly", "--output", "https://example.invalid/a"],
           "--output", "read-only")
    cli_fails(runner, ["merge", never, "http://127.0.0.1:9/m.safetensors"], "the merge target", "read-only")
    cli_fails(runner, ["merge", never, f"{mem}/out/"], "the merge target", "names a folder")
    cli_fails(runner, ["heatmap", never, str(tmp_path)], "PNG", "that is a folder")


# --- the router's tasks against the data's ---------------------------------------------


def _task_rows(n: int = 60) -> str:
    from sklearn.datasets import load_digits

    data = load_digits()
    return "".join(
        json.dumps({"image": (data.images[i] / 16.0).round(3).tolist(), "label": str(data.target[i]),
                    "task": "even" if i % 2 == 0 else "odd"}) + "\n"
        for i in range(n)
    )


def test_a_router_declaring_more_tasks_than_the_data_is_an_error(
    runner: CliRunner, tmp_path: Any, mem: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from adapterkit.workflows import run

    def built(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("the backbone was built before the check")

    monkeypatch.setattr(run, "resolve_backbone", built)
    recipe = {"adapter": {"kind": "lora", "targets": ["1", "3"], "r": 4, "skills": 2},
              "router": {"name": "poly", "tasks": 3}}
    adapter = os.path.join(str(tmp_path), "adapter.safetensors")
    single = mlp_config(output={"adapter": adapter})  # digits: single-task data
    single["recipe"] = recipe
    path = os.path.join(str(tmp_path), "single.toml")
    with open(path, "w") as f:
        f.write(toml(single))
    cli_fails(runner, ["train", path], "recipe router 'poly'", "declares tasks = 3", "the data has no tasks")
    with fsspec.open(f"{mem}/tasks.jsonl", "w") as f:
        f.write(_task_rows())
    multi = mlp_config(output={"adapter": adapter})
    multi["data"] = {"train": f"{mem}/tasks.jsonl"}
    multi["recipe"] = recipe
    with open(path, "w") as f:
        f.write(toml(multi))
    cli_fails(runner, ["train", path], "declares tasks = 3", "the data has 2 tasks")
    assert not os.path.exists(adapter)


# --- checkpoints with valid digests and malformed metadata -----------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """(config path, checkpoint URL) of a real run stopped at step 2."""
    url = "memory://wf-tests/fail-early/run.ckpt"
    path = os.path.join(str(tmp_path_factory.mktemp("ckpt")), "run.toml")
    with open(path, "w") as f:
        f.write(toml(mlp_config(train={"steps": 4}, checkpoint={"url": url, "every": 2})))
    result = CliRunner().invoke(cli, ["train", path, "--no-progress", "--stop-at", "2"], catch_exceptions=False)
    assert result.exit_code == 0 and "stopped at step 2" in result.output, result.output
    return path, url


def _rewritten(url: str, dst: str, edit: Any, tensors: dict[str, torch.Tensor] | None = None) -> str:
    meta = inspect(url).metadata["checkpoint"]
    text = edit(json.loads(meta)) if callable(edit) else edit
    save_tensors(tensors or load_tensors(url), dst, metadata={"checkpoint": text if isinstance(text, str)
                                                              else json.dumps(text)})
    return dst


def _without(key: str) -> Any:
    return lambda meta: {k: v for k, v in meta.items() if k != key}


def _with(key: str, value: Any) -> Any:
    return lambda meta: {**meta, key: value}


def _group(key: str, value: Any) -> Any:
    return lambda meta: {**meta, "param_groups": [{**g, key: value} for g in meta["param_groups"]]}


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        ("{not json", "malformed checkpoint metadata (not JSON"),  # was JSONDecodeError
        ("[1, 2]", "expected a JSON object, got list"),
        (_without("fingerprint"), "no 'fingerprint'"),  # was KeyError: 'fingerprint'
        (_without("scheduler"), "no 'scheduler'"),
        (_with("step", "two"), "'step' must be a int, got str"),  # was ValueError
        (_with("step", -1), "out of range"),
        (_with("scalars", {"x": {}}), "'scalars' must map parameter numbers"),
        (_with("scalars", {"0": {"step": "x"}}), "'scalars' of parameter 0 must be numbers"),
        (_with("scheduler", {"last_epoch": "x"}), "scheduler field 'last_epoch' does not fit"),
        (_with("scheduler", {"optimizer": 1}), "scheduler field 'optimizer' does not fit"),
        (_group("lr", "fast"), "param_groups[0] field 'lr' does not fit"),
        (_with("param_groups", []), "optimizer or scheduler state does not fit this run"),
    ],
)
def test_malformed_checkpoint_metadata_is_one_line(
    runner: CliRunner, checkpoint: tuple[str, str], mem: str, edit: Any, expected: str
) -> None:
    path, url = checkpoint
    bad = _rewritten(url, f"{mem}/bad.ckpt", edit)
    line = cli_fails(runner, ["train", path, "--no-progress", "--resume", "--checkpoint", bad], expected)
    assert bad in line


def test_malformed_optimizer_tensor_names_are_one_line(
    runner: CliRunner, checkpoint: tuple[str, str], mem: str
) -> None:
    path, url = checkpoint
    tensors = load_tensors(url)
    name = next(n for n in tensors if n.startswith("optim."))
    tensors["optim.x." + name.split(".", 2)[2]] = tensors.pop(name)  # was ValueError: invalid literal for int()
    bad = _rewritten(url, f"{mem}/names.ckpt", lambda meta: meta, tensors)
    resume = ["train", path, "--no-progress", "--resume", "--checkpoint", bad]
    cli_fails(runner, resume, "is not optim.<parameter>.<state>")
    # the untouched checkpoint still resumes
    result = runner.invoke(cli, ["train", path, "--no-progress", "--resume"], catch_exceptions=False)
    assert result.exit_code == 0 and "resumed from" in result.output, result.output
