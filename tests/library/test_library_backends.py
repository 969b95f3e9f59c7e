"""Library add/remove/get/select/rebuild on memory://, local folders and moto S3, and the
read-only ones (zip://, an HTTP server): entries come from the manifest, never from the
adapter files."""

from __future__ import annotations

import json
import os
import zipfile
from typing import Any

import fsspec
import pytest
import torch
from library_helpers import base_model, s3_requests, tiny

import adapterkit
from adapterkit import Library, StorageError, library
from adapterkit.library import LOG, MANIFEST


def fs_for(url: str, options: dict[str, Any]) -> Any:
    return fsspec.core.url_to_fs(url, **options)[0]


def test_lifecycle(backend: tuple[str, dict[str, Any]], tmp_path: Any) -> None:
    url, options = backend
    lib = Library.init(url, storage_options=options)
    assert lib.entries() == [] and len(lib) == 0
    with pytest.raises(StorageError, match="already an adapterkit library"):
        Library.init(url, storage_options=options)
    Library.init(url, storage_options=options, exist_ok=True)

    model = tiny(1)
    entry = lib.add(model, "skills/airline", task="airline", tags=["sentiment", "tweets"], base="tiny-mlp")
    assert entry.url.endswith("/lib/skills/airline.safetensors") and entry.kind == "lora" and entry.method == "lora"
    assert entry.base_shapes == {"0": (8, 6), "2": (3, 8)} and entry.sites == ("0", "2")
    assert entry.tensors["0.projections.A.weight"] == (1, 6, 2)
    # a file from elsewhere, whose own metadata gives the defaults
    src = f"{tmp_path}/apple.safetensors"
    adapterkit.save(tiny(2), src, metadata={"task": "apple", "tags": "tweets,tech"})
    copied = lib.add(src)
    assert (copied.name, copied.task, copied.tags, copied.base, copied.base_shapes) == (
        "apple", "apple", ("tech", "tweets"), None, None)
    bottleneck = adapterkit.attach(base_model(), {"adapter": {"kind": "bottleneck", "targets": ["0"], "r": 4}})
    lib.add(bottleneck, "bn", task="airline", tags=["tweets"], base="other-base")

    assert [e.name for e in lib.entries()] == ["apple", "bn", "skills/airline"]
    assert [e.name for e in lib.select(task="airline")] == ["bn", "skills/airline"]
    assert [e.name for e in lib.select(task=["apple", "airline"], kind="lora")] == ["apple", "skills/airline"]
    assert [e.name for e in lib.select(tags=["tweets", "sentiment"])] == ["skills/airline"]
    assert [e.name for e in lib.select(base="tiny-mlp")] == ["skills/airline"]
    assert [e.name for e in lib.select(method="bottleneck")] == ["bn"]
    assert [e.name for e in lib.select(name="skills/*")] == ["skills/airline"]
    assert [e.name for e in lib.select(model=base_model())] == ["apple", "bn", "skills/airline"]
    wider = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    assert [e.name for e in lib.select(model=wider)] == ["apple"]  # shapes are recorded only for saved models
    assert lib.select(task="none") == []

    got = lib.get("skills/airline")
    assert got == entry and "skills/airline" in lib and "nope" not in lib
    fresh = lib.load("skills/airline", base_model())
    for key, value in adapterkit.adapter_state_dict(model).items():
        assert torch.equal(value, adapterkit.adapter_state_dict(fresh)[key])
    assert adapterkit.inspect(got.url, storage_options=options).digest == got.digest
    with pytest.raises(StorageError, match=r"already has 'apple.safetensors'"):
        lib.add(src)
    with pytest.raises(StorageError, match=r"no adapter named 'skills/airlines'.*did you mean 'skills/airline'"):
        lib.get("skills/airlines")

    removed = lib.remove("apple")
    assert removed.name == "apple" and [e.name for e in lib.entries()] == ["bn", "skills/airline"]
    assert not fs_for(url, options).exists(removed.url)
    with pytest.raises(StorageError, match="no adapter named 'apple'"):
        lib.remove("apple")
    lib.add(src)  # the name is free again
    assert lib.get("apple").digest == copied.digest
    assert lib.rebuild(dry_run=True).stale is False


