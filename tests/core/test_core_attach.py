"""attach: target matching, and every recipe that cannot fit fails before the model is
touched with one line naming the site and the reason."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import adapterkit
from adapterkit import AttachError, PluginHost
from adapterkit.attach import find_sites, match_target


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.ModuleDict({"query": nn.Linear(8, 8), "value": nn.Linear(8, 8)})
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn["query"](x) * self.attn["value"](x)
        return x + self.mlp(x)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.ModuleDict({"layer": nn.ModuleList([Block(), Block()])})
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.encoder["layer"]:
            x = block(x)
        return self.head(x)


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("query", ["encoder.layer.0.attn.query", "encoder.layer.1.attn.query"]),
        ("attn.value", ["encoder.layer.0.attn.value", "encoder.layer.1.attn.value"]),
        ("uery", []),  # a suffix is a whole dotted component
        ("encoder.layer.*.mlp", ["encoder.layer.0.mlp", "encoder.layer.1.mlp"]),
        ("encoder.*.mlp", []),  # `*` stays within one component
        ("encoder.**.mlp", ["encoder.layer.0.mlp", "encoder.layer.1.mlp"]),
        ("**.mlp.?", [f"encoder.layer.{i}.mlp.{j}" for i in (0, 1) for j in (0, 1, 2)]),
        ("encoder.layer.1.mlp.*", ["encoder.layer.1.mlp.0", "encoder.layer.1.mlp.1", "encoder.layer.1.mlp.2"]),
        ("re:encoder\\.layer\\.0\\.attn\\.(query|value)", ["encoder.layer.0.attn.query", "encoder.layer.0.attn.value"]),
        ("re:attn", []),  # regexes full-match
        ("head", ["head"]),
    ],
)
def test_target_matching(pattern: str, expected: list[str]) -> None:
    names = [n for n, _ in Tiny().named_modules() if n]
    assert [n for n in names if match_target(n, pattern)] == expected


def test_find_sites_keeps_outermost_only() -> None:
    assert find_sites(Tiny(), ["encoder.layer.0.mlp", "**.mlp.0", "head"]) == [
        "encoder.layer.0.mlp", "encoder.layer.1.mlp.0", "head"
    ]


def lora(targets: list[str], **args: object) -> dict:
    return {"adapter": {"kind": "lora", "targets": targets, **args}}


def attach_error(model: nn.Module, recipe: dict, host: PluginHost) -> str:
    with pytest.raises(AttachError) as info:
        adapterkit.attach(model, recipe, host=host)
    message = str(info.value)
    assert "\n" not in message
    assert not hasattr(model, "_adapterkit")
    assert all(p.requires_grad for p in model.parameters())  # the model was not touched
    assert not adapterkit.sites(model)
    return message


def test_no_site_matched_lists_names(builtin_host: PluginHost) -> None:
    message = attach_error(Tiny(), lora(["q_proj", "v_proj"]), builtin_host)
    assert message == (
        "cannot attach: no module matches targets ['q_proj', 'v_proj']; module names look like "
        "['encoder', 'encoder.layer', 'encoder.layer.0', 'encoder.layer.0.attn', "
        "'encoder.layer.0.attn.query', 'encoder.layer.0.attn.value']"
    )


def test_lora_on_non_linear_names_the_site(builtin_host: PluginHost) -> None:
    # the first site fits; the second does not: still nothing is attached
    message = attach_error(Tiny(), lora(["encoder.layer.0.attn.query", "encoder.layer.0.mlp.1"]), builtin_host)
    assert message == (
        "cannot attach: site 'encoder.layer.0.mlp.1': LoRA adapts nn.Linear, Conv1D, nn.Embedding, nn.Conv2d; got GELU"
    )


def test_skills_without_router(builtin_host: PluginHost) -> None:
    message = attach_error(Tiny(), lora(["query"], skills=3), builtin_host)
    assert message.startswith("cannot attach: site 'encoder.layer.0.attn.query': 3 skills need a router (e.g.")


def test_bottleneck_dims_not_inferable(builtin_host: PluginHost) -> None:
    recipe = {"adapter": {"kind": "bottleneck", "targets": ["encoder.layer.0.mlp.1"]}}
    message = attach_error(Tiny(), recipe, builtin_host)
    assert message == (
        "cannot attach: site 'encoder.layer.0.mlp.1': cannot infer the feature sizes of GELU (it holds no Linear, "
        "Conv1D, convolution or norm layer); set d_in and d_out in [adapter]"
    )
    fixed = {"adapter": {**recipe["adapter"], "d_in": 16, "d_out": 16, "r": 2}}
    model = adapterkit.attach(Tiny(), fixed, host=builtin_host)
    site = adapterkit.sites(model)["encoder.layer.0.mlp.1"]
    assert site.projections["down"].weight.shape == (1, 16, 2) and site.projections["up"].weight.shape == (1, 2, 16)


def test_attaching_twice(builtin_host: PluginHost) -> None:
    model = adapterkit.attach(Tiny(), lora(["query"]), host=builtin_host)
    with pytest.raises(AttachError, match="^cannot attach: model already has adapters attached"):
        adapterkit.attach(model, lora(["value"]), host=builtin_host)
    assert sorted(adapterkit.sites(model)) == ["encoder.layer.0.attn.query", "encoder.layer.1.attn.query"]


def test_attach_freezes_base_and_marks_adapters(builtin_host: PluginHost) -> None:
    model = adapterkit.attach(Tiny(), lora(["query", "value"], r=2), host=builtin_host)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        f"encoder.layer.{i}.attn.{m}.projections.{p}.weight" for i in (0, 1) for m in ("query", "value") for p in "AB"
    }
    assert isinstance(model.encoder["layer"][0].attn["query"], adapterkit.AdapterSite)
    assert adapterkit.summary(model).recipe == adapterkit.Recipe.from_dict(lora(["query", "value"], r=2))


def test_attach_is_deterministic_in_the_seed(builtin_host: PluginHost) -> None:
    states = [
        adapterkit.adapter_state_dict(adapterkit.attach(Tiny(), {**lora(["query"]), "seed": s}, host=builtin_host))
        for s in (0, 0, 1)
    ]
    key = "encoder.layer.0.attn.query.projections.A.weight"
    assert torch.equal(states[0][key], states[1][key]) and not torch.equal(states[0][key], states[2][key])


def test_no_adapters_errors(builtin_host: PluginHost) -> None:
    with pytest.raises(adapterkit.AdapterkitError, match="no adapters attached"):
        adapterkit.summary(Tiny())
    with pytest.raises(adapterkit.AdapterkitError, match="no adapters attached"):
        adapterkit.merge(Tiny(), "fold", host=builtin_host)


def test_fold_refuses_a_bottleneck(builtin_host: PluginHost) -> None:
    recipe = {"adapter": {"kind": "bottleneck", "targets": ["encoder.layer.0.mlp"], "r": 2}}
    model = adapterkit.attach(Tiny(), recipe, host=builtin_host)
    with pytest.raises(adapterkit.AdapterkitError) as info:
        adapterkit.merge(model, "fold", host=builtin_host)
    assert str(info.value) == (
        "cannot merge with 'fold': site 'encoder.layer.0.mlp': fold needs a kind with a weight update "
        "(e.g. a LoRA site), got 'bottleneck'"
    )
