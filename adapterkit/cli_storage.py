"""``adapterkit inspect``, ``ls`` and ``cp``: adapter files at any fsspec URL."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

import click

from .storage import cp, inspect, ls, parse_options
from .storage.errors import printable

F = TypeVar("F", bound=Callable[..., Any])


def _options_flag(name: str, short: str | None, help_text: str) -> Callable[[F], F]:
    decls = [f"--{name}"] + ([short] if short else [])
    return click.option(*decls, "options_" + name.replace("-", "_"), multiple=True, metavar="KEY=VALUE",
                        help=help_text)


storage_option = _options_flag(
    "storage-option", "-o",
    "fsspec storage option (repeatable), e.g. -o anon=true -o client_kwargs.endpoint_url=http://host:9000; "
    "values parse as JSON when they can, dotted keys nest.",
)
json_flag = click.option(
    "--json", "as_json", is_flag=True, help="Print the report as JSON on stdout (status lines go to stderr)."
)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


@click.command("inspect")
@click.argument("url")
@storage_option
@json_flag
def inspect_command(url: str, options_storage_option: tuple[str, ...], as_json: bool) -> None:
    """Describe an adapter file from its header only (ranged reads): recipe, format
    version, plugins, sites, tensors, sizes."""
    info = inspect(url, storage_options=parse_options(options_storage_option))
    click.echo(json.dumps(info.to_dict(), indent=2) if as_json else str(info))


@click.command("ls")
@click.argument("url")
@storage_option
@json_flag
@click.option("--clean", is_flag=True,
              help="First abort the unfinished S3 multipart uploads under URL (left by killed saves; "
                   "also aborts uploads of saves still running there).")
def ls_command(url: str, options_storage_option: tuple[str, ...], as_json: bool, clean: bool) -> None:
    """List the adapters (*.safetensors) under a URL prefix: name, size, kind, method.
    A prefix that does not exist is an error."""
    entries = ls(url, storage_options=parse_options(options_storage_option), clean=clean)
    if as_json:
        click.echo(json.dumps([e.to_dict() for e in entries], indent=2))
        return
    if not entries:
        click.echo(printable(f"no adapter files under {url}"))
        return
    # names, kinds and methods come from the listing and the files: printed escaped, cut
    names = [printable(e.name, 200) for e in entries]
    width = max(24, *(len(name) for name in names))
    click.echo(f"{'name':<{width}} {'size':>10}  {'kind':<12} {'method':<28} {'digest'}")
    for name, e in zip(names, entries, strict=True):
        if e.info is None:
            click.echo(f"{name:<{width}} {_size(e.size):>10}  {'?':<12} {'error: ' + printable(str(e.error))}")
            continue
        digest = (e.info.digest or "none").removeprefix("sha256:")[:12]
        kind, method = printable(e.info.kind, 40), printable(e.info.method, 80)
        click.echo(f"{name:<{width}} {_size(e.size):>10}  {kind:<12} {method:<28} {digest}")


@click.command("cp")
@click.argument("src")
@click.argument("dst")
@storage_option
@_options_flag("src-option", None, "storage option for SRC only (repeatable KEY=VALUE).")
@_options_flag("dst-option", None, "storage option for DST only (repeatable KEY=VALUE).")
@json_flag
def cp_command(
    src: str, dst: str, options_storage_option: tuple[str, ...], options_src_option: tuple[str, ...],
    options_dst_option: tuple[str, ...], as_json: bool,
) -> None:
    """Copy an adapter file between URLs (e.g. local to s3://), verifying its digests on
    the way and writing atomically. A DST ending in / keeps the source's file name."""
    shared = parse_options(options_storage_option)
    info = cp(src, dst, storage_options={**shared, **parse_options(options_src_option)},
              dst_storage_options={**shared, **parse_options(options_dst_option)})
    if as_json:
        click.echo(json.dumps({"src": src, "dst": info.url, "size": info.size, "digest": info.digest}))
    else:
        click.echo(printable(f"copied {src} -> {info.url} ({_size(info.size)}, {info.digest or 'no digest'})"))


COMMANDS = (inspect_command, ls_command, cp_command)
