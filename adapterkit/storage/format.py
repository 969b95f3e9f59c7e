"""The adapter file format: safetensors plus adapterkit string metadata, checked strictly.

Layout (plain safetensors, readable by ``safetensors.torch.load``): an 8-byte
little-endian header length ``N``, ``N`` bytes of JSON (space-padded so the data starts
8-byte aligned), then the tensors back to back, largest element size first so every
tensor is aligned. Metadata keys:

``adapterkit.format``     format version (``1``, ``2`` or ``3``; newer files are refused)
``adapterkit.content``    ``adapter`` (a whole attached model's adapter) or ``tensors``
``adapterkit.recipe``     recipe JSON (adapters)
``adapterkit.plugins``    JSON ``{plugin: version}`` of the plugins that provide the recipe's
                          kind and roles (adapters; ``{}`` for plain tensors)
``adapterkit.sites``      JSON list of adapted module names (adapters)
``adapterkit.extra``      JSON list of the tensors stored beside an adapter that are not
                          part of it (e.g. a classifier head); ``load`` skips them
``adapterkit.folded``     JSON ``{"recipe": ..., "sites": [...]}``: sites folded into base
                          weights, their own factors stored (``load`` refolds them; format 3)
``adapterkit.history``    JSON list of the steps (attach, merge, adapt) that made it (format 3)
``adapterkit.writer``     ``adapterkit <version>`` that wrote the file
``adapterkit.xxh3_128``   JSON ``{tensor: XXH3-128 hex of its bytes}``: the tensor data
                          digest, per tensor so a partial load can verify what it fetched
                          (format 1 files carry ``adapterkit.sha256`` instead; both load)
``adapterkit.digest``     ``sha256:<hex>`` of the header (below); through the per-tensor
                          digests it covers all tensor data too

The header digest, format 3: sha256 of the canonical serialisation of the entire
header (``json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True)``)
with only the digest's value replaced by ``""``. The header bytes must *be* that
canonical serialisation (plus at most 7 spaces of padding), so every header byte is
covered: the length, the format key and its value, every key name, the padding. Format
1 and 2 digests covered the metadata and tensor entries but not the format key's
presence (a flipped ``adapterkit.format`` key name made a file look foreign and
unverified); such files are still read, but only when they are exactly what the old
writer produced: the old key set for their content, the old byte layout, the old digest.

Untrusted input: a file is checked before anything is built from it. Nesting is
bounded before JSON parsing (:func:`json_shape`, a linear scan), so are the counts of
tensors, values and metadata keys; every field has a type and bounds (shapes agree with
dtypes and offsets, offsets with the file size); lone surrogates are refused.

Why XXH3 for the data: verifying must not cost more than reading. XXH3-128 hashes at
memory speed (~18 GB/s on one core here, sha256 ~1.7 GB/s) and catches truncation, flipped
bits and mixed writes. Neither hash would prove the file untampered, as the digests sit
in the file itself: pin the header digest elsewhere for provenance (and know that XXH3,
unlike sha256, is not collision resistant against a deliberate forger).

Other metadata keys are the caller's (e.g. ``name``, ``task``).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import re
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from json.encoder import encode_basestring_ascii as _quote  # type: ignore[attr-defined]
from typing import Any

import attrs
import numpy
import torch
import xxhash

from .errors import StorageError

FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
PREFIX = "adapterkit."
KEY_FORMAT = "adapterkit.format"
KEY_CONTENT = "adapterkit.content"
KEY_RECIPE = "adapterkit.recipe"
KEY_PLUGINS = "adapterkit.plugins"
KEY_SITES = "adapterkit.sites"
KEY_EXTRA = "adapterkit.extra"
KEY_WRITER = "adapterkit.writer"
KEY_XXH3 = "adapterkit.xxh3_128"
KEY_SHA256 = "adapterkit.sha256"  # format 1
KEY_DIGEST = "adapterkit.digest"
KEY_FOLDED = "adapterkit.folded"  # format 3: {"recipe": ..., "sites": [...]}, sites folded into base weights
KEY_HISTORY = "adapterkit.history"  # format 3: the steps (attach, merge, adapt) and the plugins that made them
CONTENTS = ("adapter", "tensors")
METADATA = "__metadata__"

PROBE_BYTES = 64 * 1024  # first ranged read: the header of any ordinary adapter fits
MAX_HEADER = 256 * 1024 * 1024  # refuse absurd header lengths before allocating them
# Bounds on what a header may describe, checked before use (most before JSON parsing):
MAX_TENSORS = 100_000  # a 70B-parameter LLM with LoRA on every linear layer holds ~1,100
MAX_DIMS = 16  # dimensions of one tensor
MAX_ELEMENTS = 2**62  # product of a shape's dimensions (zeros counted as ones): int64 strides
MAX_METADATA_KEYS = 4096
MAX_PLUGINS = 64
MAX_JSON_DEPTH = 32  # nesting of the JSON inside metadata values (the recipe)
MAX_RECIPE_VALUES = 100_000
HEADER_DEPTH = 3  # a safetensors header: {name: {"shape": [...]}}; metadata values are strings
SCAN_CHUNK = 64 * 1024

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
ENTRY_KEYS = frozenset({"dtype", "shape", "data_offsets"})
# metadata key of the per-tensor data digests, per format version
DATA_DIGEST_KEY = {1: KEY_SHA256, 2: KEY_XXH3, 3: KEY_XXH3}
_HEX = {KEY_XXH3: re.compile(r"[0-9a-f]{32}"), KEY_SHA256: re.compile(r"[0-9a-f]{64}")}
_HEADER_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_VERSION = re.compile(r"[1-9][0-9]{0,8}")
_SURROGATE = re.compile("[\ud800-\udfff]")


@attrs.frozen
class TensorInfo:
    """One tensor entry of a header; ``offsets`` are relative to the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offsets: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return self.offsets[1] - self.offsets[0]

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "nbytes": self.nbytes}


