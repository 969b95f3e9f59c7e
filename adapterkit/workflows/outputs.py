"""Fail before the work: every URL a run will write is checked before it starts.

A run that trains for an hour and then cannot save is an hour lost, so ``train``,
``adapt``, ``merge`` and ``heatmap`` check their output, checkpoint and report URLs up
front: a folder URL (``runs/``, or an existing folder), a read-only protocol
(``http(s)://``, ``zip://``, ...), or a local path whose folder cannot be created or
written is a one-line error naming the option. Nothing is created by the check.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from ..errors import AdapterkitError
from ..storage.errors import StorageError, printable
from ..storage.urls import resolve


class OutputError(AdapterkitError):
    """An output, checkpoint or report URL cannot be written."""


def check_writable(url: str, what: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Refuse ``url`` (the ``what`` of a run, e.g. ``output.adapter``) if a write to it must fail."""
    shown = repr(printable(url, 300))
    if not isinstance(url, str) or not url:
        raise OutputError(f"{what}: give a file URL, got {shown}")
    try:
        location = resolve(url, storage_options, write=True)  # folder URLs and read-only protocols
    except StorageError as exc:
        raise OutputError(f"{what}: {exc}") from None
    if location.protocol in ("file", "local"):
        _check_local(location.path, what, shown)
        return
    try:  # a store may refuse the listing (and still take the write): only a sure answer counts
        is_folder = bool(location.fs.isdir(location.path))
    except Exception:
        return
    if is_folder:
        raise OutputError(f"{what}: cannot write {shown}: that is a folder; give a file URL inside it")


def check_writable_prefix(prefix: str, name: str, what: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Refuse an output prefix (``adapt --output``) under which ``name`` cannot be written."""
    check_writable(f"{prefix.rstrip('/')}/{name}", what, storage_options)


def _check_local(path: str, what: str, shown: str) -> None:
    if os.path.isdir(path):
        raise OutputError(f"{what}: cannot write {shown}: that is a folder; give a file path inside it")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(parent):  # the first folder that exists: the rest will be made
        up = os.path.dirname(parent)
        if up == parent:
            break
        parent = up
    if not os.path.isdir(parent):
        raise OutputError(f"{what}: cannot write {shown}: {printable(parent, 300)!r} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{what}: cannot write {shown}: the folder {printable(parent, 300)!r} is not writable")
    if os.path.exists(path) and not os.path.isfile(path):
        raise OutputError(f"{what}: cannot write {shown}: it exists and is not a file")
