"""Help output shared by the command groups."""

from __future__ import annotations

import click


class SentenceGroup(click.Group):
    """A group whose command list shows each command's whole first sentence (wrapped),
    not click's cut-off ``Few-shot adaptation of a trained skill...``."""

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = []
        for name in self.list_commands(ctx):
            command = self.get_command(ctx, name)
            if command is not None and not command.hidden:
                rows.append((name, command.get_short_help_str(limit=1000)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)
