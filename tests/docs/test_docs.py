"""The docs stay true: the hook reference matches the hook specs, and every Python
example in the docs runs (the example plugin package installed for real)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

import adapterkit
from adapterkit.plugins import set_host

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOCS = os.path.join(ROOT, "docs")
sys.path.insert(0, DOCS)
import build  # noqa: E402  (docs/build.py)

PAGES = sorted(
    os.path.relpath(os.path.join(root, name), DOCS)
    for root, _, names in os.walk(DOCS)
    if "_build" not in root and "examples" not in root
    for name in names
    if name.endswith(".md")
)


def python_blocks(page: str) -> list[str]:
    text = open(os.path.join(DOCS, page), encoding="utf-8").read()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_hook_reference_in_sync_with_hookspecs() -> None:
    committed = open(os.path.join(DOCS, "reference", "hooks.md"), encoding="utf-8").read()
    assert committed == build.hook_reference(), "run python docs/build.py"
    for name in dir(adapterkit.hookspecs):
        if name.startswith("adapterkit_register"):
            assert f"## `{name}(" in committed


@pytest.fixture(scope="module")
def example_plugin(tmp_path_factory: pytest.TempPathFactory) -> str:
    """pip-install docs/examples/adapterkit_softmax for real into a private target dir."""
    target = str(tmp_path_factory.mktemp("softmax_plugin"))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", target,
         os.path.join(DOCS, "examples", "adapterkit_softmax")],
        check=True,
    )
    sys.path.insert(0, target)
    set_host(None)
    yield target
    sys.path.remove(target)
    set_host(None)


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)])
def test_docs_examples_run(page: str, example_plugin: str) -> None:
    namespace: dict[str, object] = {"__name__": f"docs_{page}"}
    for block in python_blocks(page):
        exec(compile(block, f"docs/{page}", "exec"), namespace)  # noqa: S102


def test_example_plugin_discovered(example_plugin: str) -> None:
    host = adapterkit.PluginHost()
    host.load_entry_points()
    assert host.plugins["softmax"].provides == {"router": ["softmax"]}
    assert host.plugins["softmax"].version == "0.1.0"
