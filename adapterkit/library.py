"""Expert libraries: many adapters under one URL prefix, indexed by a manifest.

A library is a URL prefix (any fsspec URL: local, ``memory://``, ``s3://``, ``gs://``;
``zip://`` and ``http(s)://`` read-only) holding one safetensors file per adapter
(``<name>.safetensors``) and an index that lists every adapter with its recipe, kind,
method, sites, tensor shapes, base identity, task, tags, size and digest, so that
listing and selecting cost a few requests whatever the library's size::

    <prefix>/adapterkit-library.json                      the compacted manifest (generation G)
    <prefix>/.adapterkit-library/log/<G>/<slot>.json      changes since G, one file per change
    <prefix>/<name>.safetensors                           the adapters

Every change appends one small record to the log of the current generation, written
create-only at the slot after the last one listed (S3 ``If-None-Match: *``, a local hard
link, a lock in memory): two writers racing for a slot cannot both win, the loser lists
again and takes the next one, so no change is lost and none is applied twice. Readers
read the manifest, then the few records after it. Every ``COMPACT_EVERY`` records a
writer seals the generation (an empty record in the next slot: no record can follow it)
and folds the manifest and the sealed records into generation G+1, replacing the
manifest by compare-and-swap (S3 ``If-Match`` on the ETag, ``flock`` on a lock file
locally, a lock in memory). Writers that meet a seal append to the next generation, and
readers follow sealed generations on, so a compaction blocks nobody, and one that dies
is done by the next (a fold covers every sealed generation after the manifest). Folded records are kept (about
1 KB a change): deleting one would free its slot for a writer that listed the generation
before it was sealed, into a generation no compaction reads again. Guarantees per
backend are in ``docs/libraries.md``.

The manifest and the records are untrusted JSON (a library can come from anyone's
bucket): sizes, nesting, value counts, types, names and bounds are checked before use,
never pickle; a bad one is one :class:`~adapterkit.StorageError` line.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import re
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import attrs
from fsspec.implementations.cached import CachingFileSystem
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem
from fsspec.spec import AbstractFileSystem
from torch import Tensor, nn

from .storage import AdapterInfo, StorageError, cp, ls, save
from .storage import load as load_adapter
from .storage.errors import printable
from .storage.format import loads_bounded
from .storage.urls import READ_ONLY, Location, resolve, storage_errors

MANIFEST = "adapterkit-library.json"
LOG = ".adapterkit-library/log"
LOCK = ".adapterkit-library/lock"
SUFFIX = ".safetensors"
FORMAT = "adapterkit-library"
RECORD_FORMAT = "adapterkit-library-log"
VERSION = 1

COMPACT_EVERY = 32  # records per generation before a writer compacts: readers read at most this many
MAX_ATTEMPTS = 1000  # conflicting attempts (each one another writer's progress) before giving up
MAX_BYTES = 64 * 1024 * 1024  # manifest or record; a 10,000-entry library of small LoRAs is ~6 MB
MAX_VALUES = 8_000_000  # JSON values in one manifest (~40 per entry), bounded before parsing
MAX_DEPTH = 40  # the recipe's own nesting (32, as in adapter files) plus the manifest's
MAX_ENTRIES = 200_000
MAX_SLOTS = 10_000  # records in one generation (writers compact at COMPACT_EVERY)
MAX_LIST = 100_000  # sites or tensors of one entry (as adapter files)
MAX_TAGS = 64
MAX_TEXT = 256  # task, tag, base, kind, method, plugin names and versions
MAX_DIMS = 16
HEAD_BYTES = 128

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=@-]{0,127}(?:/[A-Za-z0-9_][A-Za-z0-9_.+=@-]{0,127}){0,7}")
_HEAD = re.compile(rb'\{"format":"adapterkit-library","version":1,"generation":(0|[1-9][0-9]{0,14})[,}]')
_SLOT = re.compile(r"([0-9]{10})\.json")
_GENERATION = re.compile(r"[0-9]{10}")
_MEMORY_LOCK = threading.Lock()  # memory:// conditional writes (one process holds that store)
_PROCESS_LOCK = threading.Lock()  # other backends without conditional writes: one process at a time


class NotALibrary(StorageError):
    """The prefix has no manifest."""


# --- entries ---------------------------------------------------------------------------


@attrs.frozen
class Entry:
    """One adapter of a library, as the manifest describes it (no tensor read)."""

    name: str
    url: str  # the adapter file; load it with the library's storage options
    size: int
    digest: str | None
    format_version: int | None
    content: str  # "adapter" or "tensors"
    kind: str
    method: str
    recipe: Mapping[str, Any] | None
    plugins: Mapping[str, str]
    sites: tuple[str, ...]
    tensors: Mapping[str, tuple[int, ...]]  # tensor name -> shape
    base: str | None  # the user's name for the base model
    base_shapes: Mapping[str, tuple[int, ...]] | None  # site -> the base weight's shape
    task: str | None
    tags: tuple[str, ...]

    @classmethod
    def from_json(cls, data: Mapping[str, Any], url: str) -> Entry:
        shapes = data["base_shapes"]
        return cls(
            name=data["name"], url=url, size=data["size"], digest=data["digest"],
            format_version=data["format_version"], content=data["content"], kind=data["kind"],
            method=data["method"], recipe=_copy_json(data["recipe"]), plugins=dict(data["plugins"]),
            sites=tuple(data["sites"]),
            tensors={k: tuple(v) for k, v in data["tensors"].items()},
            base=data["base"], base_shapes=None if shapes is None else {k: tuple(v) for k, v in shapes.items()},
            task=data["task"], tags=tuple(data["tags"]),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (the manifest's fields plus ``url``)."""
        return {
            "name": self.name, "url": self.url, "size": self.size, "digest": self.digest,
            "format_version": self.format_version, "content": self.content, "kind": self.kind,
            "method": self.method, "recipe": self.recipe, "plugins": dict(self.plugins), "sites": list(self.sites),
            "tensors": {k: list(v) for k, v in self.tensors.items()}, "base": self.base,
            "base_shapes": None if self.base_shapes is None else {k: list(v) for k, v in self.base_shapes.items()},
            "task": self.task, "tags": list(self.tags),
        }


def _copy_json(value: Any) -> Any:
    """A copy of parsed JSON (entries share the parsed manifest, which a Library keeps)."""
    if isinstance(value, dict):
        return {k: _copy_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy_json(v) for v in value]
    return value


