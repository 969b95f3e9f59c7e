"""Bit-exact round trips on real backends: local files, memory://, S3 (moto server),
http:// (local server), zip://, simplecache::."""

from __future__ import annotations

import hashlib
import json
import zipfile
from typing import Any

import fsspec
import pytest
import safetensors.torch
import torch
from storage_helpers import BOTTLENECK, LORA, assert_same_adapter, base_model, trained

import adapterkit
from adapterkit.attach import state_of
from adapterkit.storage import StorageError

RECIPES = {"lora": LORA, "bottleneck": BOTTLENECK}


def check_file_matches(url: str, model: torch.nn.Module, options: dict[str, Any] | None = None) -> None:
    """The bytes are plain safetensors: the reference reader sees the same tensors and metadata."""
    with fsspec.open(url, "rb", **(options or {})) as file:
        data = file.read()
    reference = safetensors.torch.load(data)
    ours = adapterkit.adapter_state_dict(model)
    assert set(reference) == set(ours)
    for key, tensor in ours.items():
        assert torch.equal(reference[key], tensor), key
    info = adapterkit.inspect(url, storage_options=options)
    assert info.size == len(data)
    assert info.recipe == state_of(model).recipe
    assert info.sites == tuple(adapterkit.sites(model))
    assert info.plugins == {"builtins": adapterkit.get_host().plugin_versions()["builtins"]}
    assert info.format_version == adapterkit.storage.FORMAT_VERSION


@pytest.mark.parametrize("kind", sorted(RECIPES))
@pytest.mark.parametrize("form", ["plain", "file"])
def test_local_round_trip(tmp_path: Any, kind: str, form: str) -> None:
    model = trained(RECIPES[kind])
    path = f"{tmp_path}/lib/{kind}.safetensors"  # the parent folder is created on save
    url = path if form == "plain" else f"file://{path}"
    saved = adapterkit.save(model, url, metadata={"task": "demo"})
    fresh = base_model()
    assert adapterkit.load(url, fresh) is fresh  # attaches the stored recipe, then loads
    assert_same_adapter(model, fresh)
    check_file_matches(url, model)
    assert saved.metadata == {"task": "demo"} and adapterkit.inspect(url).digest == saved.digest


@pytest.mark.parametrize("kind", sorted(RECIPES))
def test_memory_round_trip(memory_url: str, kind: str) -> None:
    model = trained(RECIPES[kind])
    url = f"{memory_url}/{kind}.safetensors"
    adapterkit.save(model, url)
    fresh = base_model()
    adapterkit.load(url, fresh)
    assert_same_adapter(model, fresh)
    check_file_matches(url, model)


def test_s3_round_trip_and_library(s3: dict[str, Any]) -> None:
    options = s3["options"]
    prefix = f"s3://{s3['bucket']}/library"
    models = {kind: trained(recipe, seed=i + 1) for i, (kind, recipe) in enumerate(sorted(RECIPES.items()))}
    for kind, model in models.items():
        adapterkit.save(model, f"{prefix}/{kind}.safetensors", storage_options=options)
    routing = {"task_7.logits": torch.randn(1, 8, generator=torch.Generator().manual_seed(2))}
    adapterkit.save_tensors(routing, f"{prefix}/routing/task_7.safetensors", metadata={"task": "7"},
                            storage_options=options)
    for kind, model in models.items():
        fresh = base_model()
        adapterkit.load(f"{prefix}/{kind}.safetensors", fresh, storage_options=options)
        assert_same_adapter(model, fresh)
        check_file_matches(f"{prefix}/{kind}.safetensors", model, options)
    entries = adapterkit.ls(prefix, storage_options=options)
    assert [e.name for e in entries] == ["bottleneck.safetensors", "lora.safetensors", "routing/task_7.safetensors"]
    assert [(e.info.kind, e.info.content) for e in entries if e.info] == [
        ("bottleneck", "adapter"), ("lora", "adapter"), ("tensors", "tensors")]
    assert entries[2].info is not None and entries[2].info.metadata == {"task": "7"}
    back = adapterkit.load_tensors(f"{prefix}/routing/task_7.safetensors", storage_options=options)
    assert torch.equal(back["task_7.logits"], routing["task_7.logits"])


