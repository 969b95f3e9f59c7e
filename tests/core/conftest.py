"""Fixtures of the core tests: sample plugin packages installed for real, fresh hosts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import adapterkit_builtins
import attrs
import pytest

from adapterkit import PluginHost

SAMPLES = Path(__file__).resolve().parents[1] / "sample_plugins"
PLUGIN_ENV = ("ADAPTERKIT_DISABLE_PLUGIN_AUTOLOAD", "ADAPTERKIT_PLUGINS", "ADAPTERKIT_BLOCK_PLUGINS")


@attrs.frozen
class Installed:
    """Target folders of the sample plugin packages, each installed with ``pip --target``."""

    stripes: Path
    broken: Path


def pip_install(package: str, base: Path) -> Path:
    """``pip install --target`` one sample package from a copy (its build litter stays out of the repo)."""
    source = base / f"{package}-src"
    shutil.copytree(SAMPLES / package, source)
    target = base / f"{package}-site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-input",
         "--disable-pip-version-check", "--target", str(target), str(source)],
        check=True, capture_output=True, text=True,
    )
    return target


@pytest.fixture(scope="session")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    base = tmp_path_factory.mktemp("sample_plugins")
    return Installed(pip_install("adapterkit_stripes", base), pip_install("adapterkit_broken", base))


@pytest.fixture(autouse=True)
def clean_plugin_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test inherits the plugin switches from the caller's shell."""
    for name in PLUGIN_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def with_stripes(installed: Installed, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The stripes package importable (and its entry point visible) for this test only."""
    monkeypatch.syspath_prepend(str(installed.stripes))
    return installed.stripes


@pytest.fixture
def with_broken(installed: Installed, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.syspath_prepend(str(installed.broken))
    return installed.broken


@pytest.fixture
def subprocess_env() -> Callable[..., dict[str, str]]:
    """Environment for an ``adapterkit`` subprocess that sees the given plugin folders."""

    def make(*paths: Path, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in PLUGIN_ENV}
        env["PYTHONPATH"] = os.pathsep.join([*map(str, paths), *filter(None, [env.get("PYTHONPATH")])])
        env.update(extra)
        return env

    return make


@pytest.fixture
def builtin_host() -> PluginHost:
    """A fresh host holding exactly the built-in plugin (independent of what else is installed)."""
    host = PluginHost()
    assert host.register(adapterkit_builtins, "builtins", version="test") is not None
    return host


def _discover() -> PluginHost:
    host = PluginHost()
    host.load_entry_points()
    return host


@pytest.fixture
def discover() -> Callable[[], PluginHost]:
    """Make a fresh host that discovers entry points as a user's process would (call it after
    setting the environment and ``sys.path``)."""
    return _discover