@attrs.frozen
class RebuildReport:
    """What :meth:`Library.rebuild` found: names added, changed (file replaced behind the
    manifest's back), removed (file gone), kept, and files skipped with the reason."""

    added: tuple[str, ...]
    changed: tuple[str, ...]
    removed: tuple[str, ...]
    kept: int
    skipped: tuple[tuple[str, str], ...]
    written: bool  # False for a dry run, or when nothing changed

    @property
    def stale(self) -> bool:
        return bool(self.added or self.changed or self.removed)

    def to_dict(self) -> dict[str, Any]:
        return {"added": list(self.added), "changed": list(self.changed), "removed": list(self.removed),
                "kept": self.kept, "skipped": [{"file": f, "reason": r} for f, r in self.skipped],
                "stale": self.stale, "written": self.written}


# --- validation of untrusted JSON --------------------------------------------------------


class _Bad(ValueError):
    pass


def _text(value: Any, where: str, *, limit: int = MAX_TEXT) -> str:
    if not isinstance(value, str):
        raise _Bad(f"{where} is {_type(value)}, expected a string")
    if len(value) > limit:
        raise _Bad(f"{where} is longer than {limit} characters")
    if not value.isprintable():
        raise _Bad(f"{where} has control or unprintable characters")
    return value


def _opt_text(value: Any, where: str) -> str | None:
    return None if value is None else _text(value, where)


def _int(value: Any, where: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _Bad(f"{where} is {_type(value)}, expected an integer")
    if not low <= value <= high:
        raise _Bad(f"{where} = {value} is out of range [{low}, {high}]")
    return value


def _list(value: Any, where: str, limit: int) -> list[Any]:
    if not isinstance(value, list):
        raise _Bad(f"{where} is {_type(value)}, expected a list")
    if len(value) > limit:
        raise _Bad(f"{where} has {len(value):,} items, more than {limit:,}")
    return value


def _object(value: Any, where: str, limit: int) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Bad(f"{where} is {_type(value)}, expected an object")
    if len(value) > limit:
        raise _Bad(f"{where} has {len(value):,} keys, more than {limit:,}")
    return value


def _fields(value: Any, where: str, keys: Iterable[str]) -> dict[str, Any]:
    wanted = set(keys)
    obj = _object(value, where, MAX_LIST)
    if set(obj) != wanted:
        extra, missing = sorted(set(obj) - wanted), sorted(wanted - set(obj))
        raise _Bad(f"{where} has unknown key {printable(extra[0], 80)!r}" if extra else f"{where} lacks {missing[0]!r}")
    return obj


def _shape(value: Any, where: str) -> list[int]:
    return [_int(d, f"{where}[{i}]", 0, 2**62) for i, d in enumerate(_list(value, where, MAX_DIMS))]


def _shapes(value: Any, where: str) -> dict[str, list[int]]:
    out = _object(value, where, MAX_LIST)
    for key, shape in out.items():
        _text(key, f"{where} key", limit=1024)
        _shape(shape, f"{where}[{printable(key, 60)!r}]")
    return out


def _type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
             int: "an integer", float: "a number"}
    return names.get(type(value), type(value).__name__)


