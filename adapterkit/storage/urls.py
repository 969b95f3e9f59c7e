"""fsspec URLs: open a filesystem for a URL string and turn backend failures into one line.

URLs stay strings end to end (plain paths, ``file://``, ``memory://``, ``s3://``,
``gs://``, ``http(s)://``, ``zip://…::…``, chained ``simplecache::…``); fsspec resolves
them. Storage options (credentials, endpoints) pass straight through, as do fsspec's
own configuration (``FSSPEC_<PROTOCOL>_<KEY>`` variables, ``~/.config/fsspec``) and each
backend's usual environment (``AWS_*`` for s3fs, ...).
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import importlib
import inspect
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import attrs
import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.cached import CachingFileSystem
from fsspec.registry import get_filesystem_class, known_implementations

from .errors import StorageError

# Protocols adapterkit never writes to (fsspec may offer a mode that builds a new archive,
# but replacing one member of an existing archive is not a thing these backends do).
READ_ONLY = frozenset({"http", "https", "zip", "tar", "github", "git", "data", "libarchive", "reference"})
# Object stores publish an object only when its upload completes, so writing the final
# key directly is already atomic; a rename there would be a second full copy.
OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "r2", "b2", "cos"})
# Import name -> pip name where they differ.
PIP_NAMES = {"smbclient": "smbprotocol", "libarchive": "libarchive-c", "fuse": "fusepy", "lakefs_spec": "lakefs-spec"}


@attrs.frozen
class Location:
    """A resolved URL: the filesystem, the path inside it and the URL as given."""

    fs: fsspec.AbstractFileSystem
    path: str
    url: str

    @property
    def protocol(self) -> str:
        proto = self.fs.protocol
        return proto if isinstance(proto, str) else proto[0]

    def child(self, path: str) -> Location:
        """Another path on the same filesystem (for listings)."""
        return Location(self.fs, path, self.fs.unstrip_protocol(path))


def url_protocol(url: str) -> str:
    """The outermost protocol of a URL (``file`` for plain paths)."""
    head = url.split("::", 1)[0]
    return head.split("://", 1)[0] if "://" in head else "file"


def resolve(url: str, storage_options: Mapping[str, Any] | None = None, *, write: bool = False) -> Location:
    """Open the filesystem behind ``url``; for writes, unwrap read caches and refuse read-only protocols."""
    if not isinstance(url, str):
        raise StorageError(f"storage URLs are strings, got {type(url).__name__} {url!r}")
    options = check_options(url, storage_options) if storage_options else {}
    try:
        fs, path = url_to_fs(url, **options)
    except ImportError as exc:
        raise StorageError(f"cannot open {url!r}: {missing_package_hint(url, exc)}") from exc
    except ValueError as exc:
        if "Protocol not known" in str(exc):
            raise StorageError(f"cannot open {url!r}: unknown URL protocol {url_protocol(url)!r}") from exc
        raise StorageError(f"cannot open {url!r}: {one_line(exc)}") from exc
    except Exception as exc:  # any backend failing to start (bad option, credentials) is one line
        raise StorageError(f"cannot open {url!r}: {one_line(exc)}") from exc
    location = Location(fs, path, url)
    if write and url.split("::")[0].endswith("/"):
        example = f"{url}adapter.safetensors"
        raise StorageError(f"cannot write {url!r}: that names a folder; give a file URL such as {example}")
    if write:
        # Caches serve reads; a write goes to the filesystem they wrap.
        while isinstance(location.fs, CachingFileSystem):
            location = Location(location.fs.fs, path, url)
        if location.protocol in READ_ONLY:
            raise StorageError(f"cannot write {url!r}: {location.protocol}:// URLs are read-only here")
    return location


# Options every fsspec filesystem takes (its listings cache, instance cache, event loop).
GENERIC_OPTIONS = frozenset({"use_listings_cache", "listings_expiry_time", "max_paths", "skip_instance_cache",
                             "asynchronous", "loop"})


def chain_protocols(url: str) -> list[str]:
    """The protocol of each link of a (possibly chained) URL, outermost first, as fsspec
    reads them (``simplecache::s3://b/k`` -> simplecache, s3; a plain path is ``file``)."""
    out = []
    for bit in url.split("::"):
        if "://" in bit:
            out.append(bit.split("://", 1)[0] or "file")
        elif re.fullmatch(r"[a-z][a-z0-9+.-]*", bit) and bit in known_implementations:
            out.append(bit)
        else:
            out.append("file")
    return out


def check_options(url: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The options to open ``url`` with, after refusing those that no link of it takes:
    fsspec passes unknown keyword arguments to most filesystems, which ignore them silently
    (a mistyped ``endpoint_url`` would then reach the default endpoint). Routing as fsspec's:
    a key naming a protocol of the chain holds that link's options; every other key goes to
    the outermost link. A table named after a protocol not in the chain is for other URLs
    (``-o s3.endpoint_url=...`` given to a command that also reads local files): left out."""
    protocols = chain_protocols(url)
    routed: dict[str, dict[str, Any]] = {p: {} for p in protocols}
    passed: dict[str, Any] = {}
    for key, value in options.items():
        if not isinstance(key, str):
            raise StorageError(f"storage option names are strings, got {key!r}")
        if key not in routed and key in known_implementations and isinstance(value, Mapping):
            continue
        passed[key] = value
        if key in routed:
            if not isinstance(value, Mapping):
                raise StorageError(f"storage option {key!r} names the {key}:// link of {url!r}, so its value "
                                   f"is a table of that link's options (-o {key}.KEY=VALUE)")
            routed[key].update(value)
        else:
            routed[protocols[0]][key] = value
    for protocol, given in routed.items():
        if not given:
            continue
        try:
            cls = get_filesystem_class(protocol)
        except (ImportError, ValueError):
            return passed  # resolving the URL names the missing package or the unknown protocol
        known = accepted_options(cls)
        if known is None:
            continue  # a filesystem whose options cannot be told: passed through
        for key in sorted(given):
            if key in known:
                continue
            hint = ""
            elsewhere = [p for p in protocols if p != protocol and _takes(p, key)]
            close = difflib.get_close_matches(key, sorted(known), n=1)
            if elsewhere:
                hint = f"; it is an option of the {elsewhere[0]}:// link: -o {elsewhere[0]}.{key}=..."
            elif close:
                hint = f"; did you mean {close[0]!r}?"
            raise StorageError(f"unknown storage option {key!r} for {protocol}:// ({cls.__name__}){hint} "
                               f"(that filesystem takes: {', '.join(sorted(known - GENERIC_OPTIONS))})")
    return passed


def _takes(protocol: str, key: str) -> bool:
    try:
        known = accepted_options(get_filesystem_class(protocol))
    except (ImportError, ValueError):
        return False
    return known is None or key in known


@functools.cache
def accepted_options(cls: type) -> frozenset[str] | None:
    """The keyword arguments a filesystem class takes: the named parameters of each
    ``__init__`` up its class chain while they forward ``**kwargs`` to the next, plus the
    request options of HTTP (aiohttp) and SFTP (paramiko), which forward theirs there.
    ``None`` when a signature cannot be read."""
    names = set(GENERIC_OPTIONS)
    for klass in cls.__mro__:
        init = vars(klass).get("__init__")
        if init is None:
            continue
        try:
            params = list(inspect.signature(init).parameters.values())
        except (TypeError, ValueError):
            return None
        names.update(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    names.discard("self")
    chain = {klass.__name__ for klass in cls.__mro__}
    forwarded = {"HTTPFileSystem": ("aiohttp", "ClientSession", "_request"),
                 "SFTPFileSystem": ("paramiko", "SSHClient", "connect")}
    for base, (module, owner, method) in forwarded.items():
        if base in chain:
            try:
                target = getattr(getattr(importlib.import_module(module), owner), method)
                names.update(inspect.signature(target).parameters)
            except (ImportError, AttributeError, TypeError, ValueError):
                return None
    return frozenset(names)


def missing_package_hint(url: str, exc: ImportError) -> str:
    """Name the pip package a protocol needs, from fsspec's registry or the failed import."""
    protocol = url_protocol(url)
    for proto in (p.split("://")[0] for p in url.split("::")):
        target = known_implementations.get(proto, {}).get("class", "")
        if target and not target.startswith("fsspec."):
            module = target.split(".")[0]
            if not _importable(module):
                protocol = proto
                break
    else:
        cause = exc.__cause__ if isinstance(exc.__cause__, ImportError) else exc
        module = (getattr(cause, "name", None) or "").split(".")[0]
        if not module:
            return f"the {protocol!r} protocol needs a package that is not installed ({one_line(exc)})"
    package = PIP_NAMES.get(module, module)
    return f"the {protocol!r} protocol needs the package {package}: pip install {package}"


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (backend errors can span many lines)."""
    text = str(exc).strip().splitlines()
    message = text[0] if text else ""
    name = type(exc).__name__
    return f"{name}: {message}" if message else name


@contextlib.contextmanager
def storage_errors(action: str, url: str) -> Iterator[None]:
    """Turn a backend failure into one ``StorageError`` line naming the action and URL."""
    try:
        yield
    except StorageError:
        raise
    except FileNotFoundError as exc:
        raise StorageError(f"cannot {action} {url!r}: no such file") from exc
    except PermissionError as exc:
        raise StorageError(f"cannot {action} {url!r}: permission denied ({one_line(exc)})") from exc
    except IsADirectoryError as exc:
        raise StorageError(f"cannot {action} {url!r}: it is a directory") from exc
    except ImportError as exc:
        raise StorageError(f"cannot {action} {url!r}: {missing_package_hint(url, exc)}") from exc
    except Exception as exc:  # botocore, aiohttp, ... all end here as one line
        raise StorageError(f"cannot {action} {url!r}: {one_line(exc)}") from exc


def parse_options(items: Iterable[str]) -> dict[str, Any]:
    """CLI ``key=value`` storage options; values are JSON when they parse (``true``, ``3``,
    ``{...}``), else strings; dotted keys nest (``client_kwargs.endpoint_url=http://…``)."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise StorageError(f"storage option {item!r} is not key=value")
        try:
            value: Any = json.loads(raw)
        except ValueError:
            value = raw
        *parents, leaf = key.split(".")
        table = options
        for part in parents:
            nested = table.setdefault(part, {})
            if not isinstance(nested, dict):
                raise StorageError(f"storage option {key!r} conflicts with {part}={nested!r}")
            table = nested
        table[leaf] = value
    return options