@attrs.frozen
class Header:
    """A parsed, validated header. ``header_size`` counts the 8 length bytes.
    ``verified``: parsed from bytes and every check (digest included) passed."""

    header_size: int
    data_size: int
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    verified: bool = attrs.field(default=False, eq=False)

    @property
    def file_size(self) -> int:
        return self.header_size + self.data_size

    @property
    def version(self) -> int | None:
        """The adapterkit format version, ``None`` for a foreign safetensors file."""
        raw = self.metadata.get(KEY_FORMAT)
        return None if raw is None else int(raw)

    @property
    def content(self) -> str:
        return self.metadata.get(KEY_CONTENT, "safetensors")

    def json_value(self, key: str, default: Any = None) -> Any:
        raw = self.metadata.get(key)
        return default if raw is None else loads_bounded(raw, MAX_JSON_DEPTH)


@attrs.frozen
class AdapterFields:
    """The adapterkit metadata values of a header, parsed and checked against their schema."""

    recipe: dict[str, Any] | None
    plugins: dict[str, str]
    sites: tuple[str, ...]
    extra: tuple[str, ...]


# --- bounded JSON ------------------------------------------------------------------------


@attrs.frozen
class JsonShape:
    """What a linear scan of JSON text sees outside its strings (:func:`json_shape`)."""

    depth: int  # deepest nesting (the scan stops early once it passes its limit)
    objects: int
    arrays: int
    members: int  # ':' separators
    items: int  # ',' separators


def json_shape(data: bytes | bytearray | memoryview, max_depth: int) -> JsonShape:
    """Nesting depth and the counts of objects, arrays and separators of JSON text, from
    one linear pass over its bytes that tells strings apart (quotes not escaped by an odd
    run of backslashes), before any parsing: ``json.loads`` recurses once per level
    (100,000 levels are a RecursionError) and builds a Python object per value.

    Numpy, 64 KiB at a time (a few MiB of temporaries, ~1 GB/s). For invalid JSON the
    counts are exact up to the first error, which is as far as a JSON parser reads."""
    arr = numpy.frombuffer(data, dtype=numpy.uint8)
    in_string = 0  # inside a string at the start of the chunk
    run = 0  # backslashes just before the chunk
    depth = deepest = objects = arrays = members = items = 0
    for start in range(0, arr.size, SCAN_CHUNK):
        c = arr[start : start + SCAN_CHUNK]
        index = numpy.arange(c.size, dtype=numpy.int64)
        last_other = numpy.maximum.accumulate(numpy.where(c == 0x5C, -1, index))
        runs = index - last_other  # backslashes ending at each byte (inclusive)
        runs[last_other < 0] += run
        escaped = numpy.empty(c.size, dtype=bool)
        escaped[0] = run & 1
        escaped[1:] = (runs[:-1] & 1).astype(bool)
        quotes = numpy.cumsum((c == 0x22) & ~escaped, dtype=numpy.int64)  # real quotes up to each byte
        outside = ((quotes + in_string) & 1) == 0  # (for the bytes that are not quotes themselves)
        opens_object = (c == 0x7B) & outside
        opens_array = (c == 0x5B) & outside
        closes = ((c == 0x7D) | (c == 0x5D)) & outside
        level = numpy.cumsum(opens_object.astype(numpy.int64) + opens_array - closes) + depth
        deepest = max(deepest, int(level.max()))
        if deepest > max_depth:
            break
        depth = int(level[-1])
        objects += int(numpy.count_nonzero(opens_object))
        arrays += int(numpy.count_nonzero(opens_array))
        members += int(numpy.count_nonzero((c == 0x3A) & outside))
        items += int(numpy.count_nonzero((c == 0x2C) & outside))
        in_string = (in_string + int(quotes[-1])) & 1
        run = int(runs[-1])
    return JsonShape(deepest, objects, arrays, members, items)


