"""The model's lifecycle: merge is a state transition that save/load reproduce on a fresh
base model; unmerge, detach and disabled give the base back."""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

import adapterkit
from adapterkit.plugins import PluginHost, get_host, set_host

TOL = {"rtol": 0, "atol": 1e-6}


def base_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(enc=nn.Linear(8, 16), act=nn.GELU(), dec=nn.Linear(16, 8))).double()


def lora(**kind: Any) -> dict[str, Any]:
    return {"kind": "lora", "targets": ["enc", "dec"], "r": 4, **kind}


MOSA = {"adapter": lora(), "splitter": {"name": "mosa", "n_cells": 4, "share": "none"}, "sampler": {"name": "mosa"},
        "merger": {"name": "mosa"}, "seed": 3}
HIERARCHICAL = {"adapter": lora(), "splitter": {"name": "hierarchical", "levels": [2, 4]},
                "sampler": {"name": "hierarchical", "mix": [0.5, 0.5]}, "merger": {"name": "mosa"}}
ROUTED = {"adapter": lora(skills=3, alpha=1), "splitter": {"name": "mhr", "heads": 2},
          "router": {"name": "poly", "tasks": 2}}
BOTTLENECK = {"adapter": {"kind": "bottleneck", "targets": ["enc"], "r": 4},
              "splitter": {"name": "mosa", "n_cells": 2}, "sampler": {"name": "mosa"}, "merger": {"name": "mosa"}}

# (recipe, merger, merger args, task id for the routed forward before the merge)
CASES: dict[str, tuple[dict[str, Any], str | None, dict[str, Any]]] = {
    "mosa": (MOSA, None, {}),
    "mosa-bottleneck": (BOTTLENECK, None, {}),
    "hierarchical": (HIERARCHICAL, None, {}),
    "mosa+fold": (MOSA, "fold", {}),
    "collapse": (ROUTED, "collapse", {"task": 1}),
    "collapse+fold": (ROUTED, "collapse", {"task": 1, "fold": True}),
    "average": (ROUTED, "average", {}),
    "weighted": (ROUTED, "weighted", {"weights": [0.5, 0.3, 0.2]}),
    "weighted-delta": (ROUTED, "weighted", {"weights": [0.5, 0.3, 0.2], "mode": "delta", "rank": 3}),
}


def trained(recipe: dict[str, Any]) -> nn.Module:
    """The recipe on a fresh base with every adapter tensor random (as after training)."""
    model = adapterkit.attach(base_model(), recipe)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * 0.3)
    return model.eval()


