"""Build the docs: regenerate the reference pages, then render every page to HTML.

``python docs/build.py`` (or ``nox -s docs``) writes ``docs/reference/hooks.md`` from the
hook specs and ``docs/reference/cli.md`` from the click commands (adapterkit's own
plugins only, so the page does not depend on what else is installed), then renders all
Markdown pages into ``docs/_build/`` with a navigation bar (HTML when ``markdown`` or
``markdown-it-py`` is installed, Markdown copies otherwise). ``python docs/build.py
--check`` fails if the committed reference pages are stale.
"""

from __future__ import annotations

import argparse
import html
import inspect
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator

import click

DOCS = os.path.dirname(os.path.abspath(__file__))
HELP_WIDTH = 100  # fixed, so the generated page does not depend on the terminal

# The navigation, in reading order: (title, page). Every page under docs/ appears here.
NAV: list[tuple[str, str]] = [
    ("Home", "index.md"),
    ("Quickstart", "quickstart.md"),
    ("Walkthrough", "walkthrough.md"),
    ("Concepts", "concepts.md"),
    ("MoSA", "methods/mosa.md"),
    ("Poly", "methods/poly.md"),
    ("MHR", "methods/mhr.md"),
    ("Averaging and merging", "methods/averaging.md"),
    ("Stacking and merging experts", "methods/merging.md"),
    ("Arrow: zero-shot routing", "methods/arrow.md"),
    ("Workflows", "workflows.md"),
    ("Storage", "storage.md"),
    ("Expert libraries", "libraries.md"),
    ("Serving many adapters", "serving.md"),
    ("Coming from PEFT", "coming-from-peft.md"),
    ("PEFT interop", "peft.md"),
    ("Hugging Face: Trainer, accelerate, generate", "huggingface.md"),
    ("Writing a plugin", "plugins.md"),
    ("Benchmarks", "benchmarks.md"),
    ("CLI reference", "reference/cli.md"),
    ("Hook reference", "reference/hooks.md"),
]


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


def builtin_cli() -> click.Group:
    """A fresh root group holding adapterkit's own commands plus those its own plugins add.

    Built apart from ``adapterkit.cli.cli``, whose plugin commands depend on what is
    installed (and, in a test session, on sample plugins registered earlier).
    """
    from importlib import metadata

    from adapterkit import cli as cli_module
    from adapterkit.cli_library import COMMANDS as LIBRARY_COMMANDS
    from adapterkit.cli_storage import COMMANDS as STORAGE_COMMANDS
    from adapterkit.cli_workflows import COMMANDS as WORKFLOW_COMMANDS
    from adapterkit.plugins import BUILTIN_DISTRIBUTION, ENTRY_POINT_GROUP, PluginHost

    host = PluginHost()
    host.load_entry_points(
        ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)
        if ep.dist is not None and ep.dist.name == BUILTIN_DISTRIBUTION
    )
    root = cli_module.cli
    group = click.Group(root.name, callback=root.callback, params=list(root.params), help=root.help)
    for command in (cli_module.plugins_command, *STORAGE_COMMANDS, *WORKFLOW_COMMANDS, *LIBRARY_COMMANDS):
        group.add_command(command)
    for impl in host.pm.hook.adapterkit_register_commands.get_hookimpls():
        impl.function(cli=group)
    return group


def _walk(command: click.Command, path: list[str]) -> Iterator[tuple[list[str], click.Command, click.Context]]:
    ctx = click.Context(command, info_name=" ".join(path), terminal_width=HELP_WIDTH, max_content_width=HELP_WIDTH)
    yield path, command, ctx
    if isinstance(command, click.Group):
        for sub in command.list_commands(ctx):
            child = command.get_command(ctx, sub)
            if child is not None:
                yield from _walk(child, [*path, sub])


def cli_reference() -> str:
    entries = list(_walk(builtin_cli(), ["adapterkit"]))
    lines = [
        "# CLI reference",
        "",
        "Generated from the click commands by `docs/build.py` (adapterkit and its own plugins;",
        "a plugin you install may add more: `adapterkit --help` lists them). Every command",
        "prints one `error: ...` line and exits 1 on bad input.",
        "",
        "| command | what it does |",
        "| --- | --- |",
    ]
    for path, command, _ in entries[1:]:
        anchor = "-".join(path)
        lines.append(f"| [`{' '.join(path)}`](#{anchor}) | {command.get_short_help_str(limit=90)} |")
    lines.append("")
    for path, command, ctx in entries:
        lines += [f'<a id="{"-".join(path)}"></a>', "", f"## `{' '.join(path)}`", ""]
        lines += ["```text", command.get_help(ctx), "```", ""]
    return "\n".join(lines).rstrip() + "\n"


GENERATED: dict[str, Callable[[], str]] = {"reference/hooks.md": hook_reference, "reference/cli.md": cli_reference}


def pages() -> list[str]:
    """Every Markdown page of the docs (relative paths), examples and build output excluded."""
    found = []
    for root, dirs, files in os.walk(DOCS):
        dirs[:] = [d for d in dirs if d not in ("_build", "examples")]
        found += [os.path.relpath(os.path.join(root, f), DOCS) for f in files if f.endswith(".md")]
    return sorted(found)