class _Refused(ValueError):
    pass


def _no_constant(name: str) -> Any:
    raise _Refused(f"{name} is not a JSON number")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        key = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise _Refused(f"duplicate key {brief(key)}")
    return out


def loads_bounded(text: str, max_depth: int, max_values: int | None = None) -> Any:
    """``json.loads`` for small untrusted JSON (metadata values): nesting and value counts
    bounded before parsing; no duplicate keys, no NaN/Infinity (their JSON output would not
    be valid JSON), no lone surrogates. Raises ``ValueError`` with a one-line reason."""
    if _SURROGATE.search(text):
        raise _Refused("a lone surrogate (not valid Unicode)")
    shape = json_shape(text.encode("utf-8"), max_depth)
    if shape.depth > max_depth:
        raise _Refused(f"JSON nested deeper than {max_depth} levels")
    if max_values is not None and shape.members + shape.items + 1 > max_values:
        raise _Refused(f"more than {max_values:,} JSON values")
    try:
        value = json.loads(text, parse_constant=_no_constant, object_pairs_hook=_no_duplicates)
    except RecursionError:  # not reached after the scan; kept as a guard
        raise _Refused(f"JSON nested deeper than {max_depth} levels") from None
    except _Refused:
        raise
    except ValueError as exc:  # JSONDecodeError, and ints over 4,300 digits
        raise _Refused(first_line(exc)) from None
    _check_strings(value)
    return value


def _check_strings(value: Any) -> None:
    """Refuse lone surrogates in a parsed JSON value (``"\\ud800"`` escapes decode to them)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                raise _Refused("a lone surrogate (not valid Unicode)")
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def brief(value: Any, limit: int = 80) -> str:
    """``repr`` of a value from a file, cut to ``limit`` characters for messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- writing ----------------------------------------------------------------------------


def layout(tensors: Mapping[str, torch.Tensor]) -> list[TensorInfo]:
    """Data offsets, largest element size first (stable), so every tensor is aligned."""
    order = sorted(tensors, key=lambda name: -tensors[name].element_size())
    infos, offset = [], 0
    for name in order:
        tensor = tensors[name]
        if tensor.dtype not in DTYPE_NAMES:
            raise StorageError(f"tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot store")
        nbytes = tensor.numel() * tensor.element_size()
        infos.append(TensorInfo(name, DTYPE_NAMES[tensor.dtype], tuple(tensor.shape), (offset, offset + nbytes)))
        offset += nbytes
    return infos


def encode_header(infos: list[TensorInfo], metadata: Mapping[str, str]) -> bytes:
    """Length prefix + JSON header padded with spaces to an 8-byte boundary, digest added.

    With ``adapterkit.format`` in ``metadata`` the header is written in that version's
    canonical form with its digest (format 1 and 2 only for tests of old files)."""
    meta = {k: v for k, v in metadata.items() if k != KEY_DIGEST}
    version = int(meta[KEY_FORMAT]) if KEY_FORMAT in meta else None
    if version is None:
        table: dict[str, Any] = {METADATA: meta}
        for info in infos:
            table[info.name] = {"dtype": info.dtype, "shape": list(info.shape), "data_offsets": list(info.offsets)}
        text = json.dumps(table, separators=(",", ":"), ensure_ascii=True)
    else:
        meta[KEY_DIGEST] = header_digest(infos, meta)
        text = "".join(_canonical(version, meta, infos))
    body = text.encode()
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body


