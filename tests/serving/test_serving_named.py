"""Named adapters: several adapters on one base, one active; switch, save/load by name,
fold one while the others stay, delete, detach; refusals leave the model as it was."""

from __future__ import annotations

import pytest
import torch
from servinglib import ATOL, llama, logits, lora, randomize, tokens

import adapterkit
from adapterkit.errors import AdapterkitError, AttachError

TARGETS = ["q_proj", "v_proj", "down_proj"]
RANKS = {"a": (4, 8.0), "b": (8, None), "c": (16, 4.0)}  # name: (r, alpha)


def named_model() -> torch.nn.Module:
    model = llama()
    for seed, (name, (r, alpha)) in enumerate(RANKS.items()):
        adapterkit.attach(model, lora(TARGETS, r, alpha), name=name)
        randomize(model, seed)
    return model


def alone(name: str, model: torch.nn.Module) -> torch.nn.Module:
    """A fresh base with only adapter ``name`` (unnamed), holding the same tensors."""
    r, alpha = RANKS[name]
    other = adapterkit.attach(llama(), lora(TARGETS, r, alpha))
    with adapterkit.using(model, name):
        values = adapterkit.adapter_state_dict(model)
    other.load_state_dict(values, strict=False)
    return other


def test_each_named_adapter_runs_as_its_own_model() -> None:
    model = named_model()
    assert adapterkit.adapters(model) == ["a", "b", "c"]
    assert adapterkit.active_adapter(model) == "c"  # the last attached is active
    ids = tokens(3, 7)
    for name in RANKS:
        adapterkit.activate(model, name)
        assert adapterkit.active_adapter(model) == name
        torch.testing.assert_close(logits(model, ids), logits(alone(name, model), ids), rtol=0, atol=0)
    adapterkit.deactivate(model)
    torch.testing.assert_close(logits(model, ids), logits(llama(), ids), rtol=0, atol=0)


def test_only_the_active_adapter_trains() -> None:
    model = named_model()
    adapterkit.activate(model, "b")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".projections." in n for n in trainable)
    assert sum(model.get_parameter(n).numel() for n in trainable) == adapterkit.summary(model).trainable
    before = {name: {k: v.clone() for k, v in adapterkit.adapter_state_dict(model).items()} for name in ("a", "c")
              if adapterkit.activate(model, name)}
    adapterkit.activate(model, "b")
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(input_ids=tokens(2, 5), labels=tokens(2, 5)).loss.backward()
    optimizer.step()
    for name, values in before.items():
        with adapterkit.using(model, name):
            for key, value in adapterkit.adapter_state_dict(model).items():
                assert torch.equal(value, values[key]), (name, key)
    assert adapterkit.active_adapter(model) == "b"  # using() restores the active one


def test_an_unnamed_adapter_becomes_default() -> None:
    model = adapterkit.attach(llama(), lora(TARGETS, 4))
    with pytest.raises(AttachError, match="already has adapters attached"):
        adapterkit.attach(model, lora(TARGETS, 4))
    adapterkit.attach(model, lora(TARGETS, 8), name="other")
    assert adapterkit.adapters(model) == ["default", "other"]
    with pytest.raises(AttachError, match=r"holds named adapters \['default', 'other'\]; attach another with name"):
        adapterkit.attach(model, lora(TARGETS, 4))


@pytest.mark.parametrize(("recipe", "message"), [
    (lora(["q_proj", "k_proj"], 4), "adapt different modules"),
    ({"adapter": {"kind": "bottleneck", "targets": TARGETS, "d_in": 32, "d_out": 32}}, "share one kind"),
    (lora(["nothing_here"], 4), "no module matches targets"),
])
def test_incompatible_adapters_are_refused_and_nothing_changes(recipe: dict, message: str) -> None:
    model = named_model()
    adapterkit.activate(model, "b")
    ids = tokens(2, 6)
    expected = logits(model, ids)
    with pytest.raises(AttachError, match=message) as info:
        adapterkit.attach(model, recipe, name="new")
    assert "\n" not in str(info.value)
    assert adapterkit.adapters(model) == ["a", "b", "c"] and adapterkit.active_adapter(model) == "b"
    torch.testing.assert_close(logits(model, ids), expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["a", "", "__base__", 3, "x" * 201])
def test_taken_or_bad_names_are_refused(name: object) -> None:
    model = named_model()
    with pytest.raises(AttachError, match="already holds an adapter named|printable string|means 'no adapter'"):
        adapterkit.attach(model, lora(TARGETS, 4), name=name)  # type: ignore[arg-type]
    assert adapterkit.adapters(model) == ["a", "b", "c"]


