"""``adapterkit library init|add|rm|get|ls|select|rebuild``: adapter libraries at any fsspec URL."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import click

from .cli_help import SentenceGroup
from .cli_storage import json_flag, storage_option
from .library import Entry, Library
from .storage import parse_options
from .storage.errors import printable

src_option = click.option("--src-option", "options_src_option", multiple=True, metavar="KEY=VALUE",
                          help="storage option for SRC only (repeatable KEY=VALUE); -o applies to the library URL.")


def _library(url: str, options: Sequence[str]) -> Library:
    return Library(url, storage_options=parse_options(options))


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(n)


def _table(entries: list[Entry], empty: str) -> None:
    """Name, size, kind, method, task, tags: values come from the manifest, printed escaped and cut."""
    if not entries:
        click.echo(printable(empty))
        return
    rows = [(printable(e.name, 200), _size(e.size), printable(e.kind, 40), printable(e.method, 60),
             printable(e.task or "-", 60), printable(",".join(e.tags) or "-", 200)) for e in entries]
    header = ("name", "size", "kind", "method", "task", "tags")
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(5)]
    for row in (header, *rows):
        rest = (cell.ljust(width) for cell, width in zip(row[2:5], widths[2:], strict=True))
        cells = [row[0].ljust(widths[0]), row[1].rjust(widths[1]), *rest]
        click.echo("  ".join([*cells, row[5]]).rstrip())


def _describe(entry: Entry) -> str:
    lines = [
        f"name      {entry.name}",
        f"url       {entry.url}",
        f"content   {entry.content}",
        f"method    {entry.method}",
        f"size      {entry.size:,} bytes",
        f"digest    {entry.digest or 'none'}",
        f"task      {entry.task or '-'}",
        f"tags      {', '.join(entry.tags) or '-'}",
        f"base      {entry.base or '-'}",
        f"sites     {len(entry.sites)}: {', '.join(entry.sites[:8])}{' ...' if len(entry.sites) > 8 else ''}",
    ]
    for site, shape in sorted((entry.base_shapes or {}).items())[:8]:
        lines.append(f"base      {site}: {list(shape)}")
    if entry.recipe is not None:
        lines.append(f"recipe    {json.dumps(entry.recipe, sort_keys=True)}")
    lines += [f"tensor    {name} {list(shape)}" for name, shape in list(entry.tensors.items())[:32]]
    return "\n".join(printable(line, 4000) for line in lines)


@click.group("library", cls=SentenceGroup)
def library_group() -> None:
    """Adapter libraries: many adapters under one URL prefix, indexed by a manifest
    (adapterkit-library.json) so that listing and selecting cost a few requests, never
    one per adapter. Safe under concurrent writers (see docs/libraries.md)."""


@library_group.command("init")
@click.argument("url")
@storage_option
@json_flag
@click.option("--exist-ok", is_flag=True, help="Succeed if URL already is a library.")
def init_command(url: str, options_storage_option: tuple[str, ...], as_json: bool, exist_ok: bool) -> None:
    """Create an empty library at URL (a prefix). To index adapters already there, use rebuild."""
    lib = Library.init(url, storage_options=parse_options(options_storage_option), exist_ok=exist_ok)
    click.echo(json.dumps({"url": lib.url}) if as_json else printable(f"library created at {lib.url}"))


@library_group.command("add")
@click.argument("url")
@click.argument("src")
@click.option("--name", help="Entry name (default: SRC's file name without .safetensors).")
@click.option("--task", help="The task the adapter was trained for (for select).")
@click.option("--tag", "tags", multiple=True, help="A tag (repeatable).")
@click.option("--base", help="Your name for the base model (for select).")
@storage_option
@src_option
@json_flag
def add_command(
    url: str, src: str, name: str | None, task: str | None, tags: tuple[str, ...], base: str | None,
    options_storage_option: tuple[str, ...], options_src_option: tuple[str, ...], as_json: bool,
) -> None:
    """Copy the adapter file SRC (any URL; digests verified) into the library at URL."""
    entry = _library(url, options_storage_option).add(
        src, name, task=task, tags=tags, base=base, storage_options=parse_options(options_src_option))
    if as_json:
        click.echo(json.dumps(entry.to_dict(), indent=2))
    else:
        click.echo(printable(f"added {entry.name} ({entry.method}, {_size(entry.size)}) -> {entry.url}"))


@library_group.command("rm")
@click.argument("url")
@click.argument("names", nargs=-1, required=True)
@storage_option
@json_flag
def rm_command(url: str, names: tuple[str, ...], options_storage_option: tuple[str, ...], as_json: bool) -> None:
    """Remove entries (and their files) from the library at URL."""
    lib = _library(url, options_storage_option)
    removed = [lib.remove(name) for name in names]
    if as_json:
        click.echo(json.dumps([e.to_dict() for e in removed], indent=2))
    else:
        for entry in removed:
            click.echo(printable(f"removed {entry.name}"))


@library_group.command("get")
@click.argument("url")
@click.argument("name")
@storage_option
@json_flag
def get_command(url: str, name: str, options_storage_option: tuple[str, ...], as_json: bool) -> None:
    """Show one entry (from the manifest: no adapter file is read) and the URL to load."""
    entry = _library(url, options_storage_option).get(name)
    click.echo(json.dumps(entry.to_dict(), indent=2) if as_json else _describe(entry))


@library_group.command("ls")
@click.argument("url")
@storage_option
@json_flag
def ls_command(url: str, options_storage_option: tuple[str, ...], as_json: bool) -> None:
    """List every entry of the library at URL (name, size, kind, method, task, tags)."""
    entries = _library(url, options_storage_option).entries()
    if as_json:
        click.echo(json.dumps([e.to_dict() for e in entries], indent=2))
    else:
        _table(entries, f"library {url} is empty")


@library_group.command("select")
@click.argument("url")
@click.option("--task", "tasks", multiple=True, help="Task (repeatable: any of them).")
@click.option("--tag", "tags", multiple=True, help="Tag (repeatable: all of them).")
@click.option("--kind", "kinds", multiple=True, help="Adapter kind, e.g. lora (repeatable: any).")
@click.option("--method", "methods", multiple=True, help="Method, e.g. lora+mosa (repeatable: any).")
@click.option("--base", "bases", multiple=True, help="Base model name (repeatable: any).")
@click.option("--content", "contents", multiple=True, type=click.Choice(["adapter", "tensors"]))
@click.option("--name", "pattern", help="Glob on entry names, e.g. 'skills/*'.")
@storage_option
@json_flag
def select_command(
    url: str, tasks: tuple[str, ...], tags: tuple[str, ...], kinds: tuple[str, ...], methods: tuple[str, ...],
    bases: tuple[str, ...], contents: tuple[str, ...], pattern: str | None, options_storage_option: tuple[str, ...],
    as_json: bool,
) -> None:
    """Entries matching every criterion given, from the manifest alone (no tensor is read)."""
    criteria: dict[str, Any] = {key: value for key, value in (
        ("task", tasks), ("tags", tags), ("kind", kinds), ("method", methods), ("base", bases),
        ("content", contents)) if value}
    entries = _library(url, options_storage_option).select(name=pattern, **criteria)
    if as_json:
        click.echo(json.dumps([e.to_dict() for e in entries], indent=2))
    else:
        _table(entries, "no entry matches")


@library_group.command("rebuild")
@click.argument("url")
@click.option("--dry-run", is_flag=True, help="Only report what differs (works on read-only URLs).")
@storage_option
@json_flag
def rebuild_command(url: str, dry_run: bool, options_storage_option: tuple[str, ...], as_json: bool) -> None:
    """Recreate the manifest from the adapter files' headers (one ranged read each): for a
    prefix of adapters without a manifest, or one whose files changed behind its back."""
    report = _library(url, options_storage_option).rebuild(dry_run=dry_run)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
        return
    verb = "would " if dry_run else ""
    click.echo(f"{verb}add {len(report.added)}, {verb}update {len(report.changed)}, {verb}remove "
               f"{len(report.removed)}, keep {report.kept}, skip {len(report.skipped)}")
    for name in report.added:
        click.echo(printable(f"  + {name}"))
    for name in report.changed:
        click.echo(printable(f"  ~ {name}"))
    for name in report.removed:
        click.echo(printable(f"  - {name}"))
    for file, reason in report.skipped:
        click.echo(printable(f"  skipped {file}: {reason}", 1000))


COMMANDS = (library_group,)
