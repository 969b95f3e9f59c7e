"""Named tensors to and from one safetensors file at any fsspec URL, with digests.

``save_tensors``/``load_tensors`` are the low level under ``adapterkit.save``/``load`` and
serve anything that is not a whole attached model: per-task routing rows (MHR-z),
merged results, skill inventories.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .errors import StorageError
from .format import (
    DATA_DIGESTS,
    FORMAT_VERSION,
    KEY_CONTENT,
    KEY_FORMAT,
    KEY_PLUGINS,
    KEY_WRITER,
    KEY_XXH3,
    MAX_DIMS,
    MAX_METADATA_KEYS,
    MAX_TENSORS,
    PREFIX,
    Header,
    TensorInfo,
    data_digest_key,
    encode_header,
    layout,
    verify_header,
)
from .io import Buffer, parse_whole, read_all, read_header, read_ranges, writable_copy, write_atomic
from .urls import Location, resolve

RANGE_GAP = 1024 * 1024  # fetch small gaps between wanted tensors rather than issue another request


def hash_all(views: Sequence[memoryview], key: str = KEY_XXH3) -> list[str]:
    """The data digest of each view, by the algorithm stored under metadata ``key``."""
    digest = DATA_DIGESTS[key]
    return [digest(v) for v in views]


def tensor_view(tensor: Tensor) -> memoryview:
    """The raw little-endian bytes of a contiguous CPU tensor, without a copy."""
    flat = tensor.reshape(-1).view(torch.uint8)
    return flat.numpy().data.cast("B")


def encode(
    tensors: Mapping[str, Tensor], metadata: Mapping[str, str], content: str
) -> tuple[Header, list[Buffer]]:
    """Header (with digests) and the parts to write, tensor bytes uncopied."""
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise StorageError(f"metadata must map strings to strings, got {key!r}: {type(value).__name__}")
        if key.startswith(PREFIX) and content == "tensors":
            raise StorageError(f"metadata key {key!r} is reserved: keys starting with {PREFIX!r} belong to adapterkit")
        if not _unicode(key) or not _unicode(value):
            raise StorageError(f"metadata {key!r} holds a lone surrogate, which is not valid Unicode "
                               "(readers refuse such files)")
    if len(metadata) > MAX_METADATA_KEYS - 8:  # adapterkit adds its own keys
        raise StorageError(f"{len(metadata):,} metadata keys; files hold at most {MAX_METADATA_KEYS - 8:,} of yours")
    if len(tensors) > MAX_TENSORS:
        raise StorageError(f"{len(tensors):,} tensors; one file holds at most {MAX_TENSORS:,}")
    cpu: dict[str, Tensor] = {}
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not _unicode(name):
            raise StorageError(f"tensor names are valid Unicode strings, got {name!r}")
        if not isinstance(tensor, Tensor):
            raise StorageError(f"{name!r} is a {type(tensor).__name__}, not a tensor")
        if tensor.dim() > MAX_DIMS:
            raise StorageError(f"tensor {name!r} has {tensor.dim()} dimensions; files hold at most {MAX_DIMS}")
        cpu[name] = tensor.detach().to("cpu").contiguous()
    infos = layout(cpu)
    views = [tensor_view(cpu[info.name]) for info in infos]
    digests = hash_all(views)
    meta = {
        **metadata,
        KEY_FORMAT: str(FORMAT_VERSION),
        KEY_CONTENT: content,
        KEY_XXH3: json.dumps({i.name: d for i, d in zip(infos, digests, strict=True)}, separators=(",", ":")),
    }
    meta.setdefault(KEY_PLUGINS, "{}")
    meta[KEY_WRITER] = f"adapterkit {_version()}"
    header_bytes = encode_header(infos, meta)
    header = parse_whole_header(header_bytes, infos)
    return header, [header_bytes, *views]


def _unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_whole_header(header_bytes: bytes, infos: list[TensorInfo]) -> Header:
    data_size = infos[-1].offsets[1] if infos else 0
    metadata = json.loads(header_bytes[8:])["__metadata__"]
    return Header(len(header_bytes), data_size, {i.name: i for i in infos}, metadata)


def _version() -> str:
    from .. import __version__

    return __version__


def save_tensors(
    tensors: Mapping[str, Tensor],
    url: str,
    *,
    metadata: Mapping[str, str] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> Header:
    """Write named tensors as one safetensors file at ``url``, atomically, with digests.

    ``metadata`` adds your own string keys (``adapterkit.*`` is reserved). Returns the header.
    """
    loc = resolve(url, storage_options, write=True)
    header, parts = encode(tensors, dict(metadata or {}), "tensors")
    write_atomic(loc, parts)
    return header


def load_tensors(
    url: str,
    names: Iterable[str] | None = None,
    *,
    storage_options: Mapping[str, Any] | None = None,
    device: torch.device | str | None = None,
    verify: bool = True,
) -> dict[str, Tensor]:
    """Read tensors from a safetensors file at ``url``, checking their digests.

    With ``names``, only the header and those tensors' byte ranges are fetched.
    ``verify=False`` also accepts safetensors files not written by adapterkit (no digests).
    """
    loc = resolve(url, storage_options)
    if names is None:
        data = read_all(loc, writable=True)
        header = parse_whole(data, url)
        check(header, url, verify)
        wanted = list(header.tensors.values())
        pieces = [(data, header.header_size)] * len(wanted)
    else:
        header = read_header(loc)
        check(header, url, verify)
        wanted = select(header, names, url)
        pieces = fetch(loc, header, wanted, writable=True)
    tensors = decode(header, wanted, pieces, url, verify)
    if device is not None:
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return tensors


def check(header: Header, url: str, verify: bool) -> None:
    if verify and header.version is None:
        raise StorageError(f"{url!r} was not written by adapterkit and has no digests to verify; "
                           "pass verify=False to load it anyway")
    verify_header(header, url)


def select(header: Header, names: Iterable[str], url: str) -> list[TensorInfo]:
    wanted = []
    for name in names:
        if name not in header.tensors:
            shown = ", ".join(list(header.tensors)[:6]) + (", ..." if len(header.tensors) > 6 else "")
            raise StorageError(f"{url!r} has no tensor {name!r}; it holds: {shown or 'none'}")
        wanted.append(header.tensors[name])
    return wanted


def fetch(
    loc: Location, header: Header, wanted: list[TensorInfo], *, writable: bool
) -> list[tuple[Buffer, int]]:
    """Fetch the byte ranges of ``wanted`` (nearby ranges merged); per tensor: (buffer, base offset)."""
    spans: list[list[int]] = []  # [start, end] in file offsets
    for info in sorted(wanted, key=lambda i: i.offsets):
        start, end = header.header_size + info.offsets[0], header.header_size + info.offsets[1]
        if spans and start - spans[-1][1] <= RANGE_GAP:
            spans[-1][1] = max(spans[-1][1], end)
        else:
            spans.append([start, end])
    blobs: list[Buffer] = list(read_ranges(loc, [(s, e) for s, e in spans]))
    if writable:
        blobs = [writable_copy(blob) for blob in blobs]
    out = []
    for info in wanted:
        start = header.header_size + info.offsets[0]
        index = max(i for i, span in enumerate(spans) if span[0] <= start)
        blob = blobs[index]
        if len(blob) != spans[index][1] - spans[index][0]:
            raise StorageError(f"{loc.url!r} changed or is truncated: short read of tensor {info.name!r}")
        out.append((blob, header.header_size - spans[index][0]))
    return out


def decode(
    header: Header, wanted: list[TensorInfo], pieces: list[tuple[Buffer, int]], url: str, verify: bool
) -> dict[str, Tensor]:
    """Tensors aliasing the read buffers (no copy), each checked against its digest; one
    view at a time (a header may list 100,000 tensors: no list of views)."""
    expected: dict[str, str] | None = None
    if verify:
        key = data_digest_key(header)
        assert key is not None  # check() refused files without digests
        expected, digest = header.json_value(key), DATA_DIGESTS[key]
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only buffers only reach load(), which copies
        for info, (buf, base) in zip(wanted, pieces, strict=True):
            view = memoryview(buf)[base + info.offsets[0] : base + info.offsets[1]]
            if expected is not None and digest(view) != expected[info.name]:
                raise StorageError(f"{url!r}: tensor {info.name!r} does not match its data digest; "
                                   "the file is corrupted or was modified")
            if view.nbytes == 0:
                out[info.name] = torch.empty(info.shape, dtype=info.torch_dtype)
            else:
                out[info.name] = torch.frombuffer(view, dtype=info.torch_dtype).reshape(info.shape)
    return out