def header_digest(infos: Iterable[TensorInfo] | Mapping[str, TensorInfo], metadata: Mapping[str, str]) -> str:
    """``sha256:<hex>`` of the header by the rule of its format version (module docstring):
    format 3 covers the whole canonical header with only the digest's value blanked;
    formats 1 and 2 cover the tensor entries and every metadata key but the digest."""
    entries = list(infos.values() if isinstance(infos, Mapping) else infos)
    version = int(metadata[KEY_FORMAT])
    pieces = _legacy_digest_input(metadata, entries) if version < 3 else _canonical(version, metadata, entries, "")
    digest = hashlib.sha256()
    for chunk in _batched(pieces):
        digest.update(chunk.encode("ascii"))
    return "sha256:" + digest.hexdigest()


def _canonical(
    version: int, metadata: Mapping[str, str], infos: Iterable[TensorInfo], digest: str | None = None
) -> Iterator[str]:
    """The header JSON exactly as adapterkit writes it, in pieces; ``digest`` replaces the
    digest value. Format 3: every object's keys sorted. Formats 1 and 2 (the old writer):
    metadata first, then the tensors in data order, entry keys dtype, shape, data_offsets."""
    meta = dict(metadata)
    if digest is not None:
        meta[KEY_DIGEST] = digest
    if version >= 3:
        entries = {info.name: info for info in infos}
        names = sorted(entries)
        at = bisect.bisect_left(names, METADATA)
        yield "{"
        for i, name in enumerate(names[:at]):
            yield ("," if i else "") + _quote(name) + ":" + _entry_v3(entries[name])
        yield ("," if at else "") + '"__metadata__":'
        yield json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        for name in names[at:]:
            yield "," + _quote(name) + ":" + _entry_v3(entries[name])
        yield "}"
    else:
        yield '{"__metadata__":'
        yield json.dumps(meta, separators=(",", ":"), ensure_ascii=True)
        for info in infos:
            yield (f',{_quote(info.name)}:{{"dtype":"{info.dtype}","shape":[{_ints(info.shape)}],'
                   f'"data_offsets":[{info.offsets[0]},{info.offsets[1]}]}}')
        yield "}"


def _entry_v3(info: TensorInfo) -> str:
    start, end = info.offsets
    return f'{{"data_offsets":[{start},{end}],"dtype":"{info.dtype}","shape":[{_ints(info.shape)}]}}'