def check_name(name: Any, where: str = "name") -> str:
    """A library entry name: its file is ``<name>.safetensors`` under the prefix, so only
    letters, digits and ``_ . + = @ -``, ``/`` between parts (8 at most), no part starting
    with a dot (no ``..``, no hidden names)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        shown = printable(repr(name), 120)
        raise _Bad(f"{where} {shown} is not a valid entry name (letters, digits, _ . + = @ -, parts joined by /, "
                   "none starting with a dot; at most 128 characters a part)")
    return name


ENTRY_KEYS = ("name", "size", "digest", "format_version", "content", "kind", "method", "recipe", "plugins", "sites",
              "tensors", "base", "base_shapes", "task", "tags")


def check_entry(value: Any, where: str) -> dict[str, Any]:
    """Validate one entry (types and bounds); returns it unchanged."""
    entry = _fields(value, where, ENTRY_KEYS)
    check_name(entry["name"], f"{where}.name")
    _int(entry["size"], f"{where}.size", 0, 2**62)
    _opt_text(entry["digest"], f"{where}.digest")
    if entry["format_version"] is not None:
        _int(entry["format_version"], f"{where}.format_version", 1, 10**6)
    if entry["content"] not in ("adapter", "tensors"):
        raise _Bad(f"{where}.content must be 'adapter' or 'tensors'")
    _text(entry["kind"], f"{where}.kind")
    _text(entry["method"], f"{where}.method")
    if entry["recipe"] is not None:
        _object(entry["recipe"], f"{where}.recipe", 1024)  # its nesting and values are bounded by the parse
    for key, version in _object(entry["plugins"], f"{where}.plugins", 64).items():
        _text(key, f"{where}.plugins key")
        _text(version, f"{where}.plugins[{key!r}]")
    for i, site in enumerate(_list(entry["sites"], f"{where}.sites", MAX_LIST)):
        _text(site, f"{where}.sites[{i}]", limit=1024)
    _shapes(entry["tensors"], f"{where}.tensors")
    _opt_text(entry["base"], f"{where}.base")
    if entry["base_shapes"] is not None:
        _shapes(entry["base_shapes"], f"{where}.base_shapes")
    _opt_text(entry["task"], f"{where}.task")
    for i, tag in enumerate(_list(entry["tags"], f"{where}.tags", MAX_TAGS)):
        _text(tag, f"{where}.tags[{i}]")
    return entry


def _parse(data: bytes, what: str) -> Any:
    if len(data) > MAX_BYTES:
        raise _Bad(f"{what} is larger than {MAX_BYTES:,} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise _Bad(f"{what} is not UTF-8 text") from None
    try:
        return loads_bounded(text, MAX_DEPTH, MAX_VALUES)
    except ValueError as exc:
        raise _Bad(f"{what} is not valid JSON: {exc}") from None


def parse_manifest(data: bytes) -> tuple[int, dict[str, dict[str, Any]]]:
    """``(generation, {name: entry})`` of manifest bytes; ``_Bad`` with one line otherwise."""
    doc = _fields(_parse(data, "the manifest"), "the manifest", ("format", "version", "generation", "entries"))
    _version(doc, FORMAT, "the manifest")
    generation = _int(doc["generation"], "generation", 0, 10**15)
    entries: dict[str, dict[str, Any]] = {}
    for i, value in enumerate(_list(doc["entries"], "entries", MAX_ENTRIES)):
        entry = check_entry(value, f"entries[{i}]")
        if entry["name"] in entries:
            raise _Bad(f"entries[{i}]: duplicate name {entry['name']!r}")
        entries[entry["name"]] = entry
    return generation, entries


def parse_record(data: bytes, what: str) -> list[dict[str, Any]]:
    """The operations of one log record: ``put`` (an entry) or ``remove`` (a name)."""
    doc = _fields(_parse(data, what), what, ("format", "version", "ops"))
    _version(doc, RECORD_FORMAT, what)
    ops = _list(doc["ops"], f"{what}: ops", MAX_ENTRIES)
    for i, op in enumerate(ops):
        where = f"{what}: ops[{i}]"
        kind = _object(op, where, 3).get("op")
        if kind == "put":
            check_entry(_fields(op, where, ("op", "entry"))["entry"], f"{where}.entry")
        elif kind == "remove":
            _fields(op, where, ("op", "name", "digest"))
            check_name(op["name"], f"{where}.name")
            _opt_text(op["digest"], f"{where}.digest")
        else:
            raise _Bad(f"{where}.op must be 'put' or 'remove'")
    return ops


def _version(doc: Mapping[str, Any], fmt: str, what: str) -> None:
    if doc["format"] != fmt:
        raise _Bad(f"{what} is not an adapterkit library file (format {printable(repr(doc['format']), 80)})")
    version = _int(doc["version"], "version", 1, 10**6)
    if version > VERSION:
        raise _Bad(f"{what} has version {version}, made by a newer adapterkit (this one reads {VERSION})")


def dump_manifest(generation: int, entries: Mapping[str, Mapping[str, Any]]) -> bytes:
    """Deterministic bytes (every compactor of a generation writes the same); the
    generation leads, so writers learn it from a 128-byte ranged read."""
    doc = {"format": FORMAT, "version": VERSION, "generation": generation,
           "entries": [entries[name] for name in sorted(entries)]}
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=True).encode()


def dump_record(ops: Sequence[Mapping[str, Any]]) -> bytes:
    data = json.dumps({"format": RECORD_FORMAT, "version": VERSION, "ops": list(ops)}, separators=(",", ":"),
                      ensure_ascii=True).encode()
    if len(data) > MAX_BYTES:
        raise StorageError(f"library change too large ({len(data):,} bytes; at most {MAX_BYTES:,})")
    return data


def fold(entries: Mapping[str, dict[str, Any]], ops: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    out = dict(entries)
    for op in ops:
        if op["op"] == "put":
            out[op["entry"]["name"]] = op["entry"]
        else:
            out.pop(op["name"], None)
    return out


# --- the store: conditional writes per backend ---------------------------------------------


@attrs.frozen
class Slot:
    index: int
    size: int | None
    data: bytes | None = None  # already read (HTTP probes)


class Store:
    """Reads and conditional writes of one library prefix (paths relative to it).

    ``create`` writes only if nothing is there (atomic where the backend allows it);
    ``replace_if`` writes only if the file still holds what ``read_token`` returned.
    """

    def __init__(self, location: Location, url: str) -> None:
        fs = location.fs
        while isinstance(fs, CachingFileSystem):  # the control files must never come from a cache
            fs = fs.fs
        self.fs: AbstractFileSystem = fs
        self.root = location.path.rstrip("/")
        self.url = url
        proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        if isinstance(fs, LocalFileSystem):
            self.backend = "local"
        elif isinstance(fs, MemoryFileSystem):
            self.backend = "memory"
        elif proto in ("s3", "s3a") and hasattr(fs, "call_s3"):
            self.backend = "s3"
        elif proto in ("http", "https"):
            self.backend = "http"
        else:
            self.backend = "other"
        self.read_only = proto in READ_ONLY

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}" if self.root else rel

    def read(self, rel: str) -> bytes:
        """The whole file (at most MAX_BYTES + 1 bytes are read); FileNotFoundError if absent."""
        with storage_errors("read", self.url_of(rel)):
            return bytes(self.fs.cat_file(self.path(rel), start=0, end=MAX_BYTES + 1))

    def read_head(self, rel: str) -> bytes:
        with storage_errors("read", self.url_of(rel)):
            return bytes(self.fs.cat_file(self.path(rel), start=0, end=HEAD_BYTES))

    def read_token(self, rel: str) -> tuple[bytes | None, str]:
        """The file's bytes (None: larger than MAX_BYTES) and a token for ``replace_if``
        (the S3 ETag of that very version, elsewhere a hash of what :meth:`read` returns)."""
        if self.backend == "s3":
            with storage_errors("read", self.url_of(rel)):
                return self._s3_get([self.path(rel)])[0]
        data = self.read(rel)
        return (data if len(data) <= MAX_BYTES else None), hashlib.sha256(data).hexdigest()

    def read_many(self, rels: Sequence[str]) -> list[bytes]:
        """Several small files; async backends fetch them concurrently."""
        if not rels:
            return []
        paths = [self.path(r) for r in rels]
        with storage_errors("read", self.url_of(rels[0])):
            if self.backend == "s3":
                got = self._s3_get(paths)
                if any(data is None for data, _ in got):
                    raise StorageError(f"library {self.url!r}: a log record is larger than {MAX_BYTES:,} bytes")
                return [data for data, _ in got]  # type: ignore[misc]
            if self.backend == "other" and len(paths) > 1 and hasattr(self.fs, "_cat_ranges"):
                got = self.fs.cat_ranges(paths, [0] * len(paths), [MAX_BYTES + 1] * len(paths))
                for item in got:
                    if isinstance(item, BaseException):
                        raise item
                datas = [bytes(d) for d in got]
            else:
                datas = [bytes(self.fs.cat_file(p, start=0, end=MAX_BYTES + 1)) for p in paths]
        if any(len(d) > MAX_BYTES for d in datas):
            raise StorageError(f"library {self.url!r}: a log record is larger than {MAX_BYTES:,} bytes")
        return datas

    def _s3_get(self, paths: Sequence[str]) -> list[tuple[bytes | None, str]]:
        """One GetObject each, concurrently: the body (None if over MAX_BYTES, left unread)
        and the ETag of that very version (s3fs's cat_file adds a HeadObject first)."""
        import asyncio

        from fsspec.asyn import sync

        fs: Any = self.fs

        async def get(path: str) -> tuple[bytes | None, str]:
            bucket, key, _ = fs.split_path(path)
            resp = await fs._call_s3("get_object", Bucket=bucket, Key=key)
            body = resp["Body"]
            try:
                if int(resp.get("ContentLength", 0)) > MAX_BYTES:
                    return None, resp["ETag"]
                return await body.read(), resp["ETag"]
            finally:
                body.close()

        async def get_all() -> list[tuple[bytes | None, str]]:
            return list(await asyncio.gather(*(get(p) for p in paths)))

        return sync(fs.loop, get_all)  # type: ignore[no-any-return]

    def slots(self, rel_dir: str) -> list[Slot]:
        """The records of one generation, in slot order (missing folder: none)."""
        if self.backend == "http":  # no listing over HTTP: probe 0, 1, ... until a 404
            found = []
            for index in range(MAX_SLOTS + 1):
                try:
                    data = self.read(f"{rel_dir}/{index:010d}.json")
                except StorageError as exc:
                    if isinstance(exc.__cause__, FileNotFoundError):
                        break
                    raise
                found.append(Slot(index, len(data), data))
            return found
        names: list[tuple[str, int | None]] = []
        with storage_errors("list", self.url_of(rel_dir)):
            if self.backend == "s3":
                bucket, key, _ = self.fs.split_path(self.path(rel_dir))  # type: ignore[attr-defined]
                request: dict[str, Any] = {"Bucket": bucket, "Prefix": key + "/"}
                while True:
                    page = self.fs.call_s3("list_objects_v2", **request)  # type: ignore[attr-defined]
                    names += [(o["Key"].rpartition("/")[2], int(o["Size"])) for o in page.get("Contents", [])]
                    if not page.get("IsTruncated") or len(names) > MAX_SLOTS:
                        break
                    request["ContinuationToken"] = page["NextContinuationToken"]
            elif self.backend == "local":
                names = _local_listing(self.path(rel_dir))
            elif self.backend == "memory":
                folder = self.fs._strip_protocol(self.path(rel_dir)).rstrip("/") + "/"
                # one snapshot of the store (list() of a dict runs under the GIL): fsspec's ls
                # reads it entry by entry and fails on a file deleted meanwhile
                names = [(path[len(folder):], file.size) for path, file in list(MemoryFileSystem.store.items())
                         if path.startswith(folder) and "/" not in path[len(folder):]]
            else:
                try:
                    listing = self.fs.ls(self.path(rel_dir), detail=True)
                except FileNotFoundError:
                    listing = []
                names = [(d["name"].rstrip("/").rpartition("/")[2], d.get("size")) for d in listing
                         if d.get("type", "file") == "file"]
        found = sorted((Slot(int(m.group(1)), size) for name, size in names if (m := _SLOT.fullmatch(name))),
                       key=lambda s: s.index)
        if len(found) > MAX_SLOTS:
            raise StorageError(f"library {self.url!r}: more than {MAX_SLOTS:,} records in one generation of its "
                               "log; the library is damaged or crafted: run adapterkit library rebuild")
        return found

    def generations(self) -> list[int]:
        """Generations that have a log folder (to start a new manifest above them)."""
        if self.backend == "http":
            return []
        with storage_errors("list", self.url_of(LOG)):
            if self.backend == "s3":
                bucket, key, _ = self.fs.split_path(self.path(LOG))  # type: ignore[attr-defined]
                names, request = [], {"Bucket": bucket, "Prefix": key + "/", "Delimiter": "/"}
                while True:
                    page = self.fs.call_s3("list_objects_v2", **request)  # type: ignore[attr-defined]
                    names += [p["Prefix"].rstrip("/").rpartition("/")[2] for p in page.get("CommonPrefixes", [])]
                    if not page.get("IsTruncated"):
                        break
                    request["ContinuationToken"] = page["NextContinuationToken"]
            else:
                try:
                    names = [d.rstrip("/").rpartition("/")[2] for d in self.fs.ls(self.path(LOG), detail=False)]
                except FileNotFoundError:
                    names = []
        return sorted(int(n) for n in names if _GENERATION.fullmatch(n))

    def create(self, rel: str, data: bytes) -> bool:
        """Write ``data`` at ``rel`` unless something is there; False if something is."""
        path = self.path(rel)
        with storage_errors("write", self.url_of(rel)):
            if self.backend == "local":
                return _create_local(path, data, self._local_lock)
            if self.backend == "memory":
                with _MEMORY_LOCK:
                    if self.fs.exists(path):
                        return False
                    self.fs.pipe_file(path, data)
                    return True
            if self.backend == "s3":
                try:
                    self.fs.pipe_file(path, data, mode="create")
                except FileExistsError:
                    return False
                except OSError as exc:
                    if _conflict(exc):
                        return False
                    raise
                return True
            if _has_create_mode(self.fs):
                try:
                    self.fs.pipe_file(path, data, mode="create")
                except FileExistsError:
                    return False
                return True
            with _PROCESS_LOCK:
                if self.fs.exists(path):
                    return False
                self.fs.pipe_file(path, data)
                return True

    def replace_if(self, rel: str, data: bytes, token: str) -> bool:
        """Replace the file only if it is still the version ``token`` names (compare-and-swap)."""
        path = self.path(rel)
        with storage_errors("write", self.url_of(rel)):
            if self.backend == "s3":
                try:
                    self.fs.pipe_file(path, data, IfMatch=token)
                except FileNotFoundError:
                    return False
                except OSError as exc:
                    if _conflict(exc):
                        return False
                    raise
                return True
            locks: dict[str, Any] = {"local": self._local_lock, "memory": lambda: _MEMORY_LOCK}
            lock = locks.get(self.backend, lambda: _PROCESS_LOCK)
            with lock():
                try:
                    current = hashlib.sha256(bytes(self.fs.cat_file(path, start=0, end=MAX_BYTES + 1))).hexdigest()
                except FileNotFoundError:
                    return False
                if current != token:
                    return False
                if self.backend == "local":
                    _write_local(path, data)
                else:
                    self.fs.pipe_file(path, data)
                return True

    def delete(self, rels: Sequence[str]) -> None:
        """Remove files; those already gone are fine."""
        if not rels:
            return
        paths = [self.path(r) for r in rels]
        with storage_errors("delete", self.url_of(rels[0])):
            if self.backend == "s3":
                bucket = self.fs.split_path(paths[0])[0]  # type: ignore[attr-defined]
                for i in range(0, len(paths), 1000):
                    keys = [{"Key": self.fs.split_path(p)[1]} for p in paths[i : i + 1000]]  # type: ignore[attr-defined]
                    self.fs.call_s3("delete_objects", Bucket=bucket, Delete={"Objects": keys, "Quiet": True})  # type: ignore[attr-defined]
                for p in paths:
                    self.fs.invalidate_cache(p)
                return
            for p in paths:
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm_file(p)

    def url_of(self, rel: str) -> str:
        return join_url(self.url, rel)

    @contextlib.contextmanager
    def _local_lock(self) -> Iterator[None]:
        """An exclusive ``flock`` on the library's lock file: held by one process (and one
        open file) at a time, released by the kernel if its holder dies."""
        path = self.path(LOCK)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                import fcntl
            except ImportError:  # no flock (Windows): serialise this process only
                with _PROCESS_LOCK:
                    yield
                return
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def _local_listing(folder: str) -> list[tuple[str, int | None]]:
    """Names and sizes in a folder; a file deleted between the listing and its stat is
    left out (fsspec's ls raises FileNotFoundError for the whole folder then: taken for an
    empty folder, that would let a writer into a compacted generation's first slot)."""
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return []
    out: list[tuple[str, int | None]] = []
    for entry in entries:
        try:
            if entry.is_file(follow_symlinks=False):
                out.append((entry.name, entry.stat(follow_symlinks=False).st_size))
        except FileNotFoundError:
            continue
    return out


def _create_local(path: str, data: bytes, lock: Callable[[], contextlib.AbstractContextManager[None]]) -> bool:
    """Write a hidden temp file, then hard-link it to ``path``: the link fails if ``path``
    exists, and a reader sees the whole file or none (filesystems without hard links:
    check and rename under the library's lock file)."""
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:12]}")
    with open(tmp, "wb") as file:
        file.write(data)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:
        with lock():
            if os.path.lexists(path):
                return False
            os.replace(tmp, path)
            return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _write_local(path: str, data: bytes) -> None:
    parent, name = os.path.split(path)
    tmp = os.path.join(parent, f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:12]}")
    try:
        with open(tmp, "wb") as file:
            file.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _conflict(exc: BaseException) -> bool:
    """An S3 precondition failure (412) or a concurrent conditional write (409)."""
    cause = exc.__cause__
    code = getattr(cause, "response", {}).get("Error", {}).get("Code") if cause is not None else None
    return code in ("PreconditionFailed", "ConditionalRequestConflict") or "pre-conditions" in str(exc)


