"""Registries and the plugin host: collisions name both plugins, unknown names list the
choices, wrong base classes and misspelled hooks are reported, not fatal."""

from __future__ import annotations

import pytest
from torch import nn

import adapterkit
from adapterkit import PluginHost, Registry, Sampler, Splitter, hookimpl
from adapterkit.errors import DuplicateNameError, UnknownNameError
from adapterkit.roles import Merger


class Other(Splitter):
    pass


class DenseAgain:
    """Claims the built-in splitter name 'dense'."""

    @hookimpl
    def adapterkit_register_splitters(self, registry: Registry[Splitter]) -> None:
        registry.add("dense", Other)


class WrongBase:
    @hookimpl
    def adapterkit_register_samplers(self, registry: Registry[Sampler]) -> None:
        registry.add("not_a_sampler", Other)  # a Splitter offered as a Sampler


class Misspelled:
    @hookimpl
    def adapterkit_register_spliters(self, registry: Registry[Splitter]) -> None:
        registry.add("typo", Other)


class Healthy:
    @hookimpl
    def adapterkit_register_splitters(self, registry: Registry[Splitter]) -> None:
        registry.add("other", Other)


def test_registry_duplicate_names_both_plugins() -> None:
    registry: Registry[Splitter] = Registry("splitter", Splitter)
    registry._current_plugin = "first"
    registry.add("x", Splitter)
    registry._current_plugin = "second"
    with pytest.raises(DuplicateNameError) as info:
        registry.add("x", Other)
    assert str(info.value) == "splitter 'x' is registered twice: by plugin 'first' and by plugin 'second'"
    assert isinstance(info.value, adapterkit.AdapterkitError)
    assert registry["x"] is Splitter and registry.provider("x") == "first"


def test_registry_unknown_name_lists_available() -> None:
    registry: Registry[Splitter] = Registry("splitter", Splitter)
    registry.add("zeta", Splitter)
    registry.add("alpha", Other)
    with pytest.raises(UnknownNameError) as info:
        registry["mosa"]
    message = str(info.value)
    assert message.startswith("unknown splitter 'mosa'; available: alpha, zeta (")
    assert "\n" not in message and "install" in message
    assert isinstance(info.value, KeyError)  # Mapping semantics: `in` and .get work
    assert registry.get("mosa") is None and "mosa" not in registry
    with pytest.raises(UnknownNameError, match="available: none"):
        Registry("router", nn.Module)["poly"]


def test_registry_wrong_base_class() -> None:
    registry: Registry[Sampler] = Registry("sampler", Sampler)
    with pytest.raises(TypeError, match=r"sampler 'bad' from plugin '<direct>' must be a subclass of Sampler"):
        registry.add("bad", Other)
    with pytest.raises(TypeError, match="must be a subclass of Sampler"):
        registry.add("instance", Sampler())  # type: ignore[arg-type]
    assert len(registry) == 0


def test_registry_is_a_read_only_mapping(builtin_host: PluginHost) -> None:
    assert dict(builtin_host.mergers) == {
        "identity": builtin_host.mergers["identity"], "fold": builtin_host.mergers["fold"]
    }
    assert builtin_host.mergers.names_by("builtins") == ["identity", "fold"]
    assert not hasattr(builtin_host.mergers, "__setitem__")


def test_host_collision_fails_newcomer_and_keeps_builtins(builtin_host: PluginHost) -> None:
    assert builtin_host.register(DenseAgain(), "dense_again") is None
    (failure,) = builtin_host.failures
    assert failure.name == "dense_again"
    assert str(failure) == (
        "plugin 'dense_again' failed to load: DuplicateNameError: splitter 'dense' is registered twice: "
        "by plugin 'builtins' and by plugin 'dense_again'"
    )
    assert builtin_host.splitters["dense"] is Splitter
    assert builtin_host.pm.get_plugin("dense_again") is None
    assert builtin_host.register(Healthy(), "healthy") is not None  # the host keeps working
    assert builtin_host.plugins["healthy"].provides == {"splitter": ["other"]}


def test_host_wrong_base_class_is_a_failure(builtin_host: PluginHost) -> None:
    assert builtin_host.register(WrongBase(), "wrong_base") is None
    (failure,) = builtin_host.failures
    assert failure.name == "wrong_base"
    assert "sampler 'not_a_sampler' from plugin 'wrong_base' must be a subclass of Sampler" in failure.error
    assert "not_a_sampler" not in builtin_host.samplers


def test_misspelled_hook_caught_by_check_pending(builtin_host: PluginHost) -> None:
    assert builtin_host.register(Misspelled(), "misspelled") is None
    (failure,) = builtin_host.failures
    assert failure.name == "misspelled"
    assert failure.error.startswith("PluginValidationError: ")
    assert "adapterkit_register_spliters" in failure.error
    assert "typo" not in builtin_host.splitters
    assert builtin_host.register(Healthy(), "healthy") is not None  # check_pending passes again


def test_unknown_names_at_attach_list_available(builtin_host: PluginHost) -> None:
    cases = {
        ("adapter", "kind", "lorra"): "unknown adapter kind 'lorra'; available: bottleneck, lora",
        ("splitter", "name", "mosa"): "unknown splitter 'mosa'; available: dense",
        ("sampler", "name", "mosa"): "unknown sampler 'mosa'; available: all",
        ("router", "name", "poly"): "unknown router 'poly'; available: none",
        ("merger", "name", "average"): "unknown merger 'average'; available: fold, identity",
    }
    for (table, key, value), message in cases.items():
        recipe = {"adapter": {"kind": "lora", "targets": ["0"]}}
        recipe.setdefault(table, {})[key] = value
        with pytest.raises(UnknownNameError) as info:
            adapterkit.attach(nn.Sequential(nn.Linear(2, 2)), recipe, host=builtin_host)
        assert str(info.value).startswith(message + " ("), str(info.value)


def test_registries_follow_role_bases(builtin_host: PluginHost) -> None:
    assert builtin_host.splitters.base is Splitter and builtin_host.mergers.base is Merger
    provides = builtin_host.plugins["builtins"].provides
    core = {role: provides[role] for role in ("kind", "splitter", "sampler", "router", "merger")}
    assert core == {
        "kind": ["bottleneck", "lora"], "splitter": ["dense"], "sampler": ["all"], "router": ["none"],
        "merger": ["fold", "identity"],
    }
