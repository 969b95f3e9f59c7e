"""``adapterkit merge SRC SRC ... DST --merger NAME``: several experts into one adapter file."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import adapterkit
from adapterkit.cli import cli


def body() -> nn.Module:
    torch.manual_seed(0)  # the user's base model: the same weights every time
    return nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 4))


@pytest.fixture
def user_model(monkeypatch: pytest.MonkeyPatch) -> str:
    module = types.ModuleType("merge_cli_model")
    module.body = body  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "merge_cli_model", module)
    return "merge_cli_model:body"


def expert(url: str, seed: int, r: int) -> dict[str, torch.Tensor]:
    """A LoRA expert with random factors saved at ``url``; returns each site's ΔW."""
    model = adapterkit.attach(body(), {"adapter": {"kind": "lora", "targets": ["0", "2"], "r": r}})
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator))
    adapterkit.save(model, url)
    return {name: site.delta_weight() for name, site in adapterkit.sites(model).items()}


def test_task_arithmetic_of_three_experts_from_the_command_line(lib: str, user_model: str) -> None:
    deltas = [expert(f"{lib}/e{i}.safetensors", seed=i, r=r) for i, r in enumerate((2, 3, 1))]
    runner = CliRunner()
    args = ["merge", *(f"{lib}/e{i}.safetensors" for i in range(3)), f"{lib}/merged.safetensors",
            "--merger", "task-arithmetic", "--arg", "weights=[1.0, 0.5, -1.0]", "--model", user_model]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "merged 3 adapters with 'task-arithmetic'" in result.output
    merged = adapterkit.load(f"{lib}/merged.safetensors", body())
    for name, site in adapterkit.sites(merged).items():
        expected = deltas[0][name] + 0.5 * deltas[1][name] - deltas[2][name]
        torch.testing.assert_close(site.delta_weight(), expected, rtol=0, atol=1e-5)
    info = adapterkit.inspect(f"{lib}/merged.safetensors")
    assert [step["op"] for step in info.history][-2:] == ["stack", "merge"]


def test_merging_several_sources_needs_a_merger_and_a_base_model(lib: str, user_model: str) -> None:
    for i in range(2):
        expert(f"{lib}/e{i}.safetensors", seed=i, r=2)
    runner = CliRunner()
    sources = [f"{lib}/e0.safetensors", f"{lib}/e1.safetensors", f"{lib}/out.safetensors"]
    result = runner.invoke(cli, ["merge", *sources])
    assert result.exit_code == 2 and "needs --merger" in result.output
    result = runner.invoke(cli, ["merge", *sources, "--merger", "ties"])
    assert result.exit_code == 1 and "does not say its base model: give it with --model NAME" in result.stderr


def test_ties_over_a_library_selection(lib: str, user_model: str) -> None:
    library = adapterkit.Library.init(f"{lib}/library")
    for i in range(3):
        expert(f"{lib}/e{i}.safetensors", seed=i, r=2)
        library.add(f"{lib}/e{i}.safetensors", task="sentiment" if i < 2 else "other", base="tiny")
    runner = CliRunner()
    args = ["merge", f"{lib}/ties.safetensors", "--library", f"{lib}/library", "--select", "task=sentiment",
            "--merger", "ties", "--arg", "density=0.5", "--model", user_model]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "merged 2 adapters with 'ties'" in result.output
    (stacked,) = [s for s in adapterkit.inspect(f"{lib}/ties.safetensors").history if s["op"] == "stack"]
    assert [source["name"] for source in stacked["sources"]] == ["e0", "e1"]  # the selection, by name
    result = runner.invoke(cli, [*args, "--json"])  # (overwrites the target: a second run is fine)
    report = json.loads(result.output)
    assert result.exit_code == 0 and report["merger"]["name"] == "ties" and len(report["sources"]) == 2
    assert report["adapter"]["method"] == "lora" and report["url"] == f"{lib}/ties.safetensors"
    result = runner.invoke(cli, [*args[:5], "task=none", *args[6:]])
    assert result.exit_code == 1 and "no adapter of library" in result.stderr
