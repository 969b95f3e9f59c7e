"""The one error type of the storage layer, and the escaping of text that files supply."""

from __future__ import annotations

from ..errors import AdapterkitError

MAX_MESSAGE = 2000  # characters of one error line (a crafted file can name 100 MB strings)


def printable(text: str, limit: int | None = None) -> str:
    """``text`` on one line with no control characters: every character ``isprintable``
    refuses (newlines, escape sequences, bidi overrides, lone surrogates, ...) is written
    as a Python escape (``\\n``, ``\\x1b``, ``\\u202e``, ``\\ud800``). ``limit`` truncates."""
    if limit is not None and len(text) > limit:
        text = text[:limit] + "..."
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else _escape(ch) for ch in text)


def _escape(ch: str) -> str:
    code = ord(ch)
    if code < 0x100:
        return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(ch, f"\\x{code:02x}")
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


class StorageError(AdapterkitError):
    """A URL cannot be opened, read or written, or a file is not a valid adapter.

    The message is always one printable line (see :func:`printable`): messages quote
    names and values taken from untrusted files, and the CLI prints them as they are."""

    def __init__(self, message: object = "", *args: object) -> None:
        super().__init__(printable(str(message), MAX_MESSAGE), *args)
