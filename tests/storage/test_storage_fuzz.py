"""Adversarial files: every single-bit flip of a small adapter, and property-based fuzzing
of crafted safetensors headers and metadata (hypothesis, derandomized so CI is
deterministic). Every outcome is a correct read or one ``StorageError`` line; never another
exception type, never more memory than a small multiple of the file's size.

The bound, measured (tracemalloc: Python and numpy allocations; torch's own C++ tensor
objects are not traced): peak <= 10 x file size + 4 MiB for inspect and load_tensors. The
worst crafted headers found are the ones at the 100,000-tensor limit (~9x: a Python object
per tensor is the floor); string-heavy headers cost ~3x.
"""

from __future__ import annotations

import json
import struct
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import fsspec
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import adapterkit
from adapterkit.storage import StorageError
from adapterkit.storage import format as fmt
from adapterkit.storage.io import parse_whole

MEMORY = fsspec.filesystem("memory")
FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PEAK_FACTOR, PEAK_SLACK = 10, 4 * 2**20


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 2))


TINY = {"adapter": {"kind": "lora", "targets": ["0"], "r": 1}}


@pytest.fixture(scope="module")
def tiny() -> bytes:
    """A tiny adapter (nn.Linear(2, 2), LoRA r=1): a ~1 KB header, 16 bytes of data."""
    model = adapterkit.attach(tiny_model(), TINY)
    with torch.no_grad():
        for tensor in adapterkit.adapter_state_dict(model).values():
            tensor.copy_(torch.randn(tensor.shape, generator=torch.Generator().manual_seed(1)))
    url = "memory://adapterkit-tests/fuzz/tiny.safetensors"
    adapterkit.save(model, url)
    return bytes(MEMORY.cat_file(url))


def legacy(good: bytes, version: int) -> bytes:
    """``good`` as the format 1 or 2 writer wrote it (the old key set, layout and digest)."""
    header = parse_whole(good, "good")
    payload = good[header.header_size:]
    infos = sorted(header.tensors.values(), key=lambda i: i.offsets)
    drop = {fmt.KEY_XXH3, fmt.KEY_HISTORY, fmt.KEY_FOLDED, fmt.KEY_DIGEST}
    meta = {k: v for k, v in header.metadata.items() if k not in drop}
    meta[fmt.KEY_FORMAT] = str(version)
    key = fmt.DATA_DIGEST_KEY[version]
    meta[key] = json.dumps({i.name: fmt.DATA_DIGESTS[key](payload[i.offsets[0]:i.offsets[1]]) for i in infos},
                           separators=(",", ":"))
    return fmt.encode_header(infos, meta) + payload


def outcome(call: Callable[[], Any]) -> tuple[str, Any]:
    """("ok", value) or ("refused", message); any other exception fails the test."""
    try:
        return "ok", call()
    except StorageError as exc:
        message = str(exc)
        assert message and "\n" not in message and message.isprintable(), message
        return "refused", message


# --- every single-bit flip ------------------------------------------------------------------