def test_http_read_only(tmp_path: Any, http_root: tuple[str, str, list[int]]) -> None:
    root, base, _ = http_root
    model = trained(LORA)
    adapterkit.save(model, f"{root}/adapters/lora.safetensors")
    url = f"{base}/adapters/lora.safetensors"
    fresh = base_model()
    adapterkit.load(url, fresh)
    assert_same_adapter(model, fresh)
    check_file_matches(url, model)
    assert [e.name for e in adapterkit.ls(f"{base}/adapters/")] == ["lora.safetensors"]
    with pytest.raises(StorageError, match=r"http:// URLs are read-only"):
        adapterkit.save(model, url)


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_zip_read(tmp_path: Any, compression: int) -> None:
    model = trained(BOTTLENECK)
    member = f"{tmp_path}/member.safetensors"
    adapterkit.save(model, member)
    archive = f"{tmp_path}/library.zip"
    with zipfile.ZipFile(archive, "w", compression=compression) as zf:
        zf.write(member, "skills/bottleneck.safetensors")
        zf.writestr("README.txt", "not an adapter")
    url = f"zip://skills/bottleneck.safetensors::{archive}"
    fresh = base_model()
    adapterkit.load(url, fresh)
    assert_same_adapter(model, fresh)
    check_file_matches(url, model)
    assert [e.name for e in adapterkit.ls(f"zip://skills::{archive}")] == ["bottleneck.safetensors"]
    with pytest.raises(StorageError, match=r"zip:// URLs are read-only"):
        adapterkit.save(model, url)


def test_simplecache_over_s3(tmp_path: Any, s3: dict[str, Any]) -> None:
    model = trained(LORA)
    options = {"s3": s3["options"], "simplecache": {"cache_storage": f"{tmp_path}/cache"}}
    url = f"simplecache::s3://{s3['bucket']}/cached/lora.safetensors"
    adapterkit.save(model, url, storage_options=options)  # writes go to S3 itself
    assert fsspec.filesystem("s3", **s3["options"]).exists(f"{s3['bucket']}/cached/lora.safetensors")
    fresh = base_model()
    adapterkit.load(url, fresh, storage_options=options)
    assert_same_adapter(model, fresh)
    assert adapterkit.inspect(url, storage_options=options).recipe == state_of(model).recipe


def test_cp_across_backends_is_byte_exact(tmp_path: Any, s3: dict[str, Any], memory_url: str) -> None:
    model = trained(LORA)
    src = f"{tmp_path}/a.safetensors"
    adapterkit.save(model, src)
    with open(src, "rb") as file:
        original = hashlib.sha256(file.read()).hexdigest()
    s3_dir = f"s3://{s3['bucket']}/copies/"
    adapterkit.cp(src, s3_dir, dst_storage_options=s3["options"])  # a trailing / keeps the name
    adapterkit.cp(f"{s3_dir}a.safetensors", f"{memory_url}/b.safetensors", storage_options=s3["options"],
                  dst_storage_options={})
    adapterkit.cp(f"{memory_url}/b.safetensors", f"{tmp_path}/out/")
    with open(f"{tmp_path}/out/b.safetensors", "rb") as file:
        assert hashlib.sha256(file.read()).hexdigest() == original


def test_tensors_all_dtypes_partial_and_writable(memory_url: str) -> None:
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 5, generator=gen),
        "bf16": torch.randn(7, generator=gen).bfloat16(),
        "f16": torch.randn(2, 2, generator=gen).half(),
        "f64": torch.randn(3, generator=gen).double(),
        "i64": torch.arange(5),
        "u8_cells": torch.randint(0, 4, (6, 6), generator=gen, dtype=torch.uint8),
        "mask": torch.rand(9, generator=gen) > 0.5,
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 3),
        "strided": torch.randn(4, 6, generator=gen).t(),  # non-contiguous input
    }
    url = f"{memory_url}/mixed.safetensors"
    adapterkit.save_tensors(tensors, url, metadata={"note": "mixed"})
    back = adapterkit.load_tensors(url)
    assert set(back) == set(tensors)
    for name, tensor in tensors.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    reference = safetensors.torch.load(fsspec.filesystem("memory").cat_file(url))
    assert all(torch.equal(reference[n], t) for n, t in tensors.items())
    part = adapterkit.load_tensors(url, names=["bf16", "mask"])
    assert set(part) == {"bf16", "mask"} and torch.equal(part["bf16"], tensors["bf16"])
    back["f32"].add_(1.0)  # loaded tensors are ordinary writable tensors, not views of shared bytes
    assert torch.equal(adapterkit.load_tensors(url, names=["f32"])["f32"], tensors["f32"])
    with pytest.raises(StorageError, match=r"has no tensor 'nope'; it holds: "):
        adapterkit.load_tensors(url, names=["nope"])


def test_partial_load_fetches_only_needed_bytes(http_root: tuple[str, str, list[int]]) -> None:
    root, base, sent = http_root
    big = {f"skill_{i}": torch.randn(256, 1024, generator=torch.Generator().manual_seed(i)) for i in range(8)}
    big["router"] = torch.randn(4, 8)
    adapterkit.save_tensors(big, f"{root}/inventory.safetensors")
    sent.clear()
    out = adapterkit.load_tensors(f"{base}/inventory.safetensors", names=["router", "skill_3"])
    assert torch.equal(out["router"], big["router"]) and torch.equal(out["skill_3"], big["skill_3"])
    header = adapterkit.inspect(f"{root}/inventory.safetensors").header_size
    one_skill = 256 * 1024 * 4
    # probe + the two tensors (the 128-byte router sits right after the header's probe range)
    assert sum(sent) <= header + 64 * 1024 + one_skill + big["router"].numel() * 4 + 1024 * 1024
    assert sum(sent) < 3 * one_skill


