"""The one error type of the storage layer."""

from __future__ import annotations

from ..errors import AdapterkitError


class StorageError(AdapterkitError):
    """A URL cannot be opened, read or written, or a file is not a valid adapter."""