def flip_all(good: bytes, ops: dict[str, Callable[[str], Any]], bits: range) -> dict[str, list[int]]:
    url = "memory://adapterkit-tests/fuzz/flipped.safetensors"
    accepted: dict[str, list[int]] = {name: [] for name in ops}
    for bit in bits:
        bad = bytearray(good)
        bad[bit // 8] ^= 1 << (bit % 8)
        MEMORY.pipe_file(url, bytes(bad))
        for name, op in ops.items():
            if outcome(lambda: op(url))[0] == "ok":  # noqa: B023 (called at once)
                accepted[name].append(bit)
    return accepted


OPS: dict[str, Callable[[str], Any]] = {
    "inspect": lambda url: adapterkit.inspect(url),
    "load_tensors": lambda url: adapterkit.load_tensors(url),
    "cp": lambda url: adapterkit.cp(url, "memory://adapterkit-tests/fuzz/copy.safetensors"),
    "load": lambda url: adapterkit.load(url, tiny_model()),
    "ls": lambda url: adapterkit.ls(url)[0].info or (_ for _ in ()).throw(StorageError("refused")),
}


def test_every_single_bit_flip_of_a_small_adapter_is_refused(tiny: bytes) -> None:
    """Exhaustive: each of the 8 x len(file) single-bit flips (header, padding and data) is
    refused by load_tensors, cp and load, and each header flip by inspect and ls too (which
    read only headers by design: a data flip is load's and cp's to catch)."""
    header_size = parse_whole(tiny, "tiny").header_size
    began = time.perf_counter()
    accepted = flip_all(tiny, OPS, range(8 * len(tiny)))
    seconds = time.perf_counter() - began
    header_bits = 8 * header_size
    for name in ("inspect", "ls"):  # header-only readers
        assert accepted[name] == list(range(header_bits, 8 * len(tiny))), f"only data flips pass {name}"
    for name in ("load_tensors", "cp", "load"):
        assert not accepted[name], f"{name} accepted {len(accepted[name])} flips, e.g. bits {accepted[name][:5]}"
    print(f"\n{8 * len(tiny):,} flips ({header_bits:,} in the header) x {len(OPS)} readers in {seconds:.1f} s")


@pytest.mark.parametrize("version", [1, 2])
def test_old_formats_load_only_when_genuine(tiny: bytes, version: int) -> None:
    """A genuine format 1 or 2 file loads; each single-bit flip of its header is refused
    (flips that change the version or a key name included)."""
    old = legacy(tiny, version)
    url = f"memory://adapterkit-tests/fuzz/v{version}.safetensors"
    MEMORY.pipe_file(url, old)
    assert adapterkit.inspect(url).format_version == version
    adapterkit.load(url, tiny_model())
    header_size = parse_whole(old, "old").header_size
    ops = {name: OPS[name] for name in ("inspect", "load_tensors")}  # (load and cp parse as load_tensors does)
    accepted = flip_all(old, ops, range(8 * header_size))
    assert not any(accepted.values()), {k: v[:5] for k, v in accepted.items() if v}


def test_a_format_2_file_claiming_format_1_or_3_is_refused(tiny: bytes) -> None:
    old = legacy(tiny, 2)
    at = old.index(b'"adapterkit.format":"2"') + len('"adapterkit.format":"')
    for claim in (b"1", b"3"):
        url = "memory://adapterkit-tests/fuzz/claims.safetensors"
        MEMORY.pipe_file(url, old[:at] + claim + old[at + 1:])
        assert outcome(lambda: adapterkit.inspect(url))[0] == "refused"  # noqa: B023


# --- fuzzing crafted headers ------------------------------------------------------------------

JUNK = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False),
                 st.text(max_size=8), st.lists(st.integers(-3, 3), max_size=3), st.just({}))
DIMS = st.one_of(st.integers(0, 4), st.sampled_from([0, 2**31, 2**62, 2**63, -1]))
NASTY_TEXT = st.lists(st.characters(codec="utf-8") | st.sampled_from(["\n", "\x1b[2J", "\u202e", "\ud800", "\x00"]),
                      max_size=8).map("".join)


METADATA_KEYS = st.sampled_from([fmt.KEY_FORMAT, fmt.KEY_CONTENT, fmt.KEY_RECIPE, fmt.KEY_PLUGINS, fmt.KEY_SITES,
                                 fmt.KEY_EXTRA, fmt.KEY_WRITER, fmt.KEY_XXH3, fmt.KEY_SHA256, fmt.KEY_DIGEST,
                                 fmt.KEY_FOLDED, fmt.KEY_HISTORY, "adapterkit.other", "task"]) | NASTY_TEXT
JSON_VALUES = st.recursive(JUNK | NASTY_TEXT, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(NASTY_TEXT, inner, max_size=3), max_leaves=8)
STRING_VALUES = st.one_of(NASTY_TEXT, JSON_VALUES.map(json.dumps), st.sampled_from(["1", "2", "3", "4", "01", "3 "]),
                          st.sampled_from(["adapter", "tensors", "adapterkit 0.1.0", "sha256:" + "0" * 64]))
METADATA_VALUES = STRING_VALUES | JUNK
RECIPES = st.fixed_dictionaries({"adapter": st.fixed_dictionaries(
    {"kind": st.sampled_from(["lora", "nope"]) | JUNK, "targets": st.just(["0"]) | JUNK})}) | JSON_VALUES