def test_load_into_attached_model_and_non_strict(tmp_path: Any) -> None:
    model = trained(LORA, seed=1)
    url = f"{tmp_path}/a.safetensors"
    adapterkit.save(model, url)
    other = trained(LORA, seed=2)  # same recipe, different values: load replaces them
    adapterkit.load(url, other)
    assert_same_adapter(model, other)
    partial = trained({**LORA, "adapter": {**LORA["adapter"], "targets": ["0"]}}, seed=3)
    adapterkit.load(url, partial, strict=False)  # only site '0' exists here
    ours = adapterkit.adapter_state_dict(partial)
    theirs = adapterkit.adapter_state_dict(model)
    assert set(ours) == {k for k in theirs if k.startswith("0.")}
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


LORA_IN_BASE_DTYPE = {**LORA, "adapter": {**LORA["adapter"], "dtype": "base"}}


def test_bf16_model_round_trip(memory_url: str) -> None:
    model = adapterkit.attach(base_model().bfloat16(), LORA_IN_BASE_DTYPE)  # bf16 adapters (default: float32)
    with torch.no_grad():
        for tensor in adapterkit.adapter_state_dict(model).values():
            tensor.normal_()
    url = f"{memory_url}/bf16.safetensors"
    adapterkit.save(model, url)
    assert {t.dtype for t in adapterkit.inspect(url).tensors} == {"BF16"}
    fresh = base_model().bfloat16()
    adapterkit.load(url, fresh)
    for key, tensor in adapterkit.adapter_state_dict(model).items():
        assert torch.equal(adapterkit.adapter_state_dict(fresh)[key], tensor)


def test_library_listing_reports_broken_files_and_skips_hidden(tmp_path: Any) -> None:
    lib = f"{tmp_path}/lib"
    adapterkit.save(trained(LORA), f"{lib}/good.safetensors")
    with open(f"{lib}/broken.safetensors", "wb") as file:
        file.write(b"\x80\x04not really")
    with open(f"{lib}/.good.safetensors.tmp-1-abc", "wb") as file:
        file.write(b"partial")
    with open(f"{lib}/notes.txt", "w") as file:
        file.write("ignored")
    entries = {e.name: e for e in adapterkit.ls(lib)}
    assert sorted(entries) == ["broken.safetensors", "good.safetensors"]
    assert entries["good.safetensors"].info is not None and entries["good.safetensors"].error is None
    assert entries["broken.safetensors"].info is None
    assert "is a pickle file" in str(entries["broken.safetensors"].error)
    single = adapterkit.ls(f"{lib}/good.safetensors")
    assert [e.name for e in single] == ["good.safetensors"]
    assert json.loads(json.dumps([e.to_dict() for e in entries.values()]))  # JSON-ready


def test_load_casts_dtype_and_honours_load_hooks(memory_url: str) -> None:
    """Loads that need more than a memcpy go through ``load_state_dict``: a float32 file
    onto a bfloat16 model whose adapters take the base's dtype is cast; a module's load hook still runs."""
    model = trained(LORA_IN_BASE_DTYPE)
    url = f"{memory_url}/f32.safetensors"
    adapterkit.save(model, url)
    half = base_model().bfloat16()
    adapterkit.load(url, half)
    for key, tensor in adapterkit.adapter_state_dict(model).items():
        assert torch.equal(adapterkit.adapter_state_dict(half)[key], tensor.bfloat16()), key
    hooked = base_model()
    seen: list[str] = []
    hooked.register_load_state_dict_pre_hook(lambda module, state, prefix, *args: seen.extend(sorted(state)))
    adapterkit.load(url, hooked)
    assert seen == sorted(adapterkit.adapter_state_dict(model))
    assert_same_adapter(model, hooked)


ROUTED = {
    "mosa": ({"adapter": {"kind": "lora", "targets": ["0", "2"], "r": 4}, "splitter": {"name": "mosa", "n_cells": 4},
              "sampler": {"name": "mosa"}}, "lora+mosa"),
    "poly": ({"adapter": {"kind": "lora", "targets": ["0", "2"], "r": 4, "skills": 4},
              "router": {"name": "poly", "tasks": 3}}, "lora+poly"),
    "mhr": ({"adapter": {"kind": "lora", "targets": ["0", "2"], "r": 4, "skills": 4},
             "splitter": {"name": "mhr", "heads": 2}, "router": {"name": "mhr", "tasks": 3}}, "lora+mhr"),
}


