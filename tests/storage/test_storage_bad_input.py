"""Bad files and URLs: each gives one clear line, from the Python API and from the CLI."""

from __future__ import annotations

import io
import pickle
import re
import struct
import subprocess
import sys
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import pytest
import safetensors.torch
import torch
from click.testing import CliRunner
from storage_helpers import LORA, base_model, trained

import adapterkit
from adapterkit.cli import cli
from adapterkit.storage import StorageError


@pytest.fixture(scope="module")
def good() -> bytes:
    """The bytes of a valid adapter file."""
    buffer = f"memory://adapterkit-tests/bad-input/good-{id(object())}.safetensors"
    adapterkit.save(trained(LORA), buffer)
    import fsspec

    return bytes(fsspec.filesystem("memory").cat_file(buffer))


def flip(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 0xFF
    return bytes(out)


def torch_pickle(legacy: bool) -> bytes:
    buffer = io.BytesIO()
    state = adapterkit.adapter_state_dict(trained(LORA))
    torch.save(state, buffer, _use_new_zipfile_serialization=not legacy)
    return buffer.getvalue()


def newer_version(_: bytes) -> bytes:
    return safetensors.torch.save(
        {"x": torch.zeros(2)}, metadata={"adapterkit.format": "4", "adapterkit.content": "adapter"}
    )


def header_too_long(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data[8:]


def corrupt_json(data: bytes) -> bytes:
    return data.replace(b'"shape":', b'"shape";', 1)


def tampered_recipe(data: bytes) -> bytes:
    out = data.replace(b'\\"seed\\": 3', b'\\"seed\\": 4', 1)
    assert out != data and len(out) == len(data)
    return out


# name -> (make bad bytes from good bytes, message pattern, can inspect (header only) see it?)
BAD: dict[str, tuple[Callable[[bytes], bytes], str, bool]] = {
    "truncated": (lambda d: d[:-100], r"is truncated: the header describes \d[\d,]* bytes of tensor data, "
                  r"the file holds", True),
    "truncated_in_header": (lambda d: d[:300], r"header length [\d,]+ is larger than the file \(300 bytes\)", True),
    "empty": (lambda d: b"", r"is truncated or not safetensors: 0 bytes", True),
    "flipped_data_byte": (lambda d: flip(d, len(d) - 10), r"tensor '[\w.]+' does not match its data digest; "
                          r"the file is corrupted or was modified", False),
    "corrupt_header_json": (corrupt_json, r"corrupt safetensors header \(Expecting ':' delimiter", True),
    "header_length_too_large": (header_too_long, r"header length [\d,]+ is larger than the file", True),
    "tampered_header": (tampered_recipe, r"header digest mismatch; the header was modified or is corrupt", True),
    "pickle": (lambda d: pickle.dumps({"A": [1.0, 2.0]}, protocol=4), r"is a pickle file .* not safetensors; "
               r"adapterkit only loads safetensors files", True),
    "torch_save_legacy": (lambda d: torch_pickle(True), r"is a pickle file \(as torch.save or pickle write\)", True),
    "torch_save_zip": (lambda d: torch_pickle(False), r"is a zip archive \(torch.save writes a pickle inside one\)",
                       True),
    "newer_format": (newer_version, r"written with adapterkit storage format version 4, but this adapterkit reads "
                     r"format version 3 at most; upgrade adapterkit", True),
}


@pytest.fixture(params=sorted(BAD))
def bad_file(request: Any, tmp_path: Any, good: bytes) -> tuple[str, str, bool]:
    make, pattern, header_level = BAD[request.param]
    path = f"{tmp_path}/{request.param}.safetensors"
    with open(path, "wb") as file:
        file.write(make(good))
    return path, pattern, header_level


def one_line_error(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text and text
    return text


def test_api_load_refuses(bad_file: tuple[str, str, bool]) -> None:
    path, pattern, _ = bad_file
    model = base_model()
    with pytest.raises(StorageError) as info:
        adapterkit.load(path, model)
    assert re.search(pattern, one_line_error(info.value))
    assert path in str(info.value)
    assert not adapterkit.sites(model), "a bad file must not touch the model"
    with pytest.raises(StorageError, match=pattern):
        adapterkit.load_tensors(path)


def test_api_inspect_sees_header_problems(bad_file: tuple[str, str, bool]) -> None:
    path, pattern, header_level = bad_file
    if not header_level:
        assert adapterkit.inspect(path).recipe is not None  # the header is fine; load checks the data
        return
    with pytest.raises(StorageError, match=pattern):
        adapterkit.inspect(path)
    entry = adapterkit.ls(path)[0]  # a listing reports the file with its error, it does not fail
    assert entry.info is None and re.search(pattern, str(entry.error))


def cli_fails(args: list[str], pattern: str) -> str:
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # nothing escaped: no traceback
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ") and re.search(pattern, lines[0]), lines[0]
    assert "Traceback" not in result.output
    return lines[0]


def test_cli_refuses(bad_file: tuple[str, str, bool], tmp_path: Any) -> None:
    path, pattern, header_level = bad_file
    if header_level:
        cli_fails(["inspect", path], pattern)
        cli_fails(["inspect", "--json", path], pattern)
    cli_fails(["cp", path, f"{tmp_path}/copy.safetensors"], pattern)  # cp verifies every digest
    import os

    assert not os.path.exists(f"{tmp_path}/copy.safetensors")


def test_real_process_prints_one_line(tmp_path: Any, good: bytes) -> None:
    path = f"{tmp_path}/renamed.safetensors"
    with open(path, "wb") as file:
        file.write(torch_pickle(False))
    done = subprocess.run([sys.executable, "-m", "adapterkit", "inspect", path], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "is a zip archive" in lines[0]


# --- models that do not fit the adapter ----------------------------------------------------


def test_shape_mismatch_names_site_and_both_shapes(tmp_path: Any) -> None:
    url = f"{tmp_path}/a.safetensors"
    adapterkit.save(trained(LORA), url)
    wider = base_model(d_in=10)  # site '0' sees 10 inputs instead of 8
    with pytest.raises(StorageError) as info:
        adapterkit.load(url, wider)
    assert one_line_error(info.value).endswith(
        "site '0': projections.A.weight has shape [1, 8, 4] in the file but [1, 10, 4] in the model")
    assert not adapterkit.sites(wider) and not hasattr(wider, "_adapterkit"), "the attach was undone"
    assert all(p.requires_grad for p in wider.parameters())
    assert isinstance(wider[0], torch.nn.Linear)


def test_rank_mismatch_on_attached_model(tmp_path: Any) -> None:
    url = f"{tmp_path}/a.safetensors"
    adapterkit.save(trained(LORA), url)
    other = trained({**LORA, "adapter": {**LORA["adapter"], "r": 2}})
    before = {k: v.clone() for k, v in adapterkit.adapter_state_dict(other).items()}
    with pytest.raises(StorageError, match=r"site '0': projections.A.weight has shape \[1, 8, 4\] in the file "
                                           r"but \[1, 8, 2\] in the model"):
        adapterkit.load(url, other)
    after = adapterkit.adapter_state_dict(other)
    assert all(torch.equal(before[k], after[k]) for k in before), "a refused load leaves the model as it was"


def test_site_missing_from_model(tmp_path: Any) -> None:
    url = f"{tmp_path}/a.safetensors"
    adapterkit.save(trained(LORA), url)
    only_first = trained({**LORA, "adapter": {**LORA["adapter"], "targets": ["0"]}})
    with pytest.raises(StorageError, match=r"site '2' of the adapter is not in the model "
                                           r"\(tensor '2.projections.A.weight'\); model sites: 0$"):
        adapterkit.load(url, only_first)


def test_site_missing_from_file(tmp_path: Any) -> None:
    url = f"{tmp_path}/a.safetensors"
    adapterkit.save(trained({**LORA, "adapter": {**LORA["adapter"], "targets": ["0"]}}), url)
    both = trained(LORA)
    with pytest.raises(StorageError, match=r"site '2' of the model has no tensors in the file "
                                           r"\(missing '2.projections.A.weight'\); file sites: 0$"):
        adapterkit.load(url, both)


def test_model_without_the_target_modules(tmp_path: Any) -> None:
    url = f"{tmp_path}/a.safetensors"
    adapterkit.save(trained(LORA), url)
    other = torch.nn.Sequential(OrderedDict(fc=torch.nn.Linear(8, 4)))
    with pytest.raises(StorageError, match=r"cannot load '.*': cannot attach: no module matches targets \['0', '2'\]"
                                           r".*\(the adapter was made with: builtins 0.1.0\)$"):
        adapterkit.load(url, other)
    identity = torch.nn.Sequential(torch.nn.Identity())
    with pytest.raises(StorageError, match=r"site '0': LoRA adapts nn.Linear, .*; got Identity"):
        adapterkit.load(url, identity)


def test_tensors_file_is_not_an_adapter(tmp_path: Any) -> None:
    url = f"{tmp_path}/rows.safetensors"
    adapterkit.save_tensors({"row": torch.zeros(3)}, url)
    with pytest.raises(StorageError, match=r"holds tensors, not an adapter; read it with adapterkit.load_tensors"):
        adapterkit.load(url, base_model())


def test_foreign_safetensors_needs_verify_false(tmp_path: Any) -> None:
    url = f"{tmp_path}/peft_like.safetensors"
    safetensors.torch.save_file({"base_model.lora_A.weight": torch.ones(2, 3)}, url)
    with pytest.raises(StorageError, match=r"was not written by adapterkit and has no digests to verify; "
                                           r"pass verify=False"):
        adapterkit.load_tensors(url)
    assert torch.equal(adapterkit.load_tensors(url, verify=False)["base_model.lora_A.weight"], torch.ones(2, 3))
    assert adapterkit.inspect(url).content == "safetensors"


# --- URLs ---------------------------------------------------------------------------------

URL_CASES = {
    "gcs_missing": ("gs://bucket/a.safetensors", r"the 'gs' protocol needs the package gcsfs: pip install gcsfs"),
    "azure_missing": ("az://container/a.safetensors", r"the 'az' protocol needs the package adlfs: pip install adlfs"),
    "chained_missing": ("simplecache::gs://bucket/a.safetensors", r"pip install gcsfs"),
    "unknown_protocol": ("nope://x/a.safetensors", r"unknown URL protocol 'nope'"),
    "no_such_file": ("memory://adapterkit-tests/none/a.safetensors", r"no such file"),
}


@pytest.mark.parametrize("case", sorted(URL_CASES))
def test_bad_urls(case: str) -> None:
    url, pattern = URL_CASES[case]
    for call in (lambda: adapterkit.inspect(url), lambda: adapterkit.load(url, base_model()),
                 lambda: adapterkit.ls(url) if "no_such" not in case else adapterkit.load_tensors(url)):
        with pytest.raises(StorageError, match=pattern) as info:
            call()
        one_line_error(info.value)
    cli_fails(["inspect", url], pattern)


def test_missing_package_on_save(tmp_path: Any) -> None:
    with pytest.raises(StorageError, match=r"pip install gcsfs"):
        adapterkit.save(trained(LORA), "gs://bucket/a.safetensors")
    cli_fails(["cp", f"{tmp_path}/x.safetensors", "gs://bucket/"], r"cannot (open|read)")


def test_directory_and_bad_options(tmp_path: Any) -> None:
    with pytest.raises(StorageError, match=r"it is a directory"):
        adapterkit.inspect(str(tmp_path))
    cli_fails(["ls", str(tmp_path), "-o", "novalue"], r"storage option 'novalue' is not key=value")
    with pytest.raises(StorageError, match=r"metadata key 'adapterkit.recipe' is reserved"):
        adapterkit.save(trained(LORA), f"{tmp_path}/a.safetensors", metadata={"adapterkit.recipe": "{}"})
    with pytest.raises(StorageError, match=r"storage URLs are strings, got PosixPath"):
        adapterkit.inspect(tmp_path)  # type: ignore[arg-type]


@pytest.mark.parametrize("mask", [0x01, 0xFF])
def test_every_single_byte_change_is_detected(good: bytes, mask: int) -> None:
    """Flip each byte of a whole file in turn (header, padding, data): every copy is refused,
    none loads silently different. One bit (0x01) keeps the header ASCII, so this reaches
    the digests and layout checks rather than only the UTF-8 decoder."""
    import fsspec

    fs = fsspec.filesystem("memory")
    url = f"memory://adapterkit-tests/flips-{mask}.safetensors"
    undetected = []
    for index in range(len(good)):
        bad = bytearray(good)
        bad[index] ^= mask
        fs.pipe_file(url, bytes(bad))
        try:
            adapterkit.load_tensors(url)
        except StorageError:
            continue
        undetected.append(index)
    assert not undetected, f"{len(undetected)} of {len(good)} single-byte changes went unnoticed: {undetected[:10]}"


def test_save_to_a_folder_url(tmp_path: Any) -> None:
    with pytest.raises(StorageError, match=r"that names a folder; give a file URL such as .*/adapter.safetensors"):
        adapterkit.save(trained(LORA), f"{tmp_path}/lib/")
    os_dir = f"{tmp_path}/existing"
    import os

    os.makedirs(os_dir)
    with pytest.raises(StorageError, match=r"it is a directory"):
        adapterkit.save(trained(LORA), os_dir)