RECIPE_LIKE = st.one_of(RECIPES.map(json.dumps), st.fixed_dictionaries(
    {"recipe": RECIPES, "sites": st.lists(NASTY_TEXT, max_size=2) | JUNK}).map(json.dumps),
    st.lists(st.dictionaries(st.sampled_from(["op", "plugin", "name"]), NASTY_TEXT | JUNK), max_size=2).map(json.dumps))
MUTATIONS = ["field", "entry", "extra_key", "data_length", "metadata", "metadata_value", "dims", "offsets"]


@st.composite
def crafted_files(draw: Any) -> bytes:
    """A safetensors file that is mostly well formed (tensors tile the data, metadata maps
    strings to strings, so the deeper checks are reached), then up to three mutations."""
    names = draw(st.lists(NASTY_TEXT, max_size=5, unique=True))
    table: dict[str, Any] = {}
    offset = 0
    for name in names:
        dtype = draw(st.sampled_from(sorted(fmt.DTYPES)))
        shape = draw(st.lists(st.integers(0, 3), max_size=4))
        nbytes = fmt.DTYPES[dtype].itemsize * int(torch.tensor(shape, dtype=torch.int64).prod())
        table[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    data = draw(st.binary(min_size=offset, max_size=offset))
    if draw(st.booleans()):
        table["__metadata__"] = draw(st.dictionaries(METADATA_KEYS, STRING_VALUES, max_size=6))
    for mutation in draw(st.lists(st.sampled_from(MUTATIONS), max_size=3)):
        name = draw(st.sampled_from(names)) if names else None
        entry = table.get(name) if name is not None else None
        if mutation == "field" and isinstance(entry, dict):
            entry[draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = draw(JUNK | NASTY_TEXT)
        elif mutation == "entry" and name is not None:
            table[name] = draw(JSON_VALUES)
        elif mutation == "extra_key" and isinstance(entry, dict):
            entry[draw(NASTY_TEXT)] = draw(JUNK)
        elif mutation == "data_length":
            data = data[: draw(st.integers(0, len(data)))] + draw(st.binary(max_size=3))
        elif mutation == "metadata":
            table["__metadata__"] = draw(JSON_VALUES)
        elif mutation == "metadata_value":
            table.setdefault("__metadata__", {})
            if isinstance(table["__metadata__"], dict):
                table["__metadata__"][draw(METADATA_KEYS)] = draw(METADATA_VALUES)
        elif mutation == "dims" and isinstance(entry, dict):
            entry["shape"] = draw(st.lists(DIMS, max_size=18))
        elif mutation == "offsets" and isinstance(entry, dict):
            entry["data_offsets"] = draw(st.lists(st.integers(-2, 2**64), max_size=3))
    text = json.dumps(table, ensure_ascii=draw(st.booleans()))
    raw = text.encode("utf-8", "surrogatepass")
    raw += b" " * draw(st.integers(0, 9))
    length = draw(st.integers(0, 2**64 - 1)) if draw(st.sampled_from(range(20))) == 7 else len(raw)
    return struct.pack("<Q", length) + raw + data


def check_read(url: str, size: int) -> None:
    """Every reader: one clean error or a correct result; memory within the bound."""
    for name, call in (("inspect", lambda: adapterkit.inspect(url)),
                       ("load_tensors", lambda: adapterkit.load_tensors(url, verify=False))):
        tracemalloc.start()
        try:
            status, value = outcome(call)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak <= PEAK_FACTOR * size + PEAK_SLACK, (name, peak, size)
        if status == "ok" and name == "inspect":
            assert all(line.isprintable() for line in str(value).splitlines())
            json.loads(json.dumps(value.to_dict(), allow_nan=False))  # valid JSON, no NaN
        if status == "ok" and name == "load_tensors":
            info = adapterkit.inspect(url)
            assert {t.name: (t.dtype, t.shape) for t in info.tensors} == {
                k: (fmt.DTYPE_NAMES[v.dtype], tuple(v.shape)) for k, v in value.items()}
    for call in (lambda: adapterkit.load_tensors(url), lambda: adapterkit.cp(url, f"{url}.copy.safetensors"),
                 lambda: adapterkit.load(url, tiny_model())):
        outcome(call)
    for entry in adapterkit.ls(url.rpartition("/")[0] + "/"):
        assert entry.error is None or entry.error.isprintable()


@FUZZ
@given(crafted_files())
def test_fuzz_crafted_headers(data: bytes) -> None:
    url = "memory://adapterkit-tests/fuzz/crafted/a.safetensors"
    MEMORY.pipe_file(url, data)
    check_read(url, len(data))


@st.composite
def crafted_metadata(draw: Any, good: bytes) -> bytes:
    """The tiny adapter with adapterkit metadata values replaced, re-digested: every schema
    check is reached (the digest is right)."""
    header = parse_whole(good, "good")
    meta = dict(header.metadata)
    keys = sorted({*meta, fmt.KEY_FOLDED, fmt.KEY_EXTRA} - {fmt.KEY_DIGEST})
    for key in draw(st.lists(st.sampled_from(keys), max_size=3)):
        meta[key] = draw(STRING_VALUES | RECIPE_LIKE)
    for key in draw(st.lists(st.sampled_from(keys), max_size=2)):
        meta.pop(key, None)
    if draw(st.booleans()):
        meta[draw(NASTY_TEXT.filter(lambda k: not k.startswith("adapterkit.")))] = draw(NASTY_TEXT)
    infos = sorted(header.tensors.values(), key=lambda i: i.offsets)
    meta = {k: v.encode("utf-8", "replace").decode() if k != fmt.KEY_FORMAT else "3" for k, v in meta.items()}
    return fmt.encode_header(infos, meta) + good[header.header_size:]


@FUZZ
@given(st.data())
def test_fuzz_crafted_metadata(tiny: bytes, data: Any) -> None:
    blob = data.draw(crafted_metadata(tiny))
    url = "memory://adapterkit-tests/fuzz/meta/a.safetensors"
    MEMORY.pipe_file(url, blob)
    check_read(url, len(blob))


@FUZZ
@given(st.data())
def test_fuzz_edits_of_a_good_file(tiny: bytes, data: Any) -> None:
    """Byte edits (replace, insert, delete) anywhere: load_tensors, cp and load refuse every
    change; inspect refuses every change to the header."""
    blob = bytearray(tiny)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(blob)))
        kind = data.draw(st.sampled_from(["replace", "insert", "delete"]))
        if kind == "replace" and at < len(blob):
            blob[at] = data.draw(st.integers(0, 255))
        elif kind == "insert":
            blob[at:at] = data.draw(st.binary(min_size=1, max_size=3))
        else:
            del blob[at:at + data.draw(st.integers(1, 3))]
    if bytes(blob) == tiny:
        return
    url = "memory://adapterkit-tests/fuzz/edits/a.safetensors"
    MEMORY.pipe_file(url, bytes(blob))
    for call in (lambda: adapterkit.load_tensors(url), lambda: adapterkit.cp(url, f"{url}.copy.safetensors"),
                 lambda: adapterkit.load(url, tiny_model())):
        assert outcome(call)[0] == "refused"
    header_size = parse_whole(tiny, "tiny").header_size
    if blob[:header_size] != tiny[:header_size]:
        assert outcome(lambda: adapterkit.inspect(url))[0] == "refused"


