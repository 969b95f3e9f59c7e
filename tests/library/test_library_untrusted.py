"""A library's manifest and log come from anyone's bucket: crafted ones (wrong types, huge
lists, deep nesting, duplicate keys, names that are paths, oversized files) are one clean
StorageError line, before anything is allocated in proportion, and rebuild repairs them."""

from __future__ import annotations

import json
from typing import Any

import fsspec
import pytest
from click.testing import CliRunner
from library_helpers import tiny

from adapterkit import Library, StorageError, library
from adapterkit.cli import cli
from adapterkit.library import LOG, MANIFEST


@pytest.fixture
def good(memory_url: str) -> dict[str, Any]:
    """A real library's manifest document and one entry, to mutate."""
    lib = Library.init(memory_url)
    lib.add(tiny(1), "a", task="t", tags=["x"])
    lib.compact()
    fs = fsspec.filesystem("memory")
    doc = json.loads(fs.cat_file(f"{memory_url}/{MANIFEST}"))
    return {"url": memory_url, "doc": doc, "entry": doc["entries"][0], "fs": fs, "lib": lib}


def write_manifest(good: dict[str, Any], data: bytes | str | Any) -> None:
    if not isinstance(data, (bytes, str)):
        data = json.dumps(data)
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    good["fs"].pipe_file(f"{good['url']}/{MANIFEST}", data)


def refused(url: str, message: str, *, add: bool = True) -> str:
    """Every read (and add, which reads the manifest's head) is refused with one line; so is
    the CLI. (add appends without reading the log: a damaged record is found by readers.)"""
    lib = Library(url)
    actions = [lib.entries, lambda: lib.select(task="t"), lambda: lib.get("a")]
    for read in actions + ([lambda: lib.add(tiny(2), "b")] if add else []):
        with pytest.raises(StorageError, match=message) as info:
            read()
        text = str(info.value)
        assert "\n" not in text and len(text) < 2100 and text.isprintable(), text
    result = CliRunner().invoke(cli, ["library", "ls", url])
    assert result.exit_code == 1 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    return text


def entry_with(good: dict[str, Any], **changes: Any) -> dict[str, Any]:
    doc = dict(good["doc"])
    doc["entries"] = [{**good["entry"], **changes}]
    return doc


