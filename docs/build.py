"""Build the docs: regenerate the reference pages, then render every page to HTML.

``python docs/build.py`` (or ``nox -s docs``) writes ``docs/reference/hooks.md`` from the
hook specs and ``docs/reference/cli.md`` from the click commands, then renders all
Markdown pages into ``docs/_build/`` (HTML when the ``markdown`` package is installed,
Markdown copies otherwise). ``python docs/build.py --check`` fails if the committed
reference pages are stale.
"""

from __future__ import annotations

import argparse
import inspect
import os
import shutil
import sys

import click

DOCS = os.path.dirname(os.path.abspath(__file__))


def hook_reference() -> str:
    from adapterkit import hookspecs

    lines = [
        "# Hook reference",
        "",
        "Generated from `adapterkit/hookspecs.py` by `docs/build.py`; a test keeps it in sync.",
        "Implement any of these in a plugin module with `@adapterkit.hookimpl`.",
        "",
    ]
    for name, func in sorted(vars(hookspecs).items()):
        if not (name.startswith("adapterkit_") and callable(func)):
            continue
        sig = str(inspect.signature(func)).replace("'", "")
        lines += [f"## `{name}{sig}`", "", inspect.cleandoc(func.__doc__ or ""), ""]
    return "\n".join(lines).rstrip() + "\n"


def cli_reference() -> str:
    from adapterkit.cli import cli

    lines = ["# CLI reference", "", "Generated from the click commands by `docs/build.py`.", ""]

    def walk(command: click.Command, path: list[str]) -> None:
        ctx = click.Context(command, info_name=" ".join(path))
        lines.extend([f"## `{' '.join(path)}`", "", "```text", command.get_help(ctx), "```", ""])
        if isinstance(command, click.Group):
            for sub in command.list_commands(ctx):
                child = command.get_command(ctx, sub)
                if child is not None:
                    walk(child, [*path, sub])

    walk(cli, ["adapterkit"])
    return "\n".join(lines).rstrip() + "\n"


GENERATED = {"reference/hooks.md": hook_reference, "reference/cli.md": cli_reference}
CHECKED = ("reference/hooks.md",)  # the CLI page depends on which plugins are installed


def render(out_dir: str) -> None:
    try:
        import markdown  # type: ignore[import-untyped]
    except ImportError:
        markdown = None
    shutil.rmtree(out_dir, ignore_errors=True)
    for root, _, files in os.walk(DOCS):
        if root.startswith(out_dir) or "/examples/" in root + "/":
            continue
        for name in files:
            if not name.endswith(".md"):
                continue
            src = os.path.join(root, name)
            rel = os.path.relpath(src, DOCS)
            text = open(src, encoding="utf-8").read()
            if markdown is not None:
                body = markdown.markdown(text, extensions=["fenced_code", "tables"])
                dest, content = rel[:-3] + ".html", f"<!doctype html><meta charset=utf-8><body>{body}</body>"
            else:
                dest, content = rel, text
            path = os.path.join(out_dir, dest)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(content)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if generated pages are stale")
    args = parser.parse_args()
    stale = []
    for rel, make in GENERATED.items():
        path = os.path.join(DOCS, rel)
        text = make()
        current = open(path, encoding="utf-8").read() if os.path.exists(path) else None
        if current != text:
            if rel in CHECKED:
                stale.append(rel)
            if not args.check:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "w", encoding="utf-8") as fh:
                    fh.write(text)
    if args.check:
        if stale:
            print(f"stale generated docs: {', '.join(stale)}; run python docs/build.py", file=sys.stderr)
            return 1
        return 0
    render(os.path.join(DOCS, "_build"))
    print(f"docs built in {os.path.join(DOCS, '_build')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
