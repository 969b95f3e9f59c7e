"""A broken plugin never takes the CLI down and is named wherever it matters:

- a plugin that raises ``SystemExit`` at import, in a registration hook or in its command
  hook: ``adapterkit --help`` and ``adapterkit plugins`` still work (exit 0) and name it;
- a name that only a plugin which did not load could provide (``unknown adapter kind
  'lora'`` with the built-ins broken or blocked) names that plugin and why.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
from click.testing import CliRunner
from torch import nn

import adapterkit
from adapterkit import PluginHost, UnknownNameError
from adapterkit.plugins import set_host

EXITS = {
    "at_import.py": "raise SystemExit(3)\n",
    "at_register.py": (
        "import sys\n"
        "from adapterkit import hookimpl\n\n"
        "@hookimpl\n"
        "def adapterkit_register_splitters(registry):\n"
        "    sys.exit(4)\n"
    ),
    "at_commands.py": (
        "from adapterkit import hookimpl\n\n"
        "@hookimpl\n"
        "def adapterkit_register_commands(cli):\n"
        "    raise SystemExit(5)\n"
    ),
}


@pytest.fixture
def exiting_plugins(tmp_path: Path) -> Path:
    """An installed distribution (a package and its .dist-info on the path) with three
    entry points that each exit: at import, in a registration hook, in the command hook."""
    package = tmp_path / "akexits"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name, source in EXITS.items():
        (package / name).write_text(source)
    info = tmp_path / "akexits-0.0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: akexits\nVersion: 0.0.1\n")
    (info / "entry_points.txt").write_text(
        "[adapterkit]\n"
        "exits_at_import = akexits.at_import\n"
        "exits_at_register = akexits.at_register\n"
        "exits_at_commands = akexits.at_commands\n"
    )
    return tmp_path


def _run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "adapterkit", *args], env=env, capture_output=True, text=True)


def test_plugins_exiting_at_import_or_in_hooks_do_not_take_the_cli_down(
    exiting_plugins: Path, subprocess_env: Callable[..., dict[str, str]]
) -> None:
    env = subprocess_env(exiting_plugins)
    helped = _run("--help", env=env)
    assert helped.returncode == 0, (helped.returncode, helped.stdout, helped.stderr)
    assert "Commands:" in helped.stdout and "train" in helped.stdout and "plugins" in helped.stdout
    section = helped.stdout[helped.stdout.index("Plugins that failed to load") :].splitlines()[1:]
    assert [" ".join(line.split()) for line in section] == [
        "'exits_at_import' failed to load (SystemExit: 3)",
        "'exits_at_register' failed to load (SystemExit: 4)",
        "'exits_at_commands' failed to load (SystemExit: 5)",
    ]
    assert helped.stderr == "warning: plugin 'exits_at_commands' failed to load: SystemExit: 5\n"

    listed = _run("plugins", env=env)
    assert listed.returncode == 0, (listed.returncode, listed.stdout, listed.stderr)
    names = {line.split()[0] for line in listed.stdout.splitlines()[1:]}
    assert {"builtins", "exits_at_commands"} <= names and not {"exits_at_import", "exits_at_register"} & names
    assert listed.stderr.splitlines() == [
        "warning: plugin 'exits_at_import' failed to load: SystemExit: 3",
        "warning: plugin 'exits_at_register' failed to load: SystemExit: 4",
    ]
    assert "Traceback" not in helped.stderr + listed.stderr


LORA = {"adapter": {"kind": "lora", "targets": ["0"]}}


def _unknown_lora(host: PluginHost) -> str:
    with pytest.raises(UnknownNameError) as info:
        adapterkit.attach(nn.Sequential(nn.Linear(4, 4)), LORA, host=host)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_unknown_kind_names_the_blocked_builtins(discover, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPTERKIT_BLOCK_PLUGINS", "builtins")
    message = _unknown_lora(discover())
    assert message.startswith("unknown adapter kind 'lora'; available: ")
    assert message.endswith("(plugin 'builtins' is blocked by ADAPTERKIT_BLOCK_PLUGINS and might provide it)")


def test_unknown_kind_names_the_broken_builtins() -> None:
    host = PluginHost()
    host.load_entry_points([EntryPoint("builtins", "akmissing_nowhere_module", "adapterkit")])
    message = _unknown_lora(host)
    assert message == (
        "unknown adapter kind 'lora'; available: none (plugin 'builtins' failed to load "
        "(ModuleNotFoundError: No module named 'akmissing_nowhere_module') and might provide it)"
    )


def test_unknown_names_list_every_plugin_that_did_not_load(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPTERKIT_BLOCK_PLUGINS", "blocked_one")
    monkeypatch.setenv("ADAPTERKIT_DISABLE_PLUGIN_AUTOLOAD", "1")
    host = PluginHost()
    host.load_entry_points(
        [EntryPoint("blocked_one", "akmissing.a", "adapterkit"), EntryPoint("left_out", "akmissing.b", "adapterkit")]
    )
    host.register(sys.modules[__name__], "plain")  # provides nothing
    with pytest.raises(UnknownNameError) as info:
        host.routers["poly"]
    assert str(info.value) == (
        "unknown router 'poly'; available: none (plugins that might provide it did not load: "
        "'blocked_one' is blocked by ADAPTERKIT_BLOCK_PLUGINS; 'left_out' is not enabled "
        "(ADAPTERKIT_DISABLE_PLUGIN_AUTOLOAD is set; add it to ADAPTERKIT_PLUGINS))"
    )
    clean = PluginHost()
    with pytest.raises(UnknownNameError, match=r"\(a plugin package providing it may need to be installed\)$"):
        clean.routers["poly"]


def test_unknown_adapt_mode_names_the_blocked_plugin(
    discover: Callable[[], PluginHost], monkeypatch: pytest.MonkeyPatch, restore_host: None
) -> None:
    from adapterkit.cli import cli

    monkeypatch.setenv("ADAPTERKIT_BLOCK_PLUGINS", "poly")
    set_host(discover())
    result = CliRunner().invoke(cli, ["adapt", "x.safetensors", "--task", "t", "--mode", "mhr-z"])
    assert result.exit_code == 2
    assert "unknown adaptation mode 'mhr-z'; available: none (plugin 'poly' is blocked by ADAPTERKIT_BLOCK_PLUGINS" in (
        " ".join(result.output.split())
    )
