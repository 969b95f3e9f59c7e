"""Small helpers for messages users read."""

from __future__ import annotations


def plural(count: int, noun: str, many: str | None = None) -> str:
    """``1 seed``, ``2 seeds``, ``1,024 sites`` (``many``: an irregular plural, e.g. ``processes``)."""
    return f"{count:,} {noun if count == 1 else many or noun + 's'}"
