"""``adapterkit import`` / ``adapterkit export --peft``: PEFT folders <-> adapterkit files without
the base model, with modules to save, patterns and per-task folders."""

from __future__ import annotations

import copy
import json

import torch
from click.testing import CliRunner
from peft import LoraConfig, PeftModel, get_peft_model
from peftlib import SEQ_CLS, TOL, max_diff, minilm_inputs, output, randomize, randomize_trainable
from safetensors.torch import load_file

import adapterkit
from adapterkit.cli import cli


def test_seq_cls_folder_through_the_cli(seqcls, tmp_path) -> None:
    peft_model = get_peft_model(copy.deepcopy(seqcls), LoraConfig(**SEQ_CLS)).eval()
    randomize(peft_model, ("lora_", "modules_to_save"), seed=6)
    peft_model.save_pretrained(tmp_path / "peft")
    runner = CliRunner()
    url = str(tmp_path / "imported.safetensors")
    result = runner.invoke(cli, ["import", str(tmp_path / "peft"), url])
    assert result.exit_code == 0, result.output
    assert "imported 12 sites + 1 module to save (lora)" in result.output
    info = adapterkit.inspect(url)
    assert info.recipe is not None and info.recipe.modules_to_save == ("classifier",) and info.recipe.overrides
    assert {"modules_to_save/classifier/weight", "modules_to_save/classifier/bias"} <= {t.name for t in info.tensors}

    inputs = minilm_inputs()
    model = adapterkit.load(url, copy.deepcopy(seqcls)).eval()  # the file attaches itself onto the real model
    assert max_diff(output(model, inputs), output(peft_model, inputs)) <= TOL

    result = runner.invoke(cli, ["export", url, "--peft", str(tmp_path / "back"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    config = report["folders"][str(tmp_path / "back")]
    assert config["modules_to_save"] == ["classifier"] and config["peft_type"] == "LORA"
    original = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    back = load_file(tmp_path / "back" / "adapter_model.safetensors")
    assert set(back) == set(original) and all(torch.equal(back[k], v) for k, v in original.items())
    loaded = PeftModel.from_pretrained(copy.deepcopy(seqcls), str(tmp_path / "back")).eval()
    assert max_diff(output(loaded, inputs), output(peft_model, inputs)) <= TOL


def test_per_task_export_through_the_cli(seqcls, tmp_path) -> None:
    recipe = {"adapter": {"kind": "lora", "targets": ["query", "value"], "skills": 3, "r": 2, "alpha": 1},
              "router": {"name": "poly", "tasks": 2}}
    ours = adapterkit.attach(copy.deepcopy(seqcls), recipe).eval()
    randomize_trainable(ours, seed=7, std=0.3)
    url = str(tmp_path / "poly.safetensors")
    adapterkit.save(ours, url)
    result = CliRunner().invoke(cli, ["export", url, "--peft", str(tmp_path / "tasks"), "--per-task"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"exported 12 sites as PEFT LORA to 2 folders under {tmp_path / 'tasks'}"
    inputs = minilm_inputs()
    for task in range(2):
        loaded = PeftModel.from_pretrained(copy.deepcopy(seqcls), str(tmp_path / "tasks" / f"task-{task}")).eval()
        with adapterkit.route(ours, task):
            assert max_diff(output(loaded, inputs), output(ours, inputs)) <= TOL


def test_cli_errors_are_one_line(t5_base, tmp_path) -> None:
    runner = CliRunner()
    dora = get_peft_model(copy.deepcopy(t5_base), LoraConfig(r=4, target_modules=["q"], use_dora=True))
    dora.save_pretrained(tmp_path / "dora")
    result = runner.invoke(cli, ["import", str(tmp_path / "dora"), str(tmp_path / "x.safetensors")])
    assert result.exit_code == 1 and result.output.strip().count("\n") == 0 and "use_dora" in result.output
    bottleneck = adapterkit.attach(copy.deepcopy(t5_base), {"adapter": {"kind": "bottleneck", "targets": ["wo"]}})
    adapterkit.save(bottleneck, str(tmp_path / "b.safetensors"))
    result = runner.invoke(cli, ["export", str(tmp_path / "b.safetensors"), "--peft", str(tmp_path / "out")])
    assert result.exit_code == 1 and result.output.strip().count("\n") == 0
    assert "only LoRA-kind adapters export to PEFT" in result.output
    result = runner.invoke(cli, ["export", str(tmp_path / "b.safetensors")])
    assert result.exit_code == 2 and "--peft" in result.output
