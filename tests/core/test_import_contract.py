"""The import contracts in ``.importlinter`` (import-linter): the core never imports a
plugin, plugins never import each other, and plugins reach the core only through
``adapterkit`` and ``adapterkit.plugin_api``. Checked on the real tree, and shown to
catch each kind of violation in a copy of the packages that shadows the installed ones.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"adapterkit": ROOT / "adapterkit", **{p.name: p for p in sorted((ROOT / "plugins").glob("adapterkit_*"))}}
LINT = shutil.which("lint-imports", path=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
needs_lint = pytest.mark.skipif(
    LINT is None, reason="lint-imports is not installed (import-linter: pip install -e '.[test]')"
)

CONTRACTS = {
    "core-never-imports-plugins": "The core (adapterkit) never imports a plugin",
    "plugins-independent": "Plugins never import each other",
    "plugins-use-plugin-api": "Plugins import the core only through adapterkit and adapterkit.plugin_api",
}


def _lint(cwd: Path, python_path: list[Path]) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` in ``cwd`` (its ``.importlinter``), the packages found on ``python_path`` first."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, python_path))}
    assert LINT is not None
    return subprocess.run(
        [LINT, "--no-cache", "--no-logo"], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


@needs_lint
def test_the_tree_keeps_every_contract() -> None:
    # this checkout's packages, whichever copy of adapterkit is installed
    result = _lint(ROOT, [ROOT, ROOT / "plugins"])
    assert result.returncode == 0, result.stdout + result.stderr
    for name in CONTRACTS.values():
        assert f"{name} KEPT" in result.stdout, result.stdout
    assert f"{len(CONTRACTS)} kept, 0 broken" in result.stdout


VIOLATIONS = [
    # (package, the module added to it, its code, the module it imports, the contract it breaks)
    # a lazy import inside a function counts like one at the top
    ("adapterkit", "_violation", "def lazy():\n    import adapterkit_mosa", "adapterkit_mosa",
     "core-never-imports-plugins"),
    ("adapterkit_zoo", "_violation", "from adapterkit.attach import attach", "adapterkit.attach",
     "plugins-use-plugin-api"),
    ("adapterkit_poly", "_violation", "import adapterkit_mosa", "adapterkit_mosa", "plugins-independent"),
]


@pytest.fixture(scope="module")
def copied(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """adapterkit and the plugin packages copied side by side, with the contracts."""
    base = tmp_path_factory.mktemp("contract")
    for name, path in PACKAGES.items():
        shutil.copytree(path, base / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / ".importlinter", base / ".importlinter")
    # the copy shadows the installed (editable) packages: grimp analyses the copy
    probe = "import adapterkit, adapterkit_mosa; print(adapterkit.__file__); print(adapterkit_mosa.__file__)"
    found = subprocess.run(
        [sys.executable, "-c", probe], env={**os.environ, "PYTHONPATH": str(base)}, cwd=base,
        capture_output=True, text=True, check=True, timeout=120,
    ).stdout.split()
    assert found == [str(base / "adapterkit" / "__init__.py"), str(base / "adapterkit_mosa" / "__init__.py")]
    return base


@needs_lint
@pytest.mark.parametrize(
    ("package", "module", "code", "imported", "contract"), VIOLATIONS, ids=[v[4] for v in VIOLATIONS]
)
def test_a_violation_breaks_its_contract(
    copied: Path, package: str, module: str, code: str, imported: str, contract: str
) -> None:
    added = copied / package / f"{module}.py"
    added.write_text(f'"""A deliberate violation of {contract}."""\n\n{code}\n')
    try:
        result = _lint(copied, [copied])
    finally:
        added.unlink()
    report = result.stdout + result.stderr
    assert result.returncode != 0, report
    assert f"{CONTRACTS[contract]} BROKEN" in report
    assert f"{package}.{module} -> {imported}" in report, report  # the offending import is named