# --- memory on large crafted headers ------------------------------------------------------------


def large_header(count: int, dims: int, name_length: int, dtype: str, adapterkit_file: bool) -> bytes:
    """``count`` zero-size tensors: the costliest header per byte (a Python object per tensor)."""
    shape = [0] + [1] * max(dims - 1, 0) if dims else [0]
    names = [f"{i:0{name_length}d}" for i in range(count)]
    if adapterkit_file:
        infos = [fmt.TensorInfo(name, dtype, tuple(shape), (0, 0)) for name in names]
        digests = json.dumps({name: "0" * 32 for name in names})
        meta = {fmt.KEY_FORMAT: "3", fmt.KEY_CONTENT: "tensors", fmt.KEY_PLUGINS: "{}",
                fmt.KEY_WRITER: "adapterkit 0", fmt.KEY_XXH3: digests}
        return fmt.encode_header(infos, meta)
    entry = json.dumps({"dtype": dtype, "shape": shape, "data_offsets": [0, 0]}, separators=(",", ":"))
    table = ("{" + ",".join(f'"{name}":{entry}' for name in names) + "}").encode()
    table += b" " * (-len(table) % 8)
    return struct.pack("<Q", len(table)) + table


def peaks(data: bytes) -> dict[str, tuple[str, float]]:
    """(outcome, tracemalloc peak / file size) of inspect and load_tensors."""
    url = "memory://adapterkit-tests/fuzz/large/a.safetensors"
    MEMORY.pipe_file(url, data)
    MEMORY.cat_file(url, start=0, end=8)  # memory:// copies a stored file once on its first read: not ours
    out = {}
    for name, call in (("inspect", lambda: adapterkit.inspect(url)),
                       ("load_tensors", lambda: adapterkit.load_tensors(url, verify=False))):
        tracemalloc.start()
        try:
            status, _ = outcome(call)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak <= PEAK_FACTOR * len(data) + PEAK_SLACK, (name, peak / len(data), len(data))
        out[name] = (status, peak / len(data))
    return out