CRAFTED = {
    "not JSON": (b"{not json", "not valid JSON"),
    "not UTF-8": (b'{"format": "\xff"}', "not UTF-8"),
    "a list": ([1, 2], "expected an object"),
    "another format": ({"format": "x", "version": 1, "generation": 0, "entries": []}, "not an adapterkit library file"),
    "newer version": ({"format": "adapterkit-library", "version": 9, "generation": 0, "entries": []},
                      "made by a newer adapterkit"),
    "extra key": ({"format": "adapterkit-library", "version": 1, "generation": 0, "entries": [], "x": 1},
                  "unknown key 'x'"),
    "missing key": ({"format": "adapterkit-library", "version": 1, "generation": 0}, "lacks 'entries'"),
    "generation text": ({"format": "adapterkit-library", "version": 1, "generation": "7", "entries": []},
                        "generation is a string, expected an integer"),
    "generation negative": ({"format": "adapterkit-library", "version": 1, "generation": -1, "entries": []},
                            "out of range"),
    "generation bool": ({"format": "adapterkit-library", "version": 1, "generation": True, "entries": []},
                        "generation is a boolean"),
    "entries object": ({"format": "adapterkit-library", "version": 1, "generation": 0, "entries": {}},
                       "entries is an object, expected a list"),
    "NaN": ('{"format":"adapterkit-library","version":1,"generation":NaN,"entries":[]}', "NaN is not a JSON number"),
    "duplicate key": ('{"format":"adapterkit-library","format":"x","version":1,"generation":0,"entries":[]}',
                      "duplicate key"),
    "deep nesting": ('{"format":"adapterkit-library","version":1,"generation":0,"entries":' + "[" * 100_000
                     + "]" * 100_000 + "}", "nested deeper than 40 levels"),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_manifest_is_one_line(good: dict[str, Any], case: str) -> None:
    data, message = CRAFTED[case]
    write_manifest(good, data)
    # add reads the manifest's first 128 bytes only: this one's are well-formed
    refused(good["url"], message, add=case != "deep nesting")


@pytest.mark.parametrize(("changes", "message"), [
    ({"name": "../../etc/passwd"}, "not a valid entry name"),
    ({"name": ".adapterkit-library/log/x"}, "not a valid entry name"),
    ({"name": 7}, "not a valid entry name"),
    ({"size": "12"}, r"entries\[0\].size is a string, expected an integer"),
    ({"size": 2**70}, "out of range"),
    ({"content": "pickle"}, "content must be 'adapter' or 'tensors'"),
    ({"tags": "x"}, r"tags is a string, expected a list"),
    ({"tags": [f"t{i}" for i in range(1000)]}, r"tags has 1,000 items, more than 64"),
    ({"tags": [["nested"]]}, r"tags\[0\] is a list, expected a string"),
    ({"task": "x" * 10_000}, "longer than 256 characters"),
    ({"task": "\x1b[31mred"}, "control or unprintable"),
    ({"task": "\ud800"}, "lone surrogate"),
    ({"sites": list(range(5))}, r"sites\[0\] is an integer"),
    ({"sites": ["s"] * 200_000}, "more than 100,000"),
    ({"tensors": {"w": [-1, 2]}}, "out of range"),
    ({"tensors": {"w": [1] * 17}}, "more than 16"),
    ({"tensors": []}, "expected an object"),
    ({"plugins": {"p": 1}}, "is an integer, expected a string"),
    ({"recipe": [1]}, "recipe is a list"),
    ({"base_shapes": {"0": "8x6"}}, "is a string, expected a list"),
])
def test_crafted_entry_is_one_line(good: dict[str, Any], changes: dict[str, Any], message: str) -> None:
    write_manifest(good, entry_with(good, **changes))
    refused(good["url"], message)


def test_bounds_are_checked_before_parsing(good: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(library, "MAX_VALUES", 1000)
    write_manifest(good, entry_with(good, tags=list(range(5000))))
    refused(good["url"], "more than 1,000 JSON values")
    monkeypatch.setattr(library, "MAX_BYTES", 4096)
    write_manifest(good, entry_with(good, task="x" * 5000))
    refused(good["url"], "larger than 4,096 bytes")


def test_duplicate_entries_and_too_many(good: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    doc = dict(good["doc"], entries=[good["entry"], good["entry"]])
    write_manifest(good, doc)
    refused(good["url"], r"duplicate name 'a'")
    monkeypatch.setattr(library, "MAX_ENTRIES", 1)
    write_manifest(good, dict(good["doc"], entries=[good["entry"], {**good["entry"], "name": "b"}]))
    refused(good["url"], "entries has 2 items, more than 1")


def write_record(good: dict[str, Any], generation: int, slot: int, data: bytes | Any) -> None:
    if not isinstance(data, bytes):
        data = json.dumps(data).encode()
    good["fs"].pipe_file(f"{good['url']}/{LOG}/{generation:010d}/{slot:010d}.json", data)


@pytest.mark.parametrize(("record", "message"), [
    (b"[[[", "not valid JSON"),
    ({"format": "adapterkit-library-log", "version": 1, "ops": [{"op": "exec", "name": "a"}]},
     r"ops\[0\].op must be 'put' or 'remove'"),
    ({"format": "adapterkit-library-log", "version": 1, "ops": [{"op": "remove", "name": "../a", "digest": None}]},
     "not a valid entry name"),
    ({"format": "adapterkit-library-log", "version": 1, "ops": [{"op": "put", "entry": {"name": "a"}}]},
     "lacks 'base'"),
    ({"format": "adapterkit-library-log", "version": 1, "ops": {"op": "put"}}, "ops is an object"),
])
def test_crafted_log_record_is_one_line(good: dict[str, Any], record: Any, message: str) -> None:
    generation = good["doc"]["generation"]
    write_record(good, generation, 0, record)
    text = refused(good["url"], message, add=False)
    assert "rebuild recreates it" in text
    report = good["lib"].rebuild()  # repairs: a new manifest above the damaged log
    assert report.written and [e.name for e in good["lib"].entries()] == ["a"]
    good["lib"].add(tiny(3), "b")
    assert [e.name for e in good["lib"].entries()] == ["a", "b"]


def test_a_hole_or_a_record_after_the_seal_is_damage(good: dict[str, Any]) -> None:
    generation = good["doc"]["generation"]
    record = {"format": "adapterkit-library-log", "version": 1, "ops": [{"op": "remove", "name": "a", "digest": None}]}
    write_record(good, generation, 1, record)
    refused(good["url"], f"record 0 of generation {generation} of its log is missing", add=False)
    write_record(good, generation, 0, b"")  # a seal ...
    refused(good["url"], "a record follows the seal", add=False)  # ... with a record after it


def test_too_many_records_in_one_generation(good: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(library, "MAX_SLOTS", 3)
    generation = good["doc"]["generation"]
    record = {"format": "adapterkit-library-log", "version": 1, "ops": []}
    for slot in range(5):
        write_record(good, generation, slot, record)
    refused(good["url"], "more than 3 records in one generation")  # (add lists the generation too)


def test_a_crafted_manifest_is_replaced_by_rebuild(good: dict[str, Any]) -> None:
    write_manifest(good, CRAFTED["deep nesting"][0])
    report = good["lib"].rebuild()
    assert report.added == ("a",) and report.written
    assert [e.name for e in good["lib"].entries()] == ["a"]


def test_metadata_from_files_is_checked(memory_url: str, tmp_path: Any) -> None:
    """A copied file's own task/tags/base metadata must fit the manifest's bounds."""
    import adapterkit

    lib = Library.init(memory_url)
    src = f"{tmp_path}/bad.safetensors"
    adapterkit.save(tiny(1), src, metadata={"tags": "[1, 2]"})
    with pytest.raises(StorageError, match=r"metadata 'tags' item is an integer") as info:
        lib.add(src)
    assert "\n" not in str(info.value)
    adapterkit.save(tiny(1), src, metadata={"task": "\x1b]0;title\x07"})
    with pytest.raises(StorageError, match="control or unprintable"):
        lib.add(src)
    adapterkit.cp(src, f"{memory_url}/bad.safetensors")
    report = lib.rebuild()  # rebuild skips such files and says why
    assert report.added == () and report.skipped[0][0] == "bad.safetensors" and "control" in report.skipped[0][1]