def _has_create_mode(fs: AbstractFileSystem) -> bool:
    """The backend implements ``pipe_file(mode="create")`` itself (gcsfs: a generation
    precondition), not fsspec's generic exists-then-write."""
    import inspect

    from fsspec.asyn import AsyncFileSystem

    generic = (AbstractFileSystem.pipe_file, AsyncFileSystem._pipe_file)
    for name in ("_pipe_file", "pipe_file"):
        method = getattr(type(fs), name, None)
        if method is not None and method not in generic:
            try:
                return "mode" in inspect.signature(method).parameters
            except (TypeError, ValueError):
                return False
    return False


def _path_link(parts: list[str]) -> int:
    """Which link of a chained URL holds the path: the first that is not a bare protocol
    name (``simplecache::s3://b/lib`` -> 1; ``zip://lib::a.zip`` -> 0)."""
    from fsspec.registry import known_implementations

    for i, part in enumerate(parts[:-1]):
        if "://" in part or part not in known_implementations:
            return i
    return len(parts) - 1


def join_url(url: str, rel: str) -> str:
    """``url/rel``, on the link of a possibly chained URL that holds the path."""
    parts = url.split("::")
    i = _path_link(parts)
    parts[i] = parts[i] + rel if parts[i].endswith("://") else parts[i].rstrip("/") + "/" + rel
    return "::".join(parts)


