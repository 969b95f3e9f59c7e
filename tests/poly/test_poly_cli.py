"""``adapterkit import`` / ``export``: PEFT folders <-> adapterkit files, without the base model."""

from __future__ import annotations

import copy

import torch
from click.testing import CliRunner
from peft import LoraConfig, get_peft_model
from polylib import output, peft_poly, poly_recipe, t5_inputs
from safetensors.torch import load_file

import adapterkit
from adapterkit.cli import cli


def test_import_then_export_round_trips_bit_exact(t5_base, tmp_path) -> None:
    peft_model = peft_poly(t5_base, heads=4, targets=["q", "v"], r=4).eval()
    peft_model.save_pretrained(tmp_path / "peft")
    runner = CliRunner()
    url = "memory://poly-cli/mhr.safetensors"
    result = runner.invoke(cli, ["import", str(tmp_path / "peft"), url])
    assert result.exit_code == 0, result.output
    assert "imported 12 sites (lora+mhr+poly)" in result.output
    info = adapterkit.inspect(url)
    assert info.recipe is not None and info.recipe.splitter.args == {"heads": 4}
    assert info.metadata["imported_from"].startswith("peft POLY")

    model = adapterkit.load(url, copy.deepcopy(t5_base)).eval()  # the file attaches itself onto the real model
    inputs, ids = t5_inputs(), torch.tensor([1, 0, 2, 2, 1])
    with torch.no_grad(), adapterkit.route(model, ids):
        ours = output(model, inputs)
        reference = output(peft_model.base_model, inputs, task_ids=ids)
    assert (ours - reference).abs().max() <= 1e-5

    result = runner.invoke(cli, ["export", url, "--peft", str(tmp_path / "back")])
    assert result.exit_code == 0, result.output
    original = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    back = load_file(tmp_path / "back" / "adapter_model.safetensors")
    assert set(back) == set(original) and all(torch.equal(back[k], v) for k, v in original.items())


def test_cli_errors_are_one_line(t5_base, tmp_path) -> None:
    runner = CliRunner()
    peft_model = get_peft_model(copy.deepcopy(t5_base), LoraConfig(r=4, target_modules=["q"], use_dora=True))
    peft_model.save_pretrained(tmp_path / "dora")
    result = runner.invoke(cli, ["import", str(tmp_path / "dora"), str(tmp_path / "x.safetensors")])
    assert result.exit_code == 1
    assert result.output.strip().count("\n") == 0 and "use_dora" in result.output

    uniform = adapterkit.attach(copy.deepcopy(t5_base), poly_recipe(["q"], router="uniform"))
    adapterkit.save(uniform, str(tmp_path / "uniform.safetensors"))
    result = runner.invoke(cli, ["export", str(tmp_path / "uniform.safetensors"), "--peft", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert result.output.startswith("error: ") and "collapse" in result.output
    assert result.output.strip().count("\n") == 0