def _legacy_digest_input(metadata: Mapping[str, str], infos: list[TensorInfo]) -> Iterator[str]:
    """Formats 1-2: JSON of ``{"metadata": {all but the digest}, "tensors": {name: [dtype,
    shape, offsets]}}``, keys sorted, compact."""
    yield '{"metadata":'
    yield json.dumps({k: v for k, v in metadata.items() if k != KEY_DIGEST},
                     sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    yield ',"tensors":{'
    for i, info in enumerate(sorted(infos, key=lambda t: t.name)):
        yield (("," if i else "") + _quote(info.name)
               + f':["{info.dtype}",[{_ints(info.shape)}],[{info.offsets[0]},{info.offsets[1]}]]')
    yield "}}"


def _ints(values: Iterable[int]) -> str:
    return ",".join(map(str, values))


def _batched(pieces: Iterable[str], size: int = 1 << 16) -> Iterator[str]:
    batch: list[str] = []
    length = 0
    for piece in pieces:
        batch.append(piece)
        length += len(piece)
        if length >= size:
            yield "".join(batch)
            batch, length = [], 0
    if batch:
        yield "".join(batch)


def xxh3_hex(data: memoryview | bytes) -> str:
    return xxhash.xxh3_128_hexdigest(data)


def sha256_hex(data: memoryview | bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# metadata key of the per-tensor data digests -> how to compute one (XXH3 is written)
DATA_DIGESTS: dict[str, Callable[[memoryview | bytes], str]] = {KEY_XXH3: xxh3_hex, KEY_SHA256: sha256_hex}


def data_digest_key(header: Header) -> str | None:
    """The metadata key holding this file's per-tensor data digests, if any."""
    return next((key for key in DATA_DIGESTS if key in header.metadata), None)


# --- reading ----------------------------------------------------------------------------


def sniff(prefix: bytes, url: str) -> None:
    """Refuse pickles and other non-safetensors files by their first bytes."""
    if len(prefix) > 8 and prefix[8:9] == b"{":
        return  # a JSON header follows the length: safetensors
    if len(prefix) >= 2 and prefix[0] == 0x80 and 2 <= prefix[1] <= 5:
        raise StorageError(
            f"{url!r} is a pickle file (as torch.save or pickle write), not safetensors; adapterkit "
            "only loads safetensors files, because loading a pickle can run arbitrary code"
        )
    if prefix.startswith(b"PK\x03\x04"):
        raise StorageError(
            f"{url!r} is a zip archive (torch.save writes a pickle inside one), not safetensors; "
            "adapterkit only loads safetensors files, because loading a pickle can run arbitrary code"
        )


def header_length(prefix: bytes, file_size: int, url: str) -> int:
    """The JSON length ``N`` from the first bytes, checked against the file size."""
    sniff(prefix, url)
    if file_size < 8 or len(prefix) < 8:
        raise StorageError(f"{url!r} is truncated or not safetensors: {file_size} bytes, "
                           "less than the 8-byte header length")
    (length,) = struct.unpack("<Q", prefix[:8])
    if length > file_size - 8:
        raise StorageError(
            f"{url!r}: header length {length:,} is larger than the file ({file_size:,} bytes); "
            "the file is truncated or not safetensors"
        )
    if length > MAX_HEADER:
        raise StorageError(f"{url!r}: header length {length:,} exceeds the {MAX_HEADER:,}-byte limit")
    return length


def parse_header(body: bytes | bytearray | memoryview, file_size: int, url: str) -> Header:
    """Parse and check a header (the ``N`` JSON bytes) of a file of ``file_size`` bytes:
    bounds before parsing, a type and bounds for every field, the layout against the file
    size, and for adapterkit files the format version, key set, canonical bytes, header
    digest and metadata schema. Every failure is one ``StorageError`` line."""

    def corrupt(reason: str) -> StorageError:
        return StorageError(f"{url!r}: corrupt safetensors header ({reason})")

    shape = json_shape(body, HEADER_DEPTH)
    if shape.depth > HEADER_DEPTH:
        raise corrupt(f"JSON nested deeper than {HEADER_DEPTH} levels; a safetensors header is "
                      "an object of tensor entries and string metadata")
    if shape.objects > MAX_TENSORS + 2:
        raise StorageError(f"{url!r}: the header holds {shape.objects:,} JSON objects (one per tensor); "
                           f"adapterkit reads at most {MAX_TENSORS:,} tensors per file")
    if shape.members + shape.items > (MAX_DIMS + 8) * shape.objects + 2 * MAX_METADATA_KEYS:
        raise corrupt(f"{shape.members + shape.items:,} JSON values, more than {shape.objects:,} "
                      "tensor entries and the metadata can hold")
    try:
        text = str(body, "utf-8")
    except UnicodeDecodeError as exc:
        raise corrupt(f"not UTF-8 at byte {exc.start}") from None
    try:
        table = json.loads(text, parse_constant=_no_constant, object_pairs_hook=_compact)
    except RecursionError:  # not reached after the scan; kept as a guard
        raise corrupt(f"JSON nested deeper than {HEADER_DEPTH} levels") from None
    except ValueError as exc:  # JSONDecodeError, duplicate keys, NaN/Infinity, ints over 4,300 digits
        raise corrupt(first_line(exc)) from None
    if not isinstance(table, dict):
        raise corrupt("not a JSON object")
    metadata = table.pop(METADATA, {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise corrupt("__metadata__ must map strings to strings")
    if len(metadata) > MAX_METADATA_KEYS:
        raise corrupt(f"{len(metadata):,} metadata keys; adapterkit reads at most {MAX_METADATA_KEYS:,}")
    for key, value in metadata.items():
        if _SURROGATE.search(key) or _SURROGATE.search(value):
            raise corrupt(f"metadata {brief(key)} holds a lone surrogate (not valid Unicode)")
    version = _version(metadata, url)
    if len(table) > MAX_TENSORS:
        raise StorageError(f"{url!r}: the header describes {len(table):,} tensors; "
                           f"adapterkit reads at most {MAX_TENSORS:,} tensors per file")
    header_size = 8 + len(body)
    data_size = file_size - header_size
    tensors: dict[str, TensorInfo] = {}
    for name in list(table):  # entry by entry, so the parsed JSON is freed as the infos are built
        tensors[name] = _tensor_info(name, table.pop(name), url)
    _check_layout(tensors, data_size, url)
    header = Header(header_size, data_size, tensors, metadata)
    if version is not None:
        _check_canonical(header, version, text, url)
        verify_header(header, url)
    return attrs.evolve(header, verified=True)


def _version(metadata: Mapping[str, str], url: str) -> int | None:
    """The format version of an adapterkit file (any ``adapterkit.*`` key makes one), with its
    exact key set; ``None`` for a foreign safetensors file."""
    present = {k for k in metadata if k.startswith(PREFIX)}
    if not present:
        return None
    raw = metadata.get(KEY_FORMAT)
    if raw is None:
        raise StorageError(f"{url!r}: corrupt adapterkit metadata (adapterkit keys but no {KEY_FORMAT}); "
                           "the header was modified or is corrupt")
    if not _VERSION.fullmatch(raw):
        raise StorageError(f"{url!r}: corrupt adapterkit format version {brief(raw)}")
    version = int(raw)
    if version > FORMAT_VERSION:
        raise StorageError(
            f"{url!r} was written with adapterkit storage format version {version}, but this adapterkit "
            f"reads format version {FORMAT_VERSION} at most; upgrade adapterkit to load it"
        )
    if version not in READABLE_VERSIONS:
        raise StorageError(f"{url!r}: corrupt adapterkit format version {brief(raw)}")
    content = metadata.get(KEY_CONTENT)
    if content not in CONTENTS:
        raise StorageError(f"{url!r}: corrupt adapterkit metadata (content {brief(content)})")
    expected = {KEY_FORMAT, KEY_CONTENT, KEY_PLUGINS, KEY_WRITER, KEY_DIGEST, DATA_DIGEST_KEY[version]}
    optional = set()
    if content == "adapter":
        expected.add(KEY_SITES)
        optional.add(KEY_EXTRA)
        if version >= 3:  # a fully folded model has no sites left, so no recipe of them
            optional |= {KEY_HISTORY, KEY_FOLDED}
            expected |= {KEY_RECIPE} if KEY_FOLDED not in present else set()
            optional.add(KEY_RECIPE)
        else:
            expected.add(KEY_RECIPE)
    missing, unexpected = sorted(expected - present), sorted(present - expected - optional)
    if missing or unexpected:
        what = "; ".join(f"{label} {', '.join(map(brief, keys))}" for label, keys
                         in (("missing", missing), ("unexpected", unexpected)) if keys)
        raise StorageError(f"{url!r}: corrupt adapterkit metadata (not the key set of a format {version} "
                           f"{content} file: {what}); the header was modified or is corrupt")
    return version


def _tensor_info(name: str, entry: Any, url: str) -> TensorInfo:
    def bad(reason: str) -> StorageError:
        return StorageError(f"{url!r}: corrupt safetensors header (tensor {brief(name)}: {reason})")

    if _SURROGATE.search(name):
        raise bad("a lone surrogate in the name (not valid Unicode)")
    if not isinstance(entry, _Entry):  # _compact left it a dict: say what is wrong with it
        if not isinstance(entry, dict):
            raise bad("entry is not an object")
        if entry.keys() != ENTRY_KEYS:
            raise bad(f"entry keys {brief(sorted(entry))}, expected data_offsets, dtype, shape")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise bad(f"unsupported dtype {brief(dtype)}")
        if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(type(d) is int for d in shape):
            raise bad(f"bad shape {brief(shape)} (a list of at most {MAX_DIMS} integers)")
        raise bad(f"bad data_offsets {brief(offsets)}")
    dtype, shape, offsets = entry
    if (not all(0 <= d <= MAX_ELEMENTS for d in shape)
            or math.prod(max(d, 1) for d in shape) > MAX_ELEMENTS):
        raise bad(f"bad shape {brief(list(shape))} (at most 2**62 elements, counting zeros as ones)")
    if not 0 <= offsets[0] <= offsets[1]:
        raise bad(f"bad data_offsets {brief(list(offsets))}")
    expected = math.prod(shape) * DTYPES[dtype].itemsize
    if offsets[1] - offsets[0] != expected:
        raise bad(f"{offsets[1] - offsets[0]} bytes for shape {shape} {dtype}, expected {expected}")
    return TensorInfo(name, dtype, shape, offsets)


class _Entry(tuple):  # type: ignore[type-arg]
    """A tensor entry compacted as soon as it is parsed: (dtype, shape, offsets), typed."""

    __slots__ = ()


_DTYPE_KEYS = {name: name for name in DTYPES}  # one string object per dtype name


def _compact(pairs: list[tuple[str, Any]]) -> Any:
    """``object_pairs_hook`` for headers: a well-typed tensor entry becomes a small tuple of
    tuples the moment it is parsed (a dict holding two lists costs about three times as
    much, and a header is mostly entries); any other object stays a dict, for
    :func:`_tensor_info` to say what is wrong with it. Duplicate keys are refused."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        key = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise _Refused(f"duplicate key {brief(key)}")
    if len(out) == 3 and out.keys() == ENTRY_KEYS:
        dtype, shape, offsets = out["dtype"], out["shape"], out["data_offsets"]
        if (type(dtype) is str and dtype in _DTYPE_KEYS and type(shape) is list and len(shape) <= MAX_DIMS
                and all(type(d) is int for d in shape) and type(offsets) is list and len(offsets) == 2
                and type(offsets[0]) is int and type(offsets[1]) is int):
            return _Entry((_DTYPE_KEYS[dtype], tuple(shape), (offsets[0], offsets[1])))
    return out


def _check_layout(tensors: Mapping[str, TensorInfo], data_size: int, url: str) -> None:
    end = 0
    for info in sorted(tensors.values(), key=lambda i: i.offsets):
        if info.offsets[0] != end:
            raise StorageError(f"{url!r}: corrupt safetensors header (tensor {brief(info.name)} starts at "
                               f"{info.offsets[0]}, expected {end}: gap or overlap)")
        end = info.offsets[1]
    if end > data_size:
        raise StorageError(f"{url!r} is truncated: the header describes {end:,} bytes of tensor data, "
                           f"the file holds {data_size:,}")
    if end < data_size:
        raise StorageError(f"{url!r}: {data_size - end:,} unexpected bytes after the tensor data")


def _check_canonical(header: Header, version: int, text: str, url: str) -> None:
    """The header text must be exactly what adapterkit writes for this header (so the
    digest, computed over that form, covers every byte), padded with under 8 spaces."""
    pos = 0
    for piece in _canonical(version, header.metadata, header.tensors.values()):
        if not text.startswith(piece, pos):
            raise StorageError(f"{url!r}: header digest mismatch; the header was modified or is corrupt "
                               f"(its bytes differ from the form format {version} writes, at byte {pos + 8:,})")
        pos += len(piece)
    padding = len(text) - pos
    if padding != -pos % 8 or not text.startswith(" " * padding, pos):
        raise StorageError(f"{url!r}: header digest mismatch; the header was modified or is corrupt "
                           f"(its padding is not {-pos % 8} spaces)")


def verify_header(header: Header, url: str) -> None:
    """An adapterkit file must carry its digests, its header must match its digest and its
    metadata its schema. (Headers from :func:`parse_header` are verified already.)"""
    if header.verified or header.version is None:
        return
    stored, key = header.metadata.get(KEY_DIGEST), data_digest_key(header)
    if stored is None or key is None:
        raise StorageError(f"{url!r}: adapterkit file without its digest; it was modified or is corrupt")
    if not _HEADER_DIGEST.fullmatch(stored) or header_digest(header.tensors, header.metadata) != stored:
        raise StorageError(f"{url!r}: header digest mismatch; the header was modified or is corrupt")
    adapter_fields(header, url)


def adapter_fields(header: Header, url: str) -> AdapterFields:
    """The adapterkit metadata values of ``header`` against their schema: types, bounds,
    and agreement with the tensors (digests for exactly the tensors, extras among them)."""
    def bad(key: str, reason: str) -> StorageError:
        return StorageError(f"{url!r}: corrupt adapterkit metadata ({key}: {reason})")

    def value(key: str, max_values: int) -> Any:
        """The key's JSON value, ``None`` when absent (a present ``null`` is refused)."""
        raw = header.metadata.get(key)
        if raw is None:
            return None
        try:
            parsed = loads_bounded(raw, MAX_JSON_DEPTH, max_values)
        except ValueError as exc:
            raise bad(key, str(exc)) from None
        if parsed is None:
            raise bad(key, "null")
        return parsed

    if header.version is None:
        return AdapterFields(None, {}, (), ())
    count = len(header.tensors)
    key = DATA_DIGEST_KEY.get(header.version) or KEY_XXH3
    digests = value(key, 2 * count + 1)
    if not isinstance(digests, dict) or digests.keys() != header.tensors.keys():
        raise StorageError(f"{url!r}: corrupt adapterkit metadata (per-tensor digests do not match the tensors)")
    if not all(isinstance(d, str) and _HEX[key].fullmatch(d) for d in digests.values()):
        raise bad(key, "a digest that is not lowercase hex of the right length")
    plugins = value(KEY_PLUGINS, 2 * MAX_PLUGINS + 1)
    if not isinstance(plugins, dict) or not all(isinstance(v, str) for v in plugins.values()):
        raise bad(KEY_PLUGINS, f"expected a JSON object of plugin versions, got {brief(plugins)}")
    if len(plugins) > MAX_PLUGINS:
        raise bad(KEY_PLUGINS, f"{len(plugins)} plugins, at most {MAX_PLUGINS}")
    sites = _names(value(KEY_SITES, MAX_TENSORS + 1), KEY_SITES, bad)
    extra = _names(value(KEY_EXTRA, count + 1), KEY_EXTRA, bad)
    if not set(extra) <= header.tensors.keys():
        raise StorageError(f"{url!r}: corrupt adapterkit metadata (extra tensors not in the file)")
    recipe = value(KEY_RECIPE, MAX_RECIPE_VALUES)
    if header.content == "adapter" and (recipe is not None or KEY_FOLDED not in header.metadata):
        reason = recipe_problem(recipe)  # (a fully folded model has no sites left, so no recipe of them)
        if reason:
            raise bad(KEY_RECIPE, reason)
    folded = value(KEY_FOLDED, MAX_RECIPE_VALUES + MAX_TENSORS + 2)
    if folded is not None:
        if not isinstance(folded, dict) or folded.keys() != {"recipe", "sites"}:
            raise bad(KEY_FOLDED, f"expected an object with 'recipe' and 'sites', got {brief(folded)}")
        reason = recipe_problem(folded["recipe"])
        if reason:
            raise bad(KEY_FOLDED, reason)
        _names(folded["sites"], KEY_FOLDED, bad)
    if header.content == "adapter" and recipe is None and not (folded and folded["sites"]):
        raise StorageError(f"{url!r}: corrupt adapterkit metadata (an adapter without its recipe)")
    history = value(KEY_HISTORY, MAX_RECIPE_VALUES)
    if history is not None and not (isinstance(history, list) and all(isinstance(h, dict) for h in history)):
        raise bad(KEY_HISTORY, f"expected a JSON list of steps, got {brief(history)}")
    writer = header.metadata.get(KEY_WRITER, "")
    if not writer.startswith("adapterkit ") or len(writer) > 200:
        raise bad(KEY_WRITER, f"expected 'adapterkit <version>', got {brief(writer)}")
    return AdapterFields(recipe, plugins, sites, extra)


def _names(value: Any, key: str, bad: Callable[[str, str], StorageError]) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise bad(key, f"expected a JSON list of names, got {brief(value)}")
    if len(set(value)) != len(value):
        raise bad(key, "a name listed twice")
    return tuple(value)


def recipe_problem(recipe: Any) -> str | None:
    """Why a stored recipe does not have the recipe schema's shape, or ``None``: the types
    that ``Recipe.from_dict`` and printing rely on (its own checks then apply)."""
    from ..recipe import ROLES

    if not isinstance(recipe, dict):
        return f"expected a JSON object, got {brief(recipe)}"
    unknown = sorted(set(recipe) - {"seed", "adapter", *ROLES})
    if unknown:
        return f"unknown key {brief(unknown[0])}"
    adapter = recipe.get("adapter")
    if not isinstance(adapter, dict):
        return f"'adapter' must be an object, got {brief(adapter)}"
    kind, targets = adapter.get("kind"), adapter.get("targets")
    if not isinstance(kind, str) or not kind or len(kind) > 200:
        return f"'adapter.kind' must be a name, got {brief(kind)}"
    if isinstance(targets, str):
        targets = [targets]
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t for t in targets):
        return f"'adapter.targets' must be a non-empty list of names, got {brief(targets)}"
    for key in ("skills", "seed"):
        holder = adapter if key == "skills" else recipe
        if key in holder and type(holder[key]) is not int:
            return f"{key!r} must be an integer, got {brief(holder[key])}"
    for role in ROLES:
        table = recipe.get(role)
        if table is None:
            continue
        if not isinstance(table, dict):
            return f"{role!r} must be an object, got {brief(table)}"
        name = table.get("name")
        if name is not None and (not isinstance(name, str) or not name or len(name) > 200):
            return f"'{role}.name' must be a name, got {brief(name)}"
    return None