def test_rebuild_from_files_and_after_changes_behind_its_back(backend: tuple[str, dict[str, Any]]) -> None:
    url, options = backend
    fs = fs_for(url, options)
    # a prefix of adapters with no manifest: rebuild indexes it
    for i in range(3):
        adapterkit.save(tiny(i), f"{url}/a{i}.safetensors", metadata={"task": f"t{i}", "tags": '["x"]'},
                        storage_options=options)
    adapterkit.save_tensors({"w": torch.ones(2)}, f"{url}/routing/r.safetensors", storage_options=options)
    fs.pipe_file(fs._strip_protocol(f"{url}/junk.safetensors"), b"not safetensors")
    lib = Library(url, storage_options=options)
    with pytest.raises(StorageError, match="is not an adapterkit library"):
        lib.entries()
    report = lib.rebuild()
    assert report.added == ("a0", "a1", "a2", "routing/r") and report.written
    assert [s[0] for s in report.skipped] == ["junk.safetensors"]
    assert lib.get("a1").task == "t1" and lib.get("a1").tags == ("x",) and lib.get("routing/r").content == "tensors"
    lib.add(tiny(5), "kept", task="mine", tags=["user"])

    # behind its back: one file deleted, one replaced, one added
    fs.rm_file(fs._strip_protocol(f"{url}/a0.safetensors"))
    adapterkit.save(tiny(9), f"{url}/a1.safetensors", storage_options=options)
    adapterkit.save(tiny(10), f"{url}/new.safetensors", metadata={"task": "late"}, storage_options=options)
    dry = lib.rebuild(dry_run=True)
    assert (dry.added, dry.changed, dry.removed, dry.written) == (("new",), ("a1",), ("a0",), False)
    assert "a0" in lib  # a dry run writes nothing
    report = lib.rebuild()
    assert (report.added, report.changed, report.removed, report.kept) == (("new",), ("a1",), ("a0",), 3)
    assert [e.name for e in lib.entries()] == ["a1", "a2", "kept", "new", "routing/r"]
    assert lib.get("a1").digest == adapterkit.inspect(f"{url}/a1.safetensors", storage_options=options).digest
    assert lib.get("a1").task == "t1"  # the replaced file says nothing: the old metadata stays
    assert lib.get("kept").task == "mine" and lib.get("kept").tags == ("user",)  # unchanged: kept as it was
    assert lib.rebuild().stale is False

    # the manifest deleted: rebuild starts a new generation above the log's
    fs.rm_file(fs._strip_protocol(f"{url}/{MANIFEST}"))
    assert lib.rebuild().added == ("a1", "a2", "kept", "new", "routing/r")
    assert lib.get("kept").task == "mine"  # a model saved by add carries its metadata in the file
    assert lib.get("new").task == "late" and lib.get("a1").task is None  # (a1's was only in the manifest)


def test_saved_models_carry_their_metadata_through_rebuild(memory_url: str) -> None:
    lib = Library.init(memory_url)
    lib.add(tiny(1), "a", task="airline", tags=["x", "y"], base="mlp")
    fs = fs_for(memory_url, {})
    fs.rm_file(fs._strip_protocol(f"{memory_url}/{MANIFEST}"))
    lib.rebuild()
    entry = lib.get("a")
    assert (entry.task, entry.tags, entry.base, entry.base_shapes) == ("airline", ("x", "y"), "mlp",
                                                                       {"0": (8, 6), "2": (3, 8)})


