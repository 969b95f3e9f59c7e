"""A blocked plugin is gone entirely: its modes, loss terms and commands, and its module is
never imported (the core reaches methods only through the registries)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROBE = """
import json, sys
from click.testing import CliRunner
from adapterkit.cli import cli
import adapterkit.workflows  # every workflow module: none may import a plugin itself
runner = CliRunner()
out = {
    "help": runner.invoke(cli, ["--help"]).output,
    "adapt_help": runner.invoke(cli, ["adapt", "--help"]).output,
    "adapt": runner.invoke(cli, ["adapt", "x.safetensors", "--task", "t", "--mode", "mhr-z"]).output,
    "plugins": json.loads(runner.invoke(cli, ["plugins", "--json"]).output),
    "modules": sorted(m for m in sys.modules if m.startswith("adapterkit_")),
}
print(json.dumps(out))
"""


def probe(blocked: str) -> dict:
    env = {**os.environ, "ADAPTERKIT_BLOCK_PLUGINS": blocked}
    env.pop("ADAPTERKIT_DISABLE_PLUGIN_AUTOLOAD", None)
    result = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return json.loads(result.stdout)  # type: ignore[no-any-return]


@pytest.mark.parametrize("blocked", ["", "poly", "mosa"])
def test_a_blocked_plugin_leaves_nothing_behind(blocked: str) -> None:
    out = probe(blocked)
    names = {p["name"] for p in out["plugins"]}
    modes = "mhr-z" in out["adapt_help"] and "poly-mu" in out["adapt_help"]
    commands = {"import", "export"} <= {line.split()[0] for line in out["help"].splitlines() if line.startswith("  ")}
    if blocked == "poly":
        assert "poly" not in names and not modes and not commands
        assert "unknown adaptation mode 'mhr-z'; available: none" in out["adapt"]
        assert "adapterkit_poly" not in out["modules"]
    else:
        assert "poly" in names and modes and commands
    if blocked == "mosa":
        assert "mosa" not in names and "adapterkit_mosa" not in out["modules"]
    else:
        mosa = next(p for p in out["plugins"] if p["name"] == "mosa")
        assert mosa["provides"]["loss"] == ["consistency", "consistency-hidden"]  # the loss terms are discoverable


def test_a_loss_term_of_a_blocked_plugin_is_an_unknown_name(monkeypatch: pytest.MonkeyPatch) -> None:
    from adapterkit.errors import UnknownNameError
    from adapterkit.plugins import set_host
    from adapterkit.workflows.loop import make_loss_term

    monkeypatch.setenv("ADAPTERKIT_BLOCK_PLUGINS", "mosa")
    set_host(None)
    try:
        with pytest.raises(UnknownNameError, match="unknown loss term 'consistency'; available: none"):
            make_loss_term({"name": "consistency", "weight": 1.0})
    finally:
        set_host(None)