@settings(max_examples=10, deadline=None, derandomize=True, database=None)
@given(count=st.integers(1, 3000), dims=st.integers(0, 16), name_length=st.integers(1, 40),
       dtype=st.sampled_from(["U8", "F64"]), adapterkit_file=st.booleans())
def test_memory_of_crafted_headers_with_many_tensors(count: int, dims: int, name_length: int, dtype: str,
                                                     adapterkit_file: bool) -> None:
    data = large_header(count, dims, name_length, dtype, adapterkit_file)
    assert {status for status, _ in peaks(data).values()} == {"ok"}


@pytest.mark.parametrize("adapterkit_file", [False, True])
def test_memory_at_the_tensor_limit(adapterkit_file: bool) -> None:
    """Short names, one dimension: the highest peak per header byte found (~9x). At the limit
    the ratio is that of 30,000 tensors (measured: the same within 0.1x); one more than the
    limit is refused from the scan."""
    got = peaks(large_header(30_000, 1, 5, "U8", adapterkit_file))
    assert {status for status, _ in got.values()} == {"ok"}, got
    print(f"\npeak / file size at 30,000 tensors ({'adapterkit' if adapterkit_file else 'foreign'}): {got}")
    over = peaks(large_header(fmt.MAX_TENSORS + 2, 1, 6, "U8", adapterkit_file=False))  # (+ root object)
    assert {status for status, _ in over.values()} == {"refused"} and max(r for _, r in over.values()) < 2.1


# --- the structure scan ------------------------------------------------------------------------


def reference_shape(text: str) -> tuple[int, int, int, int, int]:
    depth = deepest = objects = arrays = members = items = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
            continue
        if ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
            objects += ch == "{"
            arrays += ch == "["
        elif ch in "]}":
            depth -= 1
        members += ch == ":"
        items += ch == ","
    return deepest, objects, arrays, members, items


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(JSON_VALUES, st.booleans(), st.integers(1, 64))
def test_json_shape_matches_a_reference_scanner(value: Any, ascii_only: bool, chunk: int) -> None:
    text = json.dumps(value, ensure_ascii=ascii_only)
    raw = text.encode("utf-8", "surrogatepass")
    original = fmt.SCAN_CHUNK
    fmt.SCAN_CHUNK = chunk  # tiny chunks: every carry across a chunk boundary is exercised
    try:
        got = fmt.json_shape(raw, 10**9)
    finally:
        fmt.SCAN_CHUNK = original
    assert (got.depth, got.objects, got.arrays, got.members, got.items) == reference_shape(text)


def test_json_shape_on_backslash_runs() -> None:
    for text in ['["\\\\"]', '["\\\\\\""]', '{"a\\\\":["\\"[[["]}', '"' + "\\\\" * 5000 + '"', '["\\u005b"]']:
        assert json.loads(text) is not None
        for chunk in (1, 2, 3, 7, 64 * 1024):
            fmt.SCAN_CHUNK, original = chunk, fmt.SCAN_CHUNK
            try:
                got = fmt.json_shape(text.encode(), 10**9)
            finally:
                fmt.SCAN_CHUNK = original
            assert (got.depth, got.objects, got.arrays, got.members, got.items) == reference_shape(text), text