def inputs() -> torch.Tensor:
    return torch.randn(5, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


def output(model: nn.Module, task: int | None = None) -> torch.Tensor:
    with torch.no_grad():
        if task is None:
            return model(inputs())  # type: ignore[no-any-return]
        with adapterkit.route(model, task):
            return model(inputs())  # type: ignore[no-any-return]


def routed(model: nn.Module) -> bool:
    return any(site.router.needs_task_ids for site in adapterkit.sites(model).values())


def check_roundtrip(merged: nn.Module, url: str) -> nn.Module:
    """save -> load onto a fresh base: the same outputs, sites, folded sites and recipe."""
    info = adapterkit.save(merged, url)
    fresh = adapterkit.load(url, base_model()).eval()
    task = 0 if routed(merged) else None
    torch.testing.assert_close(output(fresh, task), output(merged, task), **TOL)
    assert list(adapterkit.sites(fresh)) == list(adapterkit.sites(merged))
    assert list(adapterkit.folded_sites(fresh)) == list(adapterkit.folded_sites(merged))
    assert adapterkit.recipe_of(fresh) == adapterkit.recipe_of(merged)
    assert info.sites == tuple(adapterkit.sites(merged)) and info.folded == tuple(adapterkit.folded_sites(merged))
    return fresh


@pytest.mark.parametrize("case", list(CASES))
def test_a_merged_model_saves_and_loads_onto_a_fresh_base(case: str) -> None:
    recipe, merger, args = CASES[case]
    model = trained(recipe)
    before = output(model, args.get("task", 0) if routed(model) else None)
    merged = adapterkit.merge(model, merger, **args)
    if merger not in ("average", "weighted"):  # these define a new adapter; the others keep the eval outputs
        torch.testing.assert_close(output(merged, 0 if routed(merged) else None), before, **TOL)
    fresh = check_roundtrip(merged, f"memory://lifecycle/{case}.safetensors")
    step = adapterkit.history(merged)[-1]
    assert step["op"] == "merge" and step["name"] == (merger or "mosa") and step["version"] != "unknown"
    if case.endswith("fold"):
        assert not adapterkit.sites(fresh) and adapterkit.recipe_of(fresh) is None
        assert sum(p.numel() for p in fresh.parameters()) == sum(p.numel() for p in base_model().parameters())
    info = adapterkit.inspect(f"memory://lifecycle/{case}.safetensors")
    assert [s["op"] for s in info.history] == ["attach", "merge"]


def test_merged_recipes_describe_what_is_left() -> None:
    mosa = adapterkit.merge(trained(MOSA))
    recipe = adapterkit.recipe_of(mosa)
    assert recipe is not None and (recipe.splitter.name, recipe.sampler.name, recipe.merger.name) == (
        "dense", "all", "identity")
    collapsed = adapterkit.recipe_of(adapterkit.merge(trained(ROUTED), "collapse", task=0))
    assert collapsed is not None and (collapsed.skills, collapsed.router.name) == (1, "none")
    delta = adapterkit.recipe_of(adapterkit.merge(trained(ROUTED), "weighted", weights=[1, 0, 0], mode="delta"))
    assert delta is not None and delta.kind_args["r"] == 12  # rank K*r
    assert delta.kind_args["alpha"] / 12 == 1 / 4  # the scale kept
    folded = adapterkit.merge(trained(ROUTED), "collapse", task=1, fold=True)
    assert adapterkit.recipe_of(folded) is None and set(adapterkit.folded_sites(folded)) == {"enc", "dec"}


def test_a_folded_file_is_smaller_than_its_inventory() -> None:
    inventory = adapterkit.save(trained(ROUTED), "memory://lifecycle/inventory.safetensors")
    folded = adapterkit.save(adapterkit.merge(trained(ROUTED), "collapse", task=1, fold=True),
                             "memory://lifecycle/folded.safetensors")
    assert folded.data_size < inventory.data_size
    assert "folded" in folded.method and "(+ 2 folded into base weights)" in str(folded)


@pytest.fixture
def stripes_host(with_stripes: Any) -> Iterator[PluginHost]:
    """The process-wide host with the installed third-party stripes plugin, for this test."""
    previous = get_host()
    host = PluginHost()
    host.load_entry_points()
    assert "prune" in host.mergers
    set_host(host)
    try:
        yield host
    finally:
        set_host(previous)


def test_a_third_party_merger_saves_and_loads(stripes_host: PluginHost) -> None:
    model = trained({"adapter": lora(), "splitter": {"name": "stripes", "n_cells": 2},
                     "sampler": {"name": "one_stripe"}})
    merged = adapterkit.merge(model, "prune", keep=0.5)
    for site in adapterkit.sites(merged).values():
        for weight in site.mixed_weights().values():
            assert (weight == 0).float().mean() == 0.5
    check_roundtrip(merged, "memory://lifecycle/prune.safetensors")
    step = adapterkit.history(merged)[-1]
    assert (step["name"], step["plugin"], step["version"], step["args"]) == ("prune", "stripes", "0.3.0", {"keep": 0.5})


def assert_is_the_base(model: nn.Module, base: nn.Module, atol: float = 0.0) -> None:
    assert [(n, type(m)) for n, m in model.named_modules()] == [(n, type(m)) for n, m in base.named_modules()]
    ours, theirs = dict(model.named_parameters()), dict(base.named_parameters())
    assert ours.keys() == theirs.keys()
    for name, param in theirs.items():
        torch.testing.assert_close(ours[name], param, rtol=0, atol=atol)
        assert ours[name].requires_grad == param.requires_grad
    assert not adapterkit.is_attached(model)


@pytest.mark.parametrize("stage", ["attached", "merged", "folded", "collapsed+folded", "adapted"])
def test_detach_restores_the_base_model(stage: str) -> None:
    base = base_model()
    base.enc.bias.requires_grad_(False)  # detach restores each flag as it was
    model = copy.deepcopy(base)
    recipe = ROUTED if stage in ("collapsed+folded", "adapted") else MOSA
    adapterkit.attach(model, recipe)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.normal_()
    if stage == "merged":
        adapterkit.merge(model)
    elif stage == "folded":
        adapterkit.merge(model, "fold")
    elif stage == "collapsed+folded":
        adapterkit.merge(model, "collapse", task=0, fold=True)
    elif stage == "adapted":
        adapterkit.adapt(model, "mhr-mu")
    folded = stage.endswith("folded")
    if folded:
        assert (model.enc.weight - base.enc.weight).abs().max() > 1e-3
    adapterkit.detach(model)
    assert_is_the_base(model, base, atol=1e-12 if folded else 0.0)
    torch.testing.assert_close(output(model), output(base), rtol=0, atol=1e-12)
    adapterkit.attach(model, MOSA)  # attachable again


def test_unmerge_puts_the_sites_back() -> None:
    model = trained(MOSA)
    expected = output(model)
    sites_before = adapterkit.sites(model)
    adapterkit.merge(model, "fold")
    adapterkit.unmerge(model)
    assert adapterkit.sites(model) == sites_before and not adapterkit.folded_sites(model)
    torch.testing.assert_close(output(model), expected, **TOL)
    with pytest.raises(adapterkit.AdapterkitError, match="nothing to unmerge"):
        adapterkit.unmerge(model)


def test_disabled_runs_the_bare_base() -> None:
    base = base_model().eval()
    model = trained(MOSA)
    adapted = output(model)
    with adapterkit.disabled(model):
        torch.testing.assert_close(output(model), output(base), rtol=0, atol=0)
    torch.testing.assert_close(output(model), adapted, rtol=0, atol=0)
    adapterkit.merge(model, "fold")
    with pytest.raises(adapterkit.AdapterkitError, match="folded into base weights.*unmerge"):
        with adapterkit.disabled(model):
            pass


def test_a_failed_merge_leaves_the_model_as_it_was() -> None:
    model = trained(ROUTED)
    sites_before = adapterkit.sites(model)
    with pytest.raises(adapterkit.AdapterkitError, match="cannot merge with 'fold'.*collapse it to one task"):
        adapterkit.merge(model, "fold")
    assert adapterkit.sites(model) == sites_before and adapterkit.history(model)[-1]["op"] == "attach"


def test_a_folded_file_loads_only_onto_a_fresh_base() -> None:
    url = "memory://lifecycle/only-fresh.safetensors"
    adapterkit.save(adapterkit.merge(trained(MOSA), "fold"), url)
    with pytest.raises(adapterkit.StorageError, match="folded into base weights; load it onto a fresh base model"):
        adapterkit.load(url, trained(MOSA))


def test_recipes_name_registered_classes_only() -> None:
    model = trained(MOSA)

    class Unregistered(adapterkit.Merger):
        def merge_site(self, site: Any) -> Any:
            new = site.rebuild({n: w[0] for n, w in site.expected_weights().items()})
            new.router = Stray(None, heads=1, skills=1, generator=torch.Generator())
            return new

    from adapterkit.roles import SingleSkill

    class Stray(SingleSkill):
        pass

    host = get_host()
    host.mergers._items["unregistered-test"] = Unregistered
    host.mergers._providers["unregistered-test"] = "<test>"
    try:
        with pytest.raises(adapterkit.AdapterkitError, match="router class .*Stray is not registered"):
            adapterkit.merge(model, "unregistered-test")
    finally:
        host.mergers._items.pop("unregistered-test")
        host.mergers._providers.pop("unregistered-test")
