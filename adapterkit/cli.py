"""The ``adapterkit`` command line (click). Plugins add commands through a hook."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from .cli_help import SentenceGroup
from .errors import AdapterkitError
from .plugins import ROLE_HOOKS, PluginFailure, get_host


class AdapterkitGroup(SentenceGroup):
    """Root group: user errors print one actionable line and exit 1, no traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except AdapterkitError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)

    def _plugin_commands(self) -> None:
        if getattr(self, "_plugins_added", False):
            return
        self._plugins_added = True
        host = get_host()
        for impl in host.pm.hook.adapterkit_register_commands.get_hookimpls():
            try:  # one by one: a plugin whose hook raises (or exits) must not take the CLI down
                impl.function(*[{"cli": self}[arg] for arg in impl.argnames])
            except (Exception, SystemExit) as exc:
                failure = PluginFailure(impl.plugin_name, f"{type(exc).__name__}: {exc}")
                host.failures.append(failure)
                click.echo(f"warning: {failure}", err=True)

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The usual help, then the plugins that failed to load (by name, with the reason):
        a broken plugin leaves the CLI working and says which it is."""
        super().format_help(ctx, formatter)
        failures = get_host().failures
        if failures:
            with formatter.section("Plugins that failed to load (adapterkit plugins: details)"):
                formatter.write_dl([(repr(f.name), f"failed to load ({f.reason()})") for f in failures])

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._plugin_commands()
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is None:
            self._plugin_commands()
            command = super().get_command(ctx, cmd_name)
        return command


@click.group(cls=AdapterkitGroup)
@click.version_option(package_name="adapterkit")
def cli() -> None:
    """Modular and sparse adapter tuning of frozen pretrained PyTorch models."""


@cli.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def plugins_command(as_json: bool) -> None:
    """List plugins, their versions and what each provides per role."""
    host = get_host()
    infos = sorted(host.plugins.values(), key=lambda p: p.name)
    if as_json:
        click.echo(json.dumps([p.to_dict() for p in infos], indent=2))
    else:
        click.echo(f"{'plugin':<20} {'version':<10} provides")
        for info in infos:
            provides = "; ".join(f"{role}: {', '.join(names)}" for role, names in info.provides.items())
            click.echo(f"{info.name:<20} {info.version:<10} {provides or '-'}")
    for failure in host.failures:
        click.echo(f"warning: {failure}", err=True)


def main() -> None:
    cli()


__all__ = ["ROLE_HOOKS", "cli", "main"]

from .cli_storage import cp_command, inspect_command, ls_command  # noqa: E402

cli.add_command(inspect_command)
cli.add_command(ls_command)
cli.add_command(cp_command)

from .cli_workflows import COMMANDS as WORKFLOW_COMMANDS  # noqa: E402

for _command in WORKFLOW_COMMANDS:
    cli.add_command(_command)

from .cli_library import COMMANDS as LIBRARY_COMMANDS  # noqa: E402

for _command in LIBRARY_COMMANDS:
    cli.add_command(_command)