def test_compaction_keeps_every_entry(backend: tuple[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    url, options = backend
    monkeypatch.setattr(library, "COMPACT_EVERY", 4)
    lib = Library.init(url, storage_options=options)
    model = tiny(1)
    for i in range(11):
        lib.add(model, f"e{i:02d}", task="even" if i % 2 == 0 else "odd")
        if i == 6:
            lib.remove("e03")
    names = [f"e{i:02d}" for i in range(11) if i != 3]
    assert [e.name for e in lib.entries()] == names
    store = lib._store()
    generation, entries = library.parse_manifest(store.read(MANIFEST))
    # records 0-3 of generation 0, 4-6 and the removal in 1, 7-10 in 2: each sealed and folded
    assert generation == 3 and sorted(entries) == names
    for number in range(generation):  # folded generations keep their records (slots never free up) and seal
        sizes = [s.size for s in store.slots(f"{LOG}/{number:010d}")]
        assert len(sizes) == 5 and sizes[-1] == 0 and all(sizes[:-1])
    assert store.slots(f"{LOG}/{generation:010d}") == []
    assert lib.compact() == 3  # nothing to fold
    lib.add(model, "late")
    assert lib.compact() == 4 and "late" in library.parse_manifest(store.read(MANIFEST))[1]
    assert [e.name for e in lib.select(task="odd")] == [n for n in names if int(n[1:]) % 2]


def test_s3_reads_cost_a_few_requests_whatever_the_size(s3: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(library, "COMPACT_EVERY", 1000)
    lib = Library.init(s3["url"], storage_options=s3["options"])
    model = tiny(1)
    for i in range(24):
        with s3_requests(s3["options"]) as counts:
            lib.add(model, f"e{i:02d}", task=f"t{i % 3}")
        # a ranged read of the manifest's head, the adapter and the record (create-only), one listing
        assert counts == {"GetObject": 1, "PutObject": 2, "ListObjectsV2": 1}, counts
    with s3_requests(s3["options"]) as counts:
        assert len(lib.entries()) == 24
    assert counts == {"GetObject": 1 + 24, "ListObjectsV2": 1}  # manifest, then the records since it
    lib.compact()
    with s3_requests(s3["options"]) as counts:
        assert len(lib.select(task="t1")) == 8 and len(lib.entries()) == 24
    assert counts == {"GetObject": 2, "ListObjectsV2": 2}  # a compacted library: two requests a read
    with s3_requests(s3["options"]) as counts:
        assert len(adapterkit.ls(s3["url"], storage_options=s3["options"])) == 24
    assert counts["GetObject"] >= 24  # without the manifest: a ranged read per adapter
    with s3_requests(s3["options"]) as counts:
        lib.add(model, "one-more")
    assert sum(counts.values()) == 4


def test_writes_never_overwrite(s3: dict[str, Any]) -> None:
    """An S3 key that exists (a file put there by hand) is never replaced by add."""
    lib = Library.init(s3["url"], storage_options=s3["options"])
    adapterkit.save(tiny(3), f"{s3['url']}/taken.safetensors", storage_options=s3["options"])
    before = adapterkit.inspect(f"{s3['url']}/taken.safetensors", storage_options=s3["options"]).digest
    with pytest.raises(StorageError, match="already has 'taken.safetensors'"):
        lib.add(tiny(4), "taken")
    assert adapterkit.inspect(f"{s3['url']}/taken.safetensors", storage_options=s3["options"]).digest == before
    assert lib.entries() == []
    assert lib.rebuild().added == ("taken",)


def build_local(root: str, pending: int = 2) -> Library:
    """A local library with compacted entries and ``pending`` records after the manifest."""
    lib = Library.init(root)
    for i in range(3):
        lib.add(tiny(i), f"c{i}", task="compacted", tags=["old"])
    lib.compact()
    for i in range(pending):
        lib.add(tiny(10 + i), f"p{i}", task="pending")
    return lib


def test_zip_is_read_only_and_complete(tmp_path: Any) -> None:
    root = str(tmp_path / "lib")
    local = build_local(root)
    archive = str(tmp_path / "lib.zip")
    with zipfile.ZipFile(archive, "w") as zf:
        for folder, _, files in os.walk(root):
            for name in files:
                path = os.path.join(folder, name)
                zf.write(path, "lib/" + os.path.relpath(path, root))
    lib = Library(f"zip://lib::{archive}")
    assert [e.name for e in lib.entries()] == ["c0", "c1", "c2", "p0", "p1"]
    assert [e.name for e in lib.select(task="pending")] == ["p0", "p1"]
    entry = lib.get("c1")
    assert entry.url == f"zip://lib/c1.safetensors::{archive}"
    assert {**entry.to_dict(), "url": None} == {**local.get("c1").to_dict(), "url": None}
    fresh = lib.load("c1", base_model())
    assert adapterkit.summary(fresh).trainable > 0
    assert lib.rebuild(dry_run=True).stale is False
    for action in (lambda: lib.add(tiny(5), "x"), lambda: lib.remove("c0"), lib.rebuild, lib.compact):
        with pytest.raises(StorageError, match=r"zip:// URLs are read-only") as info:
            action()
        assert "\n" not in str(info.value)


def test_http_is_read_only_and_reads_no_tensor(http_root: tuple[str, str, list[str]]) -> None:
    root, base, paths = http_root
    build_local(f"{root}/lib", pending=1)
    lib = Library(f"{base}/lib")
    paths.clear()
    assert [e.name for e in lib.entries()] == ["c0", "c1", "c2", "p0"]
    # the manifest, the one record after it, and the probe that finds no more
    assert paths == [f"/lib/{MANIFEST}", f"/lib/{LOG}/0000000001/0000000000.json",
                     f"/lib/{LOG}/0000000001/0000000001.json"]
    paths.clear()
    assert [e.name for e in lib.select(tags="old", task="compacted")] == ["c0", "c1", "c2"]
    assert not any(p.endswith(".safetensors") for p in paths)
    entry = lib.get("p0")
    assert entry.url == f"{base}/lib/p0.safetensors"
    fresh = lib.load("p0", base_model())
    assert adapterkit.summary(fresh).trainable > 0
    with pytest.raises(StorageError, match=r"http:// URLs are read-only"):
        lib.add(tiny(1), "x")
    with pytest.raises(StorageError, match=r"http:// URLs are read-only"):
        lib.remove("c0")
    with pytest.raises(StorageError, match="is not an adapterkit library"):
        Library(f"{base}/elsewhere").entries()


def test_chained_urls(tmp_path: Any, memory_url: str) -> None:
    """A read cache in front of the library: the control files bypass it, entries' URLs keep it."""
    lib = Library.init(memory_url + "/")
    assert lib.url == memory_url
    lib.add(tiny(1), "a")
    cache = str(tmp_path / "cache")
    cached = Library(f"simplecache::{memory_url}/", storage_options={"simplecache": {"cache_storage": cache}})
    assert cached.url == f"simplecache::{memory_url}"
    assert [e.name for e in cached.entries()] == ["a"]
    assert cached.get("a").url == f"simplecache::{memory_url}/a.safetensors"
    fresh = cached.load("a", base_model())
    assert adapterkit.summary(fresh).trainable > 0
    cached.add(tiny(2), "b")  # writes go to the wrapped URL, and the next read sees them
    assert [e.name for e in cached.entries()] == ["a", "b"] and [e.name for e in lib.entries()] == ["a", "b"]
    assert library.join_url("zip://::x.zip", "a.safetensors") == "zip://a.safetensors::x.zip"
    assert library.join_url("zip://lib/::x.zip", "a.safetensors") == "zip://lib/a.safetensors::x.zip"


def test_entry_json_round_trip(memory_url: str) -> None:
    lib = Library.init(memory_url)
    entry = lib.add(tiny(1), "a", task="t", tags=["b", "a", "b"])
    assert entry.tags == ("a", "b")
    data = entry.to_dict()
    assert json.loads(json.dumps(data)) == data and data["url"] == f"{memory_url}/a.safetensors"
    assert data["recipe"]["adapter"]["kind"] == "lora"


@pytest.mark.parametrize(("args", "message"), [
    ({"name": "../escape"}, "not a valid entry name"),
    ({"name": ".hidden"}, "not a valid entry name"),
    ({"name": "a/../../b"}, "not a valid entry name"),
    ({"name": "x", "task": "line\nbreak"}, "task has control"),
    ({"name": "x", "tags": ["ok", 3]}, "tag is an integer"),
    ({"name": "x", "tags": [f"t{i}" for i in range(65)]}, "more than 64 tags"),
    ({"name": "x", "base": "b" * 300}, "base is longer than 256"),
    ({}, "adding a model needs a name"),
])
def test_bad_add_arguments_are_one_line(memory_url: str, args: dict[str, Any], message: str) -> None:
    lib = Library.init(memory_url)
    with pytest.raises(StorageError, match=message) as info:
        lib.add(tiny(1), **args)
    assert "\n" not in str(info.value)
    assert lib.entries() == []


def test_a_parsed_manifest_is_reused_only_for_the_same_version(
    memory_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    lib = Library.init(memory_url)
    lib.add(tiny(1), "a", task="t")
    lib.compact()
    parses: list[int] = []
    real = library.parse_manifest
    monkeypatch.setattr(library, "parse_manifest", lambda data: parses.append(1) or real(data))
    entry = lib.get("a")
    entry.recipe["adapter"]["r"] = 99  # type: ignore[index]  # the caller's copy only
    assert lib.get("a").recipe["adapter"]["r"] == 2 and len(lib.select(task="t")) == 1
    assert len(parses) == 1  # one parse for three reads of one manifest version
    other = Library(memory_url)
    other.add(tiny(2), "b")
    other.compact()  # a new manifest version (other parses with its own cache) ...
    before = len(parses)
    assert [e.name for e in lib.entries()] == ["a", "b"] and len(parses) == before + 1  # ... lib parses it again
