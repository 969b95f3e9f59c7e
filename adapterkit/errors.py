"""Exception types. Every error a user can cause derives from :class:`AdapterkitError`
so the CLI can print it as one line and exit non-zero."""

from __future__ import annotations


class AdapterkitError(Exception):
    """Base class for errors caused by user input (recipes, names, files, URLs)."""


class UnknownNameError(AdapterkitError, KeyError):
    """A registry was asked for a name it does not hold."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0])


class DuplicateNameError(AdapterkitError):
    """Two plugins registered the same name in one registry."""


class RecipeError(AdapterkitError):
    """A recipe is malformed: unknown key, wrong type or out-of-range value."""


class AttachError(AdapterkitError):
    """A recipe cannot be applied to a model; names the site and the reason."""

    def __init__(self, site: str | None, reason: str) -> None:
        self.site = site
        self.reason = reason
        where = f"site {site!r}: " if site else ""
        super().__init__(f"cannot attach: {where}{reason}")


class RoutingError(AdapterkitError):
    """Task ids are missing, out of range or do not fit the batch."""