def _missing(exc: StorageError) -> bool:
    return isinstance(exc.__cause__, FileNotFoundError)


# --- the library --------------------------------------------------------------------------


@attrs.frozen
class _Generation:
    number: int
    slots: tuple[Slot, ...]
    ops: tuple[Mapping[str, Any], ...]
    sealed: bool


@attrs.frozen
class _Chain:
    """The manifest as read, then every generation of the log from it on."""

    generation: int
    token: str
    entries: dict[str, dict[str, Any]]
    log: tuple[_Generation, ...]

    def state(self) -> dict[str, dict[str, Any]]:
        return fold(self.entries, (op for gen in self.log for op in gen.ops))

    @property
    def current(self) -> _Generation:
        return self.log[-1]


class Library:
    """Many adapters under one URL prefix, indexed by a manifest (see the module doc).

    ``Library(url)`` does no I/O; :meth:`init` creates an empty library, :meth:`rebuild`
    indexes the adapter files already under a prefix. Reads (:meth:`entries`,
    :meth:`get`, :meth:`select`) cost a manifest read, a listing and at most
    ``COMPACT_EVERY`` small record reads, whatever the number of adapters, and never read
    an adapter file.
    """

    def __init__(self, url: str, *, storage_options: Mapping[str, Any] | None = None) -> None:
        if not isinstance(url, str):
            raise StorageError(f"library URLs are strings, got {type(url).__name__}")
        parts = url.split("::")
        i = _path_link(parts)
        stripped = parts[i].rstrip("/")
        if stripped and not stripped.endswith(":"):  # (not a bare root such as memory://)
            parts[i] = stripped
        self.url = "::".join(parts)
        self.storage_options = dict(storage_options or {})
        self._stores: dict[bool, Store] = {}
        self._parsed: tuple[str, int, dict[str, dict[str, Any]]] | None = None  # the last manifest parsed

    def __repr__(self) -> str:
        return f"Library({self.url!r})"

    # -- reading --

    def entries(self) -> list[Entry]:
        """Every entry, by name."""
        state = self._chain(self._store()).state()
        return [self._entry(state[name]) for name in sorted(state)]

    def get(self, name: str) -> Entry:
        state = self._chain(self._store()).state()
        if name not in state:
            raise StorageError(f"no adapter named {printable(repr(name), 200)} in library {self.url!r}"
                               f"{_did_you_mean(name, state)}")
        return self._entry(state[name])

    def select(
        self,
        *,
        task: str | Iterable[str] | None = None,
        tags: str | Iterable[str] | None = None,
        kind: str | Iterable[str] | None = None,
        method: str | Iterable[str] | None = None,
        base: str | Iterable[str] | None = None,
        content: str | Iterable[str] | None = None,
        name: str | None = None,
        model: nn.Module | None = None,
    ) -> list[Entry]:
        """Entries matching every criterion given, from the manifest alone: ``task``,
        ``kind``, ``method``, ``base``, ``content`` (one value or any of several);
        ``tags`` (the entry has all of them); ``name`` (a glob, ``skills/*``); ``model``
        (every site of the entry is a module of ``model`` whose weight has the entry's
        recorded base shape)."""
        wanted = {key: _one_of(value) for key, value in
                  (("task", task), ("kind", kind), ("method", method), ("base", base), ("content", content))
                  if value is not None}
        needed_tags = set(_one_of(tags)) if tags is not None else set()
        state = self._chain(self._store()).state()
        out = []
        for key in sorted(state):
            data = state[key]  # filtered as JSON: an Entry is built for the matches only
            if any(data[field] not in values for field, values in wanted.items()):
                continue
            if not needed_tags <= set(data["tags"]):
                continue
            if name is not None and not fnmatch.fnmatchcase(key, name):
                continue
            entry = self._entry(data)
            if model is not None and not fits(entry, model):
                continue
            out.append(entry)
        return out

    def __len__(self) -> int:
        return len(self._chain(self._store()).state())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._chain(self._store()).state()

    def __iter__(self) -> Iterator[Entry]:
        return iter(self.entries())

    def load(self, name: str, model: nn.Module, **kwargs: Any) -> nn.Module:
        """``adapterkit.load`` of the entry ``name`` into ``model`` (digests verified)."""
        return load_adapter(self.get(name).url, model, storage_options=self.storage_options, **kwargs)

    # -- writing --

    @classmethod
    def init(cls, url: str, *, storage_options: Mapping[str, Any] | None = None, exist_ok: bool = False) -> Library:
        """Create an empty library at ``url`` (adapters already there are not indexed:
        :meth:`rebuild` does that)."""
        lib = cls(url, storage_options=storage_options)
        store = lib._store(write=True)
        start = max(store.generations(), default=-1) + 1
        if not store.create(MANIFEST, dump_manifest(start, {})) and not exist_ok:
            raise StorageError(f"{lib.url!r} is already an adapterkit library ({MANIFEST} exists)")
        return lib

    def add(
        self,
        source: str | nn.Module,
        name: str | None = None,
        *,
        task: str | None = None,
        tags: Iterable[str] = (),
        base: str | None = None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> Entry:
        """Add an adapter: copy the file at URL ``source`` (verified, with
        ``storage_options`` for that URL) or save the attached model ``source`` into the
        library as ``<name>.safetensors``. ``name`` defaults to the source file's name;
        a name already in the library is an error (remove it first). ``task``, ``tags``
        and ``base`` (your name for the base model) are metadata for :meth:`select`; a
        saved model also records them and its sites' base weight shapes in the file, where
        :meth:`rebuild` finds them again (a copied file's own ``task``/``tags``/``base``
        metadata keys are the defaults)."""
        try:
            if task is not None:
                _text(task, "task")
            if base is not None:
                _text(base, "base")
            if isinstance(tags, str):
                tags = [tags]
            tag_list = sorted({_text(t, "tag") for t in tags})
            if len(tag_list) > MAX_TAGS:
                raise _Bad(f"more than {MAX_TAGS} tags")
            if name is None and isinstance(source, str):
                name = source.split("::")[0].rstrip("/").rpartition("/")[2].removesuffix(SUFFIX)
            if name is None:
                raise _Bad("adding a model needs a name")
            check_name(name)
        except _Bad as exc:
            raise StorageError(f"cannot add to library {self.url!r}: {exc}") from None
        store = self._store(write=True)
        generation = self._head(store)  # the library exists before anything is written
        staged = f"memory://.adapterkit-library-staging/{uuid.uuid4().hex}{SUFFIX}"
        try:
            if isinstance(source, nn.Module):
                shapes = base_shapes(source)
                meta = {"tags": json.dumps(tag_list), "base_shapes": json.dumps(shapes, sort_keys=True)}
                meta.update({k: v for k, v in (("task", task), ("base", base)) if v is not None})
                info = save(source, staged, metadata=meta)
            elif isinstance(source, str):
                info = cp(source, staged, storage_options=storage_options, dst_storage_options={})
                shapes = None
            else:
                raise StorageError(f"add takes a URL or an attached model, got {type(source).__name__}")
            data = bytes(MemoryFileSystem().cat_file(staged))
        finally:
            with contextlib.suppress(FileNotFoundError):
                MemoryFileSystem().rm_file(staged)
        try:
            entry = entry_json(name, info, task=task, tags=tag_list if tag_list else None, base=base, shapes=shapes)
        except _Bad as exc:
            raise StorageError(f"cannot add {source if isinstance(source, str) else name!r}: {exc}") from None
        if not store.create(name + SUFFIX, data):
            raise StorageError(f"library {self.url!r} already has {name + SUFFIX!r}; remove {name!r} first "
                               "(or, if it is not listed, index it with adapterkit library rebuild)")
        try:  # (if no record was written, the file is not an entry: remove it, freeing the name)
            generation, index = self._append(store, [{"op": "put", "entry": entry}], generation)
        except BaseException:
            with contextlib.suppress(Exception):
                store.delete([name + SUFFIX])
            raise
        self._compact_if_full(store, generation, index)
        return self._entry(entry)

    def remove(self, name: str) -> Entry:
        """Remove an entry and its file; returns the entry removed."""
        store = self._store(write=True)
        chain = self._chain(store)
        state = chain.state()
        if name not in state:
            raise StorageError(f"no adapter named {printable(repr(name), 200)} in library {self.url!r}"
                               f"{_did_you_mean(name, state)}")
        entry = state[name]
        generation, index = self._append(store, [{"op": "remove", "name": name, "digest": entry["digest"]}],
                                         chain.current.number)
        store.delete([name + SUFFIX])
        self._compact_if_full(store, generation, index)
        return self._entry(entry)

    def compact(self) -> int:
        """Seal the current generation and fold it into the manifest now (writers do this
        every ``COMPACT_EVERY`` changes); returns the manifest's generation."""
        store = self._store(write=True)
        chain = self._chain(store)
        if chain.current.slots and not chain.current.sealed:
            self._seal(store, chain.current.number)
        return self._compact(store)

    def rebuild(self, *, dry_run: bool = False) -> RebuildReport:
        """Recreate the index from the adapter files' headers (ranged reads, one per file):
        for a prefix without a manifest (or with a damaged one), or one whose files were
        added, replaced or deleted behind the manifest's back. Entries whose file has the
        same name, size and digest keep their metadata; new files take theirs from the
        file's ``task``/``tags``/``base`` metadata. ``dry_run`` only reports (works on
        read-only URLs)."""
        for _ in range(8):
            report = self._rebuild_once(dry_run)
            if report is not None:
                return report
        raise StorageError(f"library {self.url!r} kept being recreated by other writers during rebuild; try again")

    def _rebuild_once(self, dry_run: bool) -> RebuildReport | None:
        store = self._store(write=not dry_run)
        chain: _Chain | None = None
        damaged = False
        try:
            chain = self._chain(store)
        except NotALibrary:
            pass
        except StorageError:
            damaged = True  # unreadable manifest or log: replaced below
        current = chain.state() if chain else {}
        # a name whose last logged change is its removal, while its file is still listed: a
        # removal in flight (the record is written before the file is deleted)
        last = {op["entry"]["name"] if op["op"] == "put" else op["name"]: op
                for gen in (chain.log if chain else ()) for op in gen.ops}
        removing = {(name, op["digest"]) for name, op in last.items() if op["op"] == "remove"}
        target, skipped = self._scan(removing)
        added = sorted(set(target) - set(current))
        removed = sorted(set(current) - set(target))
        changed, kept = [], 0
        for name in sorted(set(target) & set(current)):
            old, new = current[name], target[name]
            if (old["size"], old["digest"]) == (new["size"], new["digest"]):
                target[name] = old
                kept += 1
            else:
                for key in ("task", "tags", "base", "base_shapes"):  # the file says nothing: keep the user's
                    if new[key] in (None, []):
                        new[key] = old[key]
                changed.append(name)
        report = RebuildReport(tuple(added), tuple(changed), tuple(removed), kept, tuple(skipped), False)
        if dry_run or (chain is not None and not report.stale and not chain.current.slots):
            return report
        if chain is not None:
            ops = [{"op": "put", "entry": target[n]} for n in [*added, *changed]]
            ops += [{"op": "remove", "name": n, "digest": current[n]["digest"]} for n in removed]
            if ops:
                self._append(store, ops, chain.current.number)
            self.compact()
            return attrs.evolve(report, written=True)
        # no manifest, or a damaged one: a new manifest above every generation of the log
        data = dump_manifest(max(store.generations(), default=-1) + 1, target)
        if damaged:
            _, token = store.read_token(MANIFEST)
            done = store.replace_if(MANIFEST, data, token)
        else:
            done = store.create(MANIFEST, data)
        return attrs.evolve(report, written=True) if done else None  # None: another writer got there first

    # -- internals --

    def _store(self, write: bool = False) -> Store:
        if write not in self._stores:
            location = resolve(self.url, self.storage_options)  # (a prefix: not a file URL to write)
            store = Store(location, self.url)  # (unwraps caches)
            if write and store.read_only:
                raise StorageError(f"cannot write library {self.url!r}: {location.protocol}:// URLs are read-only")
            self._stores[write] = store
        return self._stores[write]

    def _entry(self, data: Mapping[str, Any]) -> Entry:
        return Entry.from_json(data, join_url(self.url, data["name"] + SUFFIX))

    def _not_a_library(self) -> NotALibrary:
        return NotALibrary(f"{self.url!r} is not an adapterkit library (no {MANIFEST}): create one with "
                           "adapterkit library init, or index the adapters there with adapterkit library rebuild")

    def _damaged(self, what: str, exc: _Bad) -> StorageError:
        return StorageError(f"library {self.url!r}: {exc} ({what}; adapterkit library rebuild recreates it "
                            "from the adapter files)")

    def _head(self, store: Store) -> int:
        """The manifest's generation from its first 128 bytes (one small ranged read)."""
        try:
            head = store.read_head(MANIFEST)
        except StorageError as exc:
            if _missing(exc):
                raise self._not_a_library() from None
            raise
        match = _HEAD.match(head)
        if match:
            return int(match.group(1))
        return self._chain(store).generation  # not our layout: the full read says why

    def _chain(self, store: Store) -> _Chain:
        """Read the manifest, then the log from its generation on: every sealed generation
        (folded by the next compaction, if the manifest has not caught up yet) and the
        current one. Records are never deleted, so a hole is damage, not a race."""
        try:
            raw, token = store.read_token(MANIFEST)
        except StorageError as exc:
            if _missing(exc):
                raise self._not_a_library() from None
            raise
        parsed = self._parsed
        if parsed is not None and parsed[0] == token:  # the same version (ETag, or content hash): parsed already
            generation, entries = parsed[1], parsed[2]
        else:
            try:
                if raw is None:
                    raise _Bad(f"the manifest is larger than {MAX_BYTES:,} bytes")
                generation, entries = parse_manifest(raw)
            except _Bad as exc:
                raise self._damaged(f"in {MANIFEST}", exc) from None
            self._parsed = (token, generation, entries)
        log: list[_Generation] = []
        number = generation
        while True:
            slots = store.slots(f"{LOG}/{number:010d}")
            missing = next((i for i, slot in enumerate(slots) if slot.index != i), None)
            try:
                if missing is not None:
                    raise _Bad(f"record {missing} of generation {number} of its log is missing")
                gen = self._read_generation(store, number, slots)
            except StorageError as exc:
                if not _missing(exc):
                    raise
                raise self._damaged("in its log", _Bad(f"a record of generation {number} vanished")) from None
            except _Bad as exc:
                raise self._damaged("in its log", exc) from None
            log.append(gen)
            if not gen.sealed:
                return _Chain(generation, token, entries, tuple(log))
            number += 1

    def _read_generation(self, store: Store, number: int, slots: list[Slot]) -> _Generation:
        folder = f"{LOG}/{number:010d}"
        for slot in slots:
            if slot.size is not None and slot.size > MAX_BYTES:
                raise self._damaged(f"record {number}/{slot.index}", _Bad(f"a log record is larger than "
                                                                          f"{MAX_BYTES:,} bytes"))
        todo = [s for s in slots if s.data is None and s.size != 0]
        fetched = dict(zip((s.index for s in todo), store.read_many([f"{folder}/{s.index:010d}.json" for s in todo]),
                           strict=True))
        ops: list[Mapping[str, Any]] = []
        sealed = False
        for slot in slots:
            data = slot.data if slot.data is not None else fetched.get(slot.index, b"")
            if sealed:
                raise self._damaged(f"log generation {number}", _Bad("a record follows the seal"))
            if not data:
                sealed = True
                continue
            try:
                ops += parse_record(data, f"log record {number}/{slot.index}")
            except _Bad as exc:
                raise self._damaged("in its log", exc) from None
        return _Generation(number, tuple(slots), tuple(ops), sealed)

    def _append(self, store: Store, ops: Sequence[Mapping[str, Any]], generation: int) -> tuple[int, int]:
        """Write one record at the slot after the last one listed in the current generation
        (create-only; a lost race lists again and takes the next slot). Returns where."""
        record = dump_record(ops)
        for _ in range(MAX_ATTEMPTS):
            slots = store.slots(f"{LOG}/{generation:010d}")
            if slots and self._is_seal(store, generation, slots[-1]):
                generation += 1  # sealed: the next generation (its sealer folds it; readers follow on)
                continue
            index = slots[-1].index + 1 if slots else 0
            if store.create(f"{LOG}/{generation:010d}/{index:010d}.json", record):
                return generation, index
        raise StorageError(f"library {self.url!r}: gave up after {MAX_ATTEMPTS} conflicting writes")

    def _compact_if_full(self, store: Store, generation: int, index: int) -> None:
        """After a record landed in slot ``index``: seal and fold a full generation. An
        optimisation (the change is already in): a failure is left to the next writer."""
        if index + 1 >= COMPACT_EVERY:
            with contextlib.suppress(StorageError):
                self._seal(store, generation)
                self._compact(store)

    def _is_seal(self, store: Store, generation: int, slot: Slot) -> bool:
        if slot.size is not None:
            return slot.size == 0
        return not store.read(f"{LOG}/{generation:010d}/{slot.index:010d}.json")

    def _seal(self, store: Store, generation: int) -> None:
        """Close a generation: an empty record at its next free slot (no record can follow)."""
        for _ in range(MAX_ATTEMPTS):
            slots = store.slots(f"{LOG}/{generation:010d}")
            if slots and self._is_seal(store, generation, slots[-1]):
                return
            index = slots[-1].index + 1 if slots else 0
            if store.create(f"{LOG}/{generation:010d}/{index:010d}.json", b""):
                return
        raise StorageError(f"library {self.url!r}: gave up sealing after {MAX_ATTEMPTS} conflicting writes")

    def _compact(self, store: Store) -> int:
        """Fold every sealed generation into a new manifest (compare-and-swap); returns the
        manifest's generation. The folded records stay where they are: deleting them would
        free their slots, and a writer that listed the generation before the seal could
        then write into a slot no compaction will read again."""
        for _ in range(MAX_ATTEMPTS):
            chain = self._chain(store)
            sealed = [gen for gen in chain.log if gen.sealed]
            if not sealed:
                return chain.generation
            entries = fold(chain.entries, (op for gen in sealed for op in gen.ops))
            generation = sealed[-1].number + 1
            if store.replace_if(MANIFEST, dump_manifest(generation, entries), chain.token):
                return generation
        raise StorageError(f"library {self.url!r}: gave up compacting after {MAX_ATTEMPTS} conflicting writes")

    def _scan(self, removing: set[tuple[str, Any]]) -> tuple[dict[str, dict[str, Any]], list[tuple[str, str]]]:
        """Entries from the adapter files' headers (adapterkit.ls: one ranged read each)."""
        target: dict[str, dict[str, Any]] = {}
        skipped: list[tuple[str, str]] = []
        for item in ls(self.url, storage_options=self.storage_options):
            name = item.name.removesuffix(SUFFIX)
            try:
                check_name(name, "file name")
                if item.info is None:
                    raise _Bad(item.error or "unreadable")
                if item.info.format_version is None:
                    raise _Bad("not an adapterkit file (no digest)")
                entry = entry_json(name, item.info)
            except _Bad as exc:
                skipped.append((item.name, printable(str(exc), 300)))
                continue
            if (name, entry["digest"]) in removing:
                skipped.append((item.name, "its removal is logged (being deleted)"))
                continue
            target[name] = entry
        return target, skipped


# --- helpers ---------------------------------------------------------------------------------


def entry_json(
    name: str,
    info: AdapterInfo,
    *,
    task: str | None = None,
    tags: Sequence[str] | None = None,
    base: str | None = None,
    shapes: Mapping[str, list[int]] | None = None,
) -> dict[str, Any]:
    """The manifest entry of an adapter file's header. ``task``, ``tags``, ``base`` and
    base shapes not given come from the file's own metadata keys of those names."""
    meta = info.metadata
    if task is None:
        task = meta.get("task")
    if base is None:
        base = meta.get("base")
    if tags is None:
        tags = _file_tags(meta.get("tags"))
    if shapes is None and meta.get("base_shapes") is not None:
        try:
            shapes = json.loads(meta["base_shapes"])
        except ValueError:
            raise _Bad("its metadata 'base_shapes' is not JSON") from None
        shapes = _shapes(shapes, "its metadata 'base_shapes'")
    recipe = info.recipe if info.recipe is not None else info.folded_recipe
    entry = {
        "name": name, "size": info.size, "digest": info.digest, "format_version": info.format_version,
        "content": info.content, "kind": info.kind, "method": info.method,
        "recipe": recipe.to_dict() if recipe is not None else None, "plugins": dict(info.plugins),
        "sites": [*info.sites, *info.folded], "tensors": {t.name: list(t.shape) for t in info.tensors},
        "base": base, "base_shapes": dict(shapes) if shapes is not None else None, "task": task,
        "tags": sorted(set(tags)),
    }
    return check_entry(json.loads(json.dumps(entry)), "the entry")  # also: only JSON types


def _file_tags(value: str | None) -> list[str]:
    if value is None:
        return []
    if value.lstrip().startswith("["):
        try:
            parsed = json.loads(value)
        except ValueError:
            raise _Bad("its metadata 'tags' is not a JSON list") from None
    else:
        parsed = [t.strip() for t in value.split(",") if t.strip()]
    return [_text(t, "its metadata 'tags' item") for t in _list(parsed, "its metadata 'tags'", MAX_TAGS)]


def base_shapes(model: nn.Module) -> dict[str, list[int]]:
    """Each adapter site's base weight shape (folded sites included): with the user's
    ``base`` name, what identifies the base model an adapter was trained on."""
    from .attach import folded_sites, sites

    out = {}
    for name, site in {**sites(model), **folded_sites(model)}.items():
        weight = getattr(site.base, "weight", None)
        if isinstance(weight, Tensor):
            out[name] = list(weight.shape)
    return out


def fits(entry: Entry, model: nn.Module) -> bool:
    """Every site of ``entry`` is a module of ``model`` (with or without adapters) whose
    weight has the recorded base shape (when the entry records shapes)."""
    from .site import AdapterSite

    for site in entry.sites:
        try:
            module = model.get_submodule(site)
        except AttributeError:
            return False
        if isinstance(module, AdapterSite):
            module = module.base
        expected = (entry.base_shapes or {}).get(site)
        weight = getattr(module, "weight", None)
        if expected is not None and (not isinstance(weight, Tensor) or tuple(weight.shape) != expected):
            return False
    return True


def _one_of(value: str | Iterable[str]) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


def _did_you_mean(name: str, names: Iterable[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, list(names), n=1) if isinstance(name, str) else []
    return f"; did you mean {printable(repr(close[0]), 200)}?" if close else ""


__all__ = ["COMPACT_EVERY", "MANIFEST", "Entry", "Library", "NotALibrary", "RebuildReport", "base_shapes", "fits"]
