"""The CLI root: ``adapterkit plugins [--json]`` and one-line user errors without traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from adapterkit import AttachError, PluginHost, RecipeError
from adapterkit.cli import AdapterkitGroup, cli
from adapterkit.plugins import PluginFailure, set_host


@pytest.fixture
def host(builtin_host: PluginHost, restore_host: None) -> PluginHost:
    set_host(builtin_host)
    return builtin_host


def test_plugins_json_format(host: PluginHost) -> None:
    result = CliRunner().invoke(cli, ["plugins", "--json"])
    assert result.exit_code == 0 and result.stderr == ""
    (entry,) = json.loads(result.stdout)
    assert list(entry) == ["name", "version", "provides"]
    assert entry["name"] == "builtins" and entry["version"] == "test"
    assert entry["provides"]["kind"] == ["bottleneck", "lora"]
    assert entry["provides"]["merger"] == ["fold", "identity"]
    assert entry["provides"] == host.plugins["builtins"].provides


def test_plugins_table(host: PluginHost) -> None:
    result = CliRunner().invoke(cli, ["plugins"])
    assert result.exit_code == 0
    header, row = result.stdout.splitlines()
    assert header.split() == ["plugin", "version", "provides"]
    name, version, provides = row.split(None, 2)
    assert (name, version) == ("builtins", "test")
    assert provides.startswith(
        "kind: bottleneck, lora; splitter: dense; sampler: all; router: none; merger: fold, identity"
    )


def test_plugins_failures_are_warnings(host: PluginHost) -> None:
    host.register(object(), "empty")  # provides nothing: listed with '-'
    host.failures.append(PluginFailure("ghost", "ImportError: no module named 'ghost'"))
    result = CliRunner().invoke(cli, ["plugins"])
    assert result.exit_code == 0
    assert result.stderr == "warning: plugin 'ghost' failed to load: ImportError: no module named 'ghost'\n"
    assert result.stdout.splitlines()[-1].split() == ["empty", "unknown", "-"]


def error_group(exc: Exception) -> click.Group:
    @click.group(cls=AdapterkitGroup)
    def root() -> None:
        pass

    @root.command("boom")
    def boom() -> None:
        raise exc

    return root


@pytest.mark.parametrize(
    ("exc", "line"),
    [
        (AttachError("encoder.layer.0.query", "LoRA adapts nn.Linear, got GELU"),
         "error: cannot attach: site 'encoder.layer.0.query': LoRA adapts nn.Linear, got GELU"),
        (RecipeError("unknown recipe key 'spliter'"), "error: unknown recipe key 'spliter'"),
    ],
)
def test_user_error_is_one_line_exit_1(exc: Exception, line: str) -> None:
    result = CliRunner().invoke(error_group(exc), ["boom"])
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr == line + "\n"
    assert isinstance(result.exception, SystemExit)


def test_bug_is_not_swallowed() -> None:
    result = CliRunner().invoke(error_group(RuntimeError("a real bug")), ["boom"])
    assert result.exit_code == 1 and isinstance(result.exception, RuntimeError)


def test_console_entry_point_runs() -> None:
    result = subprocess.run([sys.executable, "-m", "adapterkit", "plugins", "--json"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "builtins" in {entry["name"] for entry in json.loads(result.stdout)}
    unknown = subprocess.run([sys.executable, "-m", "adapterkit", "no-such-command"], capture_output=True, text=True)
    assert unknown.returncode == 2 and "No such command 'no-such-command'" in unknown.stderr