@pytest.mark.parametrize("name", sorted(ROUTED))
def test_plugin_methods_round_trip(name: str, memory_url: str) -> None:
    """Sparse (MoSA: uint8 cell ids) and routed (Poly, MHR: router logits) adapters from
    the method plugins rebuild from the file alone and compute the same outputs."""
    recipe, method = ROUTED[name]
    host = adapterkit.get_host()
    needed = {"splitter": recipe.get("splitter", {}).get("name"), "router": recipe.get("router", {}).get("name")}
    if any(n and n not in host.registries[role] for role, n in needed.items()):
        pytest.skip(f"the {name} plugin is not installed")
    model = trained(recipe)
    url = f"{memory_url}/{name}.safetensors"
    info = adapterkit.save(model, url)
    assert info.method == method and set(info.plugins) >= {"builtins"}
    fresh = base_model()
    adapterkit.load(url, fresh)
    model.eval(), fresh.eval()
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), adapterkit.route(model, [0, 1, 2]), adapterkit.route(fresh, [0, 1, 2]):
        assert torch.equal(model(x), fresh(x))
    ours, theirs = adapterkit.adapter_state_dict(model), adapterkit.adapter_state_dict(fresh)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours) and list(ours) == list(theirs)


def test_extra_tensors_beside_the_adapter(memory_url: str) -> None:
    """A classifier head (or any tensors) stored beside an adapter: the file stays an
    adapter (kind, method, recipe), ``load`` skips the extras, ``load_tensors`` reads them."""
    model = trained(LORA, seed=1)
    head = {"head.weight": torch.randn(3, 4), "head.bias": torch.randn(3)}
    url = f"{memory_url}/with-head.safetensors"
    info = adapterkit.save(model, url, metadata={"note": "x"}, extra_tensors=head)
    seen = adapterkit.inspect(url)
    assert (seen.content, seen.kind, seen.method) == ("adapter", "lora", "lora")
    assert seen.extra == info.extra == ("head.bias", "head.weight")
    assert seen.to_dict()["extra"] == ["head.bias", "head.weight"] and "extra     2 tensors" in str(seen)
    assert set(seen.sites) == {"0", "2"} and seen.metadata == {"note": "x"}
    fresh = adapterkit.load(url, base_model())  # attaches the stored recipe; the head is not the model's
    assert_same_adapter(model, fresh)
    extras = adapterkit.load_tensors(url, seen.extra)
    assert set(extras) == set(head) and all(torch.equal(extras[k], head[k]) for k in head)
    with pytest.raises(StorageError, match="extra tensor '0.projections.A.weight' has the name of an adapter"):
        adapterkit.save(model, url, extra_tensors={"0.projections.A.weight": torch.zeros(1)})
    with pytest.raises(StorageError, match="extra_tensors go beside an attached model"):
        adapterkit.save({"x": torch.zeros(1)}, url, extra_tensors=head)


def test_format_1_files_with_sha256_digests_still_load_and_verify(tmp_path: Any) -> None:
    """Format 1 stored sha256 data digests; format 2 stores XXH3-128. Both verify on load."""
    from adapterkit.storage import format as fmt
    from adapterkit.storage.io import parse_whole

    model = trained(LORA)
    path = f"{tmp_path}/v2.safetensors"
    adapterkit.save(model, path)
    with open(path, "rb") as file:
        data = file.read()
    header = parse_whole(data, path)
    assert fmt.KEY_XXH3 in header.metadata and fmt.KEY_SHA256 not in header.metadata
    payload = data[header.header_size:]
    infos = sorted(header.tensors.values(), key=lambda i: i.offsets)
    # a genuine format 1 file: the format 1 key set (no history, which format 3 added)
    meta = {k: v for k, v in header.metadata.items() if k not in (fmt.KEY_XXH3, fmt.KEY_HISTORY)}
    meta[fmt.KEY_FORMAT] = "1"
    meta[fmt.KEY_SHA256] = json.dumps({i.name: hashlib.sha256(payload[i.offsets[0]:i.offsets[1]]).hexdigest()
                                       for i in infos})
    old = f"{tmp_path}/v1.safetensors"
    with open(old, "wb") as file:
        file.write(fmt.encode_header(infos, meta) + payload)

    assert adapterkit.inspect(old).format_version == 1
    fresh = adapterkit.attach(base_model(), LORA)
    adapterkit.load(old, fresh)
    assert_same_adapter(fresh, model)
    corrupt = bytearray(fmt.encode_header(infos, meta) + payload)
    corrupt[-3] ^= 0x01
    with open(old, "wb") as file:
        file.write(corrupt)
    with pytest.raises(StorageError, match="does not match its data digest"):
        adapterkit.load(old, adapterkit.attach(base_model(), LORA))
