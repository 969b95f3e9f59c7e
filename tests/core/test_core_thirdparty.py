"""Third-party plugins installed for real (pip --target): discovery, listing, env switches,
broken packages reported by name, and the sample ``stripes`` splitter used in a recipe."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from sklearn.datasets import load_digits
from torch import nn

import adapterkit
from adapterkit import PluginHost
from adapterkit.cli import cli
from adapterkit.plugins import set_host

ADAPTERKIT_VERSION = metadata.version("adapterkit")


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "adapterkit", *args], env=env, capture_output=True, text=True)


# discovery ------------------------------------------------------------------------------
def test_fresh_host_discovers_installed_plugin(with_stripes: Path, discover: Callable[[], PluginHost]) -> None:
    import adapterkit_stripes

    host = discover()
    assert Path(adapterkit_stripes.__file__).is_relative_to(with_stripes)  # the installed copy, not the source tree
    info = host.plugins["stripes"]
    assert (info.version, info.distribution) == ("0.3.0", "adapterkit-stripes")
    assert info.provides == {"splitter": ["stripes"], "sampler": ["one_stripe"], "merger": ["prune"]}
    assert host.splitters["stripes"] is adapterkit_stripes.Stripes
    assert host.splitters.provider("stripes") == "stripes"
    assert host.plugins["builtins"].version == ADAPTERKIT_VERSION
    assert host.failures == []


def test_plugin_absent_without_install(discover: Callable[[], PluginHost]) -> None:
    host = discover()
    assert "stripes" not in host.plugins
    with pytest.raises(adapterkit.UnknownNameError, match=r"unknown splitter 'stripes'; available: .*dense"):
        host.splitters["stripes"]


def test_cli_json_lists_plugin_in_subprocess(installed, subprocess_env) -> None:
    result = run_cli("plugins", "--json", env=subprocess_env(installed.stripes))
    assert result.returncode == 0, result.stderr
    listing = json.loads(result.stdout)
    assert all(set(entry) == {"name", "version", "provides"} for entry in listing)
    by_name = {entry["name"]: entry for entry in listing}
    assert by_name["stripes"] == {
        "name": "stripes", "version": "0.3.0",
        "provides": {"splitter": ["stripes"], "sampler": ["one_stripe"], "merger": ["prune"]},
    }
    assert by_name["builtins"]["version"] == ADAPTERKIT_VERSION
    assert result.stderr == ""


def test_cli_json_lists_plugin_via_cli_runner(with_stripes: Path, discover, restore_host: None) -> None:
    set_host(discover())
    result = CliRunner().invoke(cli, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    listing = json.loads(result.stdout)
    assert [e["name"] for e in listing] == sorted(e["name"] for e in listing)
    stripes = next(e for e in listing if e["name"] == "stripes")
    assert stripes["version"] == "0.3.0"
    assert stripes["provides"]["splitter"] == ["stripes"]


def test_plugin_command_runs_and_reports_bad_input(installed, subprocess_env) -> None:
    env = subprocess_env(installed.stripes)
    ok = run_cli("stripes-show", "--rows", "4", "--cols", "3", "--cells", "2", env=env)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines() == ["0 0 0", "0 0 0", "1 1 1", "1 1 1"]
    bad = run_cli("stripes-show", "--rows", "1", "--cols", "3", "--cells", "4", env=env)
    assert bad.returncode == 1
    assert bad.stdout == ""
    assert bad.stderr == "error: projection 'w': 1 rows cannot make 4 stripes\n"


# broken plugins ---------------------------------------------------------------------------
def test_broken_plugins_reported_by_name(with_stripes: Path, with_broken: Path, discover) -> None:
    host = discover()
    failures = {f.name: f.error for f in host.failures}
    assert set(failures) == {"broken_import", "broken_hook", "broken_typo", "broken_dup"}
    assert failures["broken_import"] == "ImportError: adapterkit_broken needs the package 'not_installed_anywhere'"
    assert failures["broken_hook"] == "RuntimeError: sampler table is corrupt"
    assert "adapterkit_register_spliters" in failures["broken_typo"]
    assert failures["broken_dup"] == (
        "DuplicateNameError: splitter 'dense' is registered twice: by plugin 'builtins' and by plugin 'broken_dup'"
    )
    # the rest keep working, and nothing of a failed plugin stays half-registered
    assert {"builtins", "stripes", "broken_fine", "broken_cli"} <= set(host.plugins)
    assert host.mergers.provider("keep") == "broken_fine"
    assert host.splitters.provider("dense") == "builtins"
    assert "half_registered" not in host.splitters and "typo" not in host.splitters
    assert all(host.pm.get_plugin(name) is None for name in failures)
    recipe = {"adapter": {"kind": "lora", "targets": ["0"]}}
    model = adapterkit.attach(nn.Sequential(nn.Linear(4, 4)), recipe, host=host)
    assert adapterkit.summary(model).trainable == 2 * 4 * 8


def test_cli_warns_about_broken_plugins_and_exits_zero(installed, subprocess_env) -> None:
    result = run_cli("plugins", env=subprocess_env(installed.stripes, installed.broken))
    assert result.returncode == 0
    warnings = result.stderr.splitlines()
    assert len(warnings) == 4 and all(w.startswith("warning: plugin 'broken_") for w in warnings)
    assert "warning: plugin 'broken_import' failed to load: ImportError: " in result.stderr
    assert "Traceback" not in result.stderr
    rows = {line.split()[0]: line for line in result.stdout.splitlines()[1:]}
    assert {"builtins", "stripes", "broken_fine"} <= set(rows)
    assert rows["stripes"].split(None, 2)[1:] == ["0.3.0", "splitter: stripes; sampler: one_stripe; merger: prune"]


def test_broken_command_hook_does_not_take_the_cli_down(installed, subprocess_env) -> None:
    env = subprocess_env(installed.stripes, installed.broken)
    warning = "warning: plugin 'broken_cli' failed to load: RuntimeError: command table is corrupt\n"
    ok = run_cli("stripes-show", "--rows", "2", "--cols", "1", env=env)
    assert (ok.returncode, ok.stdout, ok.stderr) == (0, "0\n1\n", warning)
    listing = run_cli("--help", env=env)
    assert listing.returncode == 0 and listing.stderr == warning
    assert "stripes-show" in listing.stdout and "plugins" in listing.stdout


# environment switches ---------------------------------------------------------------------
def test_disable_autoload_keeps_builtins(with_stripes: Path, discover, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPTERKIT_DISABLE_PLUGIN_AUTOLOAD", "1")
    host = discover()
    assert "stripes" not in host.plugins and "builtins" in host.plugins
    assert {"lora", "bottleneck"} <= set(host.kinds)


def test_named_plugin_reenabled_under_disabled_autoload(
    with_stripes: Path, with_broken: Path, discover, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ADAPTERKIT_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.setenv("ADAPTERKIT_PLUGINS", "stripes")
    host = discover()
    assert "stripes" in host.plugins and "builtins" in host.plugins
    assert not any(name.startswith("broken") for name in host.plugins)
    assert host.failures == []  # the broken ones were never imported


@pytest.mark.parametrize("blocked", ["stripes", "builtins", "stripes,builtins"])
def test_block_plugins(with_stripes: Path, discover, monkeypatch: pytest.MonkeyPatch, blocked: str) -> None:
    monkeypatch.setenv("ADAPTERKIT_BLOCK_PLUGINS", blocked)
    host = discover()
    names = set(blocked.split(","))
    assert names.isdisjoint(host.plugins)
    assert ("stripes" in host.splitters) == ("stripes" not in names)
    assert ("lora" in host.kinds) == ("builtins" not in names)
    if "builtins" in names:
        with pytest.raises(adapterkit.UnknownNameError, match="unknown adapter kind 'lora'"):
            adapterkit.attach(nn.Linear(3, 3), {"adapter": {"kind": "lora", "targets": ["re:.*"]}}, host=host)


def test_block_wins_over_named(with_stripes: Path, discover, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPTERKIT_DISABLE_PLUGIN_AUTOLOAD", "true")
    monkeypatch.setenv("ADAPTERKIT_PLUGINS", "stripes")
    monkeypatch.setenv("ADAPTERKIT_BLOCK_PLUGINS", " stripes ")
    assert "stripes" not in discover().plugins


# the stripes splitter at work -------------------------------------------------------------
STRIPES_RECIPE = """
seed = 3
[adapter]
kind = "lora"
targets = ["0", "2"]
r = 8
alpha = 32
[splitter]
name = "stripes"
n_cells = 2
[sampler]
name = "one_stripe"
"""


def digits_mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    data = load_digits()
    x = torch.tensor(data.data[:256], dtype=torch.float32) / 16.0
    y = torch.tensor(data.target[:256])
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)), x, y


def test_stripes_partition_is_contiguous_and_covering(with_stripes: Path, discover) -> None:
    host = discover()
    spec = adapterkit.ProjectionSpec("A", (5, 3), "down", 0, lambda v, h, g: None)
    rows = host.splitters["stripes"](host.splitters["stripes"].Config(n_cells=2)).split(spec, 1, torch.Generator())
    assert rows.n_cells == 2 and rows.cell_ids is not None
    assert rows.cell_ids.tolist() == [[0] * 3] * 3 + [[1] * 3] * 2
    cfg = host.splitters["stripes"].Config(n_cells=4, by="elements")
    elements = host.splitters["stripes"](cfg).split(spec, 1, torch.Generator())
    assert elements.cell_ids is not None
    ids = elements.cell_ids.flatten()
    assert torch.equal(ids, ids.sort().values) and torch.bincount(ids.long()).tolist() == [4, 4, 4, 3]


def test_stripes_recipe_attaches_and_trains(with_stripes: Path, discover) -> None:
    host = discover()
    model, x, y = digits_mlp()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    recipe = adapterkit.Recipe.from_toml(STRIPES_RECIPE)
    adapterkit.attach(model, recipe, host=host)
    site = adapterkit.sites(model)["0"]
    assert site.partition("B").n_cells == 2 and site.partition("A").n_cells == 2
    model.eval()
    with torch.no_grad():
        plain = nn.functional.linear(torch.relu(nn.functional.linear(x, base["0.weight"], base["0.bias"])),
                                     base["2.weight"], base["2.bias"])
        assert torch.equal(model(x), plain)  # zero-init B: unchanged at init

    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    torch.manual_seed(1)
    losses = []
    for step in range(30):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        for name, s in adapterkit.sites(model).items():
            for proj in ("A", "B"):  # gradient reaches one stripe only
                grad = s.projections[proj].delta.grad[0]
                ids = s.projections[proj].cell_ids
                touched = {int(c) for c in ids[grad != 0].unique()}
                assert len(touched) <= 1, (name, proj, touched)
        optimizer.step()
        losses.append(loss.item())
        for n, p in model.named_parameters():  # plain SGD: an inactive stripe stays bit-identical
            if n.endswith("delta"):
                s = adapterkit.sites(model)[n.split(".")[0]]
                ids = s.projections[n.split(".")[2]].cell_ids
                moved = {int(c) for c in ids[(p.detach() != before[n])[0]].unique()}
                assert len(moved) <= 1, (step, n, moved)
    assert losses[-1] < 0.8 * losses[0]
    assert all(torch.equal(model.state_dict()[k.replace(".", ".base.", 1)], v) for k, v in base.items())

    # eval uses the expectation (1/n per stripe); fold turns it into plain layers with the same output
    model.eval()
    with torch.no_grad():
        expected = model(x)
        adapterkit.merge(model, "fold", host=host)
        assert type(model[0]) is nn.Linear and type(model[2]) is nn.Linear
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