def assets() -> list[str]:
    """Images and result files under docs/ (e.g. ``benchmarks/*.png``), build output excluded."""
    found = []
    for root, dirs, files in os.walk(DOCS):
        dirs[:] = [d for d in dirs if d not in ("_build", "examples")]
        found += [os.path.relpath(os.path.join(root, f), DOCS) for f in files if f.endswith((".png", ".svg", ".json"))]
    return sorted(found)


def _to_html(text: str) -> str | None:
    try:
        import markdown  # type: ignore[import-untyped]

        return str(markdown.markdown(text, extensions=["fenced_code", "tables"]))
    except ImportError:
        pass
    try:
        from markdown_it import MarkdownIt
    except ImportError:
        return None
    return str(MarkdownIt("commonmark", {"html": True}).enable("table").render(text))


def slug(heading: str) -> str:
    """GitHub's heading anchor: lower case, markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"<[^>]+>|[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", html.unescape(text)).replace(" ", "-")


def _heading_ids(body: str) -> str:
    def add_id(match: re.Match[str]) -> str:
        level, inner = match.group(1), match.group(2)
        return f'<h{level} id="{html.escape(slug(inner))}">{inner}</h{level}>'

    return re.sub(r"<h([1-6])>(.*?)</h\1>", add_id, body, flags=re.S)


def _relink(text: str, rel: str, out_dir: str) -> str:
    """Point Markdown links at the rendered site: pages become ``.html``; other files
    (examples, sources outside ``docs/``) are linked where they are, from ``out_dir``."""
    page_dir = os.path.dirname(os.path.join(DOCS, rel))
    out_page_dir = os.path.dirname(os.path.join(out_dir, rel))

    def fix(match: re.Match[str]) -> str:
        label, target = match.group(1), match.group(2)
        path, hash_, anchor = target.partition("#")
        if not path or re.match(r"[a-z]+:", path):
            return match.group(0)
        resolved = os.path.normpath(os.path.join(page_dir, path))
        inside = os.path.relpath(resolved, DOCS)
        if resolved.endswith(".md") and not inside.startswith(("..", "examples")):
            path = path[:-3] + ".html"
        else:
            path = os.path.relpath(resolved, out_page_dir)
        return f"[{label}]({path}{hash_}{anchor})"

    return re.sub(r"(?<!!)\[([^\]]*)\]\(([^)\s]+)\)", fix, text)


def _nav_html(current: str) -> str:
    up = os.path.relpath(DOCS, os.path.join(DOCS, os.path.dirname(current)))
    items = []
    for title, page in NAV:
        if not os.path.exists(os.path.join(DOCS, page)):
            continue  # a page another change has yet to add
        href = html.escape(os.path.normpath(os.path.join(up, page[:-3] + ".html")))
        mark = ' aria-current="page"' if page == current else ""
        items.append(f'<li><a href="{href}"{mark}>{html.escape(title)}</a></li>')
    return f"<nav><ul>{''.join(items)}</ul></nav>"


STYLE = (
    "body{display:flex;gap:2em;font-family:sans-serif;max-width:75em;margin:auto;line-height:1.5}"
    "nav{min-width:13em}nav ul{list-style:none;padding:0}main{min-width:0;flex:1}"
    "pre{background:#f4f4f4;padding:.6em;overflow-x:auto}table{border-collapse:collapse}"
    "td,th{border:1px solid #ccc;padding:.2em .5em}[aria-current]{font-weight:bold}"
)


def render(out_dir: str) -> bool:
    """Render every page into ``out_dir``; returns whether the output is HTML."""
    shutil.rmtree(out_dir, ignore_errors=True)
    as_html = _to_html("") is not None
    for rel in pages():
        text = open(os.path.join(DOCS, rel), encoding="utf-8").read()
        if as_html:
            body = _heading_ids(_to_html(_relink(text, rel, out_dir)) or "")
            title = text.splitlines()[0].lstrip("# ") if text else rel
            dest = rel[:-3] + ".html"
            content = (
                f"<!doctype html><meta charset=utf-8><title>{html.escape(title)} - adapterkit</title>"
                f"<style>{STYLE}</style><body>{_nav_html(rel)}<main>{body}</main></body>"
            )
        else:
            dest, content = rel, text
        path = os.path.join(out_dir, dest)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(content)
    for rel in assets():  # plots and result files the pages show or link, copied as they are
        os.makedirs(os.path.dirname(os.path.join(out_dir, rel)), exist_ok=True)
        shutil.copyfile(os.path.join(DOCS, rel), os.path.join(out_dir, rel))
    return as_html


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if generated pages are stale")
    args = parser.parse_args()
    stale = []
    for rel, make in GENERATED.items():
        path = os.path.join(DOCS, rel)
        text = make()
        current = open(path, encoding="utf-8").read() if os.path.exists(path) else None
        if current != text:
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
    if stale:
        print(f"regenerated {', '.join(stale)}")
    out = os.path.join(DOCS, "_build")
    as_html = render(out)
    print(f"docs built in {out} ({'HTML' if as_html else 'Markdown copies: pip install markdown for HTML'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
