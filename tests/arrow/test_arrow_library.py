"""Prototypes stored in the library beside the experts: computed once per expert file
(keyed by its digest), read back by every selection, updated incrementally when experts
are added, replaced or removed, hidden from listings, recomputed when damaged; on
memory:// and on a real S3 API (moto on loopback)."""

from __future__ import annotations

import copy
import uuid
from typing import Any

import adapterkit_arrow
import pytest
import torch
from adapterkit_arrow import FOLDER, PrototypeStore, arrow
from adapterkit_arrow import build as arrow_build
from arrowlib import expert, mlp, new_library

import adapterkit

SITES = ["0", "2"]


def add_experts(lib: Any, base: torch.nn.Module, names: list[str], seed: int = 0, r: int = 4) -> None:
    for i, name in enumerate(names):
        lib.add(expert(base, SITES, r=r, seed=seed + i, gap=None), name, tags=["expert"])


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many experts' prototypes ``arrow`` computes, call by call."""
    calls: list[int] = []
    real = arrow_build.top_right_singular_vectors

    def counting(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        calls.append(a.shape[0])
        return real(a, b)

    monkeypatch.setattr(arrow_build, "top_right_singular_vectors", counting)
    return calls


def computed_per_site(calls: list[int]) -> int:
    return calls[0] if calls else 0  # every site computes the same experts


def test_arrow_computes_missing_prototypes_only(counted: list[int]) -> None:
    base = mlp()
    lib = new_library()
    add_experts(lib, base, ["a", "b", "c"])
    first = arrow(copy.deepcopy(base), lib.select(tags="expert"), library=lib)
    assert computed_per_site(counted) == 3 and len(PrototypeStore(lib).keys()) == 3
    counted.clear()
    again = arrow(copy.deepcopy(base), lib.select(tags="expert"), library=lib)
    assert counted == []  # every prototype read from the library
    x = torch.randn(4, 16)
    assert torch.equal(again(x), first(x))
    add_experts(lib, base, ["d"], seed=10)
    counted.clear()
    arrow(copy.deepcopy(base), lib.select(tags="expert"), library=lib)
    assert computed_per_site(counted) == 1  # only the new expert
    counted.clear()
    arrow(copy.deepcopy(base), ["b", "d"], library=lib)  # any selection reuses them
    assert counted == []


def test_update_adds_and_removes_incrementally() -> None:
    base = mlp()
    lib = new_library()
    store = PrototypeStore(lib)
    add_experts(lib, base, ["a", "b", "c"])
    report = store.update(base)
    assert sorted(report.computed) == ["a", "b", "c"] and report.stored == () and report.removed == ()
    assert store.update(base) == adapterkit_arrow.UpdateReport((), ("a", "b", "c"), ())
    add_experts(lib, base, ["d"], seed=10)
    assert store.update(base).computed == ("d",)
    gone = lib.get("b").digest
    lib.remove("b")
    report = store.update(base)
    assert report.computed == () and len(report.removed) == 1 and gone.endswith(report.removed[0])
    assert len(store.keys()) == 3
    lib.remove("c")  # replaced behind the same name: another digest, another file
    add_experts(lib, base, ["c"], seed=20)
    report = store.update(base)
    assert report.computed == ("c",) and len(report.removed) == 1
    assert not adapterkit.is_attached(base)  # each expert was loaded onto it and detached again


def test_update_and_arrow_store_the_same_prototypes() -> None:
    base = mlp()
    lib = new_library()
    add_experts(lib, base, ["a", "b"])
    PrototypeStore(lib).update(base)
    stored = PrototypeStore(lib)
    fresh_lib = new_library()
    add_experts(fresh_lib, base, ["a", "b"])
    model = arrow(copy.deepcopy(base), ["a", "b"], library=fresh_lib)  # computed from the stacked weights
    for k, name in enumerate(["a", "b"]):
        key = adapterkit_arrow.store.key_of(lib.get(name).digest)
        got = stored.read(key, {"0": 16, "2": 32})
        assert got is not None
        for site_name, site in adapterkit.sites(model).items():
            torch.testing.assert_close(got[site_name], site.router.prototypes[k], atol=1e-6, rtol=0)


def test_genknowsub_prototypes_have_their_own_keys(counted: list[int]) -> None:
    base = mlp()
    lib = new_library()
    add_experts(lib, base, ["a", "b"])
    for i, name in enumerate(["g0", "g1"]):
        lib.add(expert(base, SITES, r=4, seed=50 + i, gap=None, size=0.3), name, tags=["general"])
    arrow(copy.deepcopy(base), ["a", "b"], library=lib)
    counted.clear()
    purified = arrow(copy.deepcopy(base), ["a", "b"], library=lib, general=lib.select(tags="general"))
    assert computed_per_site(counted) == 2  # the purified experts have other prototypes
    keys = PrototypeStore(lib).keys()
    assert len(keys) == 4 and sum(".gks-" in k for k in keys) == 2
    counted.clear()
    again = arrow(copy.deepcopy(base), ["a", "b"], library=lib, general=["g0", "g1"])
    assert counted == []
    x = torch.randn(3, 16)
    assert torch.equal(again(x), purified(x))
    report = PrototypeStore(lib).update(base, experts=["a", "b"], general=["g0", "g1"])
    assert report.computed == () and sorted(report.stored) == ["a", "b"]


def test_prototype_files_are_hidden_from_listings() -> None:
    base = mlp()
    lib = new_library()
    add_experts(lib, base, ["a", "b"])
    PrototypeStore(lib).update(base)
    assert PrototypeStore(lib).url == f"{lib.url}/{FOLDER}"
    assert sorted(e.name for e in adapterkit.ls(lib.url)) == ["a.safetensors", "b.safetensors"]
    report = lib.rebuild(dry_run=True)
    assert not report.stale and report.skipped == ()


def test_damaged_prototypes_are_recomputed(counted: list[int], caplog: pytest.LogCaptureFixture) -> None:
    base = mlp()
    lib = new_library()
    add_experts(lib, base, ["a", "b"])
    want = arrow(copy.deepcopy(base), ["a", "b"], library=lib)
    store = PrototypeStore(lib)
    key = adapterkit_arrow.store.key_of(lib.get("a").digest)
    adapterkit.save_tensors({"0": torch.ones(16), "2": torch.ones(32)}, f"{store.url}/{key}.safetensors")  # not unit
    counted.clear()
    got = arrow(copy.deepcopy(base), ["a", "b"], library=lib)
    assert computed_per_site(counted) == 1 and "recomputing" in caplog.text
    x = torch.randn(3, 16)
    assert torch.equal(got(x), want(x))
    assert store.read(key, {"0": 16, "2": 32}) is not None  # rewritten


def test_experts_by_url_without_a_library() -> None:
    base = mlp()
    lib = new_library()
    add_experts(lib, base, ["a", "b"])
    by_url = arrow(copy.deepcopy(base), {"a": lib.get("a").url, "b": lib.get("b").url})
    by_entry = arrow(copy.deepcopy(base), lib.select(tags="expert"), library=lib)
    x = torch.randn(3, 16)
    assert torch.equal(by_url(x), by_entry(x))
    with pytest.raises(adapterkit.StorageError, match="no adapter named 'z'"):
        arrow(copy.deepcopy(base), ["a", "z"], library=lib)


# --- a real S3 API ------------------------------------------------------------------------




def test_on_s3(moto_endpoint: str, counted: list[int]) -> None:
    import s3fs

    options = {"client_kwargs": {"endpoint_url": moto_endpoint}}
    bucket = f"arrow-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(**options).mkdir(bucket)
    lib = adapterkit.Library.init(f"s3://{bucket}/experts", storage_options=options)
    base = mlp()
    add_experts(lib, base, ["a", "b", "c"])
    model = arrow(copy.deepcopy(base), lib.select(tags="expert"), library=lib, top_k=2)
    assert computed_per_site(counted) == 3
    store = PrototypeStore(lib)
    assert len(store.keys()) == 3
    counted.clear()
    again = arrow(copy.deepcopy(base), lib.select(tags="expert"), library=lib, top_k=2)
    assert counted == []
    x = torch.randn(3, 16)
    assert torch.equal(again(x), model(x))
    lib.remove("a")
    assert len(store.update(base).removed) == 1 and len(store.keys()) == 2
