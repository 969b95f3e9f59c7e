"""Configs that travel and one CLI convention: relative paths resolve against the config's
folder (local and S3), ``--set recipe.*`` sweeps, ``-o`` reaches the data, ``[output]
merge = false``, an identity merge evaluated once, tasks by name, ``--json`` on stdout with
status lines on stderr, whole help sentences, ``merge --help`` listing the mergers."""

from __future__ import annotations

import json
import os
from typing import Any

import fsspec
import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.datasets import load_digits
from wf_helpers import cli_fails, mlp_config, toml

from adapterkit import workflows
from adapterkit.cli import cli
from adapterkit.wording import plural
from adapterkit.workflows.config import resolve_paths


def _digits_jsonl(n: int = 120) -> str:
    images, labels = load_digits(return_X_y=True)
    rows = (json.dumps({"image": (np.asarray(x).reshape(8, 8) / 16).tolist(), "label": str(y)})
            for x, y in zip(images[:n], labels[:n], strict=True))
    return "\n".join(rows) + "\n"


def _own_data_config(**sections: dict[str, Any]) -> dict[str, Any]:
    config = mlp_config(**sections)
    config["data"] = {"train": "data/train.jsonl", "test_fraction": 0.25}
    return config


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Any, mem: str) -> None:
    # a local config in a folder of its own, run from elsewhere (the working directory is not used)
    folder = tmp_path / "exp"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "train.jsonl").write_text(_digits_jsonl())
    (folder / "run.toml").write_text(toml(_own_data_config(output={"adapter": "out/a.safetensors"})))
    config = workflows.load_config(str(folder / "run.toml"))
    assert config.data.args["train"] == f"{folder}/data/train.jsonl"
    assert config.output.adapter == f"{folder}/out/a.safetensors"
    result = workflows.train(config, progress=False, echo=lambda _: None)
    assert result.steps == 8 and os.path.isfile(folder / "out" / "a.safetensors")

    # the same folder at a URL: paths join the URL's folder, `..` included; absolute ones stay
    with fsspec.open(f"{mem}/exp/run.toml", "w") as f:
        f.write(toml(_own_data_config(output={"adapter": "../out/a.safetensors", "merged": "/tmp/m.safetensors"})))
    config = workflows.load_config(f"{mem}/exp/run.toml")
    assert config.data.args["train"] == f"{mem}/exp/data/train.jsonl"
    assert config.output.adapter == f"{mem}/out/a.safetensors" and config.output.merged == "/tmp/m.safetensors"
    assert resolve_paths({"data": {"train": "s3://b/t.jsonl"}}, "/x")["data"]["train"] == "s3://b/t.jsonl"


def test_set_reaches_recipe_keys() -> None:
    config = workflows.from_dict(mlp_config())
    swept = workflows.with_overrides(config, {"recipe.adapter.r": 16, "recipe.splitter.n_cells": 4, "train.steps": 2})
    assert swept.recipe.kind_args["r"] == 16 and swept.recipe.splitter.args["n_cells"] == 4
    assert swept.train.steps == 2 and config.recipe.kind_args["r"] == 4  # the original is untouched
    with pytest.raises(workflows.ConfigError, match="recipe key 'seed' is not a table"):
        workflows.with_overrides(config, {"recipe.seed.x": 1})


def test_storage_options_reach_the_data(runner: CliRunner, tmp_path: Any, s3_bucket: str) -> None:
    prefix = f"{s3_bucket}/configs-travel"
    with fsspec.open(f"{prefix}/data/train.jsonl", "w") as f:
        f.write(_digits_jsonl())
    with fsspec.open(f"{prefix}/run.toml", "w") as f:
        f.write(toml(_own_data_config()))
    endpoint = fsspec.config.conf["s3"]["client_kwargs"]["endpoint_url"]
    saved = fsspec.config.conf.pop("s3")  # only -o knows the endpoint now: config and data must both use it
    try:
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        result = runner.invoke(cli, ["train", f"{prefix}/run.toml", "--json", "--no-progress",
                                     "-o", f"client_kwargs.endpoint_url={endpoint}"], catch_exceptions=False)
    finally:
        fsspec.config.conf["s3"] = saved
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["steps"] == 8