def test_save_and_load_by_name() -> None:
    model = named_model()
    adapterkit.activate(model, "a")
    for name in RANKS:
        adapterkit.save(model, f"memory://named/{name}.safetensors", name=name)
    assert adapterkit.active_adapter(model) == "a"  # saving by name does not switch
    fresh = llama()
    for name in reversed(list(RANKS)):
        adapterkit.load(f"memory://named/{name}.safetensors", fresh, name=name)
    assert adapterkit.adapters(fresh) == ["c", "b", "a"]
    ids = tokens(2, 6)
    for name in RANKS:
        adapterkit.activate(model, name)
        adapterkit.activate(fresh, name)
        torch.testing.assert_close(logits(fresh, ids), logits(model, ids), rtol=0, atol=0)
    expected = logits(fresh, ids)  # adapter "c" is active
    adapterkit.activate(fresh, "b")
    before = logits(fresh, ids)
    with pytest.raises(adapterkit.StorageError, match=r"has shape \[1, 64, 16\] in the file but \[1, 64, 8\]"):
        adapterkit.load("memory://named/c.safetensors", fresh, name="b")  # another rank
    torch.testing.assert_close(logits(fresh, ids), before, rtol=0, atol=0)  # refused: b as it was
    adapterkit.activate(fresh, "c")
    torch.testing.assert_close(logits(fresh, ids), expected, rtol=0, atol=0)


def test_loading_into_an_existing_name_replaces_its_values() -> None:
    model = named_model()
    adapterkit.save(model, "memory://named/b.safetensors", name="b")
    other = named_model()
    with adapterkit.using(other, "b"):
        randomize(other, 99)
    adapterkit.load("memory://named/b.safetensors", other, name="b")
    assert adapterkit.active_adapter(other) == "b"
    adapterkit.activate(model, "b")
    torch.testing.assert_close(logits(other, tokens(2, 6)), logits(model, tokens(2, 6)), rtol=0, atol=0)


def test_fold_one_while_the_others_stay() -> None:
    model = named_model()
    ids = tokens(2, 6)
    bare = logits(llama(), ids)
    adapterkit.activate(model, "a")
    with_a = logits(model, ids)
    adapterkit.merge(model, "fold")  # a's update is now in the base weights, for every adapter
    torch.testing.assert_close(logits(model, ids), with_a, **ATOL)
    adapterkit.activate(model, "b")
    b_alone = logits(alone("b", model), ids)
    assert (logits(model, ids) - b_alone).abs().max() > 1e-3  # b runs on the base plus a's update
    adapterkit.activate(model, "a")
    adapterkit.unmerge(model)
    adapterkit.activate(model, "b")
    torch.testing.assert_close(logits(model, ids), b_alone, **ATOL)
    adapterkit.activate(model, "a")
    adapterkit.merge(model, "fold")
    adapterkit.delete(model, "a")  # deleting a folded adapter takes its update out of the base
    adapterkit.deactivate(model)
    torch.testing.assert_close(logits(model, ids), bare, **ATOL)


def test_delete_and_detach_give_the_bare_model_back() -> None:
    model = named_model()
    ids = tokens(2, 6)
    bare = logits(llama(), ids)
    adapterkit.delete(model, "c")
    assert adapterkit.adapters(model) == ["a", "b"] and adapterkit.active_adapter(model) is None
    with pytest.raises(AdapterkitError, match=r"no named adapter is active; adapterkit.activate\(model, name\)"):
        adapterkit.summary(model)
    with pytest.raises(AdapterkitError, match=r"no adapter named 'c'; the model holds \['a', 'b'\]"):
        adapterkit.activate(model, "c")
    adapterkit.activate(model, "a")
    adapterkit.detach(model)
    assert not adapterkit.is_attached(model)
    assert all(p.requires_grad for p in model.parameters())
    assert not adapterkit.sites(model)
    torch.testing.assert_close(logits(model, ids), bare, rtol=0, atol=0)


def test_modules_to_save_follow_their_adapter() -> None:
    model = llama()
    adapterkit.attach(model, {**lora(TARGETS, 4), "adapter": {**lora(TARGETS, 4)["adapter"],
                                                                "modules_to_save": ["lm_head"]}}, name="head")
    randomize(model, 0)
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    adapterkit.attach(model, lora(TARGETS, 4), name="plain")
    randomize(model, 1)
    ids = tokens(2, 6)
    plain = logits(model, ids)
    reference = adapterkit.attach(llama(), lora(TARGETS, 4))
    reference.load_state_dict(adapterkit.adapter_state_dict(model), strict=False)
    torch.testing.assert_close(plain, logits(reference, ids), rtol=0, atol=0)  # lm_head as before "head"
    adapterkit.activate(model, "head")
    assert (logits(model, ids) - plain).abs().max() > 1.0  # the trained head is back


def test_a_taken_default_name_leaves_an_unnamed_adapter_unnamed() -> None:
    model = adapterkit.attach(llama(), lora(TARGETS, 4))
    with pytest.raises(AttachError, match="already holds an adapter named 'default'"):
        adapterkit.attach(model, lora(TARGETS, 4), name="default")
    assert adapterkit.adapters(model) == [] and adapterkit.summary(model).trainable > 0