def test_merge_off_and_identity_merges_are_not_evaluated_twice() -> None:
    quiet: dict[str, Any] = {"progress": False, "echo": lambda _: None}
    mosa = workflows.train(workflows.from_dict(mlp_config()), **quiet)
    assert list(mosa.results) == ["trained", "merged (mosa)"]
    off = workflows.train(workflows.from_dict(mlp_config(output={"merge": False})), **quiet)
    assert list(off.results) == ["trained"]
    lora = mlp_config()
    lora["recipe"] = {"adapter": {"kind": "lora", "targets": ["1", "3"], "r": 4}}
    plain = workflows.train(workflows.from_dict(lora), **quiet)
    assert list(plain.results) == ["trained"]  # identity: the merged model is the trained one
    with pytest.raises(workflows.ConfigError, match="merge = false writes no merged adapter"):
        workflows.from_dict(mlp_config(output={"merge": False, "merged": "memory://x/m.safetensors"}))


def test_collapse_takes_a_task_name(runner: CliRunner, tmp_path: Any, mem: str) -> None:
    rows = [{"image": r["image"], "label": r["label"], "task": "low" if int(r["label"]) < 5 else "high"}
            for r in map(json.loads, _digits_jsonl(160).splitlines())]
    with fsspec.open(f"{mem}/tasks.jsonl", "w") as f:
        f.write("\n".join(map(json.dumps, rows)) + "\n")
    config = mlp_config(output={"adapter": f"{mem}/inventory.safetensors"})
    config["data"] = {"train": f"{mem}/tasks.jsonl", "classes": [str(i) for i in range(10)]}
    config["recipe"] = {"adapter": {"kind": "lora", "targets": ["1", "3"], "r": 4, "skills": 2},
                        "router": {"name": "poly"}}
    workflows.train(workflows.from_dict(config), progress=False, echo=lambda _: None)
    inventory = f"{mem}/inventory.safetensors"
    result = runner.invoke(cli, ["merge", inventory, f"{mem}/high.safetensors", "--merger", "collapse",
                                 "--arg", "task=high", "--trust-file", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["merger"] == {"name": "collapse", "args": {"task": 0}}  # sorted: high, low
    cli_fails(runner, ["merge", inventory, f"{mem}/x.safetensors", "--merger", "collapse", "--arg", "task=middle",
                       "--trust-file"], "task 'middle'", "tasks: high, low")


def test_help_lines_are_whole_sentences_and_merge_lists_mergers(runner: CliRunner) -> None:
    import click

    ctx = click.Context(cli)
    groups = [cli, cli.get_command(ctx, "library")]
    for group in groups:
        assert isinstance(group, click.Group)
        for name in group.list_commands(ctx):
            line = group.get_command(ctx, name).get_short_help_str(limit=1000)  # type: ignore[union-attr]
            assert line.endswith(".") and not line.endswith("..."), (name, line)
        listing = runner.invoke(cli, ["--help"] if group is cli else ["library", "--help"]).output
        assert "..." not in listing.split("Commands:")[1], listing
    merge_help = runner.invoke(cli, ["merge", "--help"]).output
    assert "Installed mergers" in merge_help and "density" in merge_help
    assert "collapse         task=None, fold=False" in merge_help


def test_plural() -> None:
    assert [plural(1, "seed"), plural(3, "seed"), plural(1, "class", "classes"), plural(2, "class", "classes")] == [
        "1 seed", "3 seeds", "1 class", "2 classes"]


def test_eval_points_a_saved_run_at_other_data(runner: CliRunner, mem: str) -> None:
    adapter = f"{mem}/run.safetensors"
    workflows.train(workflows.from_dict(mlp_config(output={"adapter": adapter})), progress=False,
                    echo=lambda _: None)
    with fsspec.open(f"{mem}/other.jsonl", "w") as f:
        f.write(_digits_jsonl(40))
    out = runner.invoke(cli, ["eval", adapter, "--data", f"{mem}/other.jsonl", "--json", "--trust-file"],
                        catch_exceptions=False)
    assert out.exit_code == 0, out.output
    report = json.loads(out.stdout)
    assert report["data"] == f"{mem}/other.jsonl" and report["rows"][-1]["n"] == 40  # every record, once
    with fsspec.open(f"{mem}/bad.jsonl", "w") as f:
        f.write(json.dumps({"image": [[0.0] * 8] * 8, "label": "eleven"}) + "\n")
    cli_fails(runner, ["eval", adapter, "--data", f"{mem}/bad.jsonl", "--trust-file"], "'eleven'", "classes")
