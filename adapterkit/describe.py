"""Describing the sites a model holds as the recipe that rebuilds them (``save`` writes it)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from .errors import AdapterkitError
from .plugins import PluginHost, get_host
from .recipe import Recipe, build_config
from .site import AdapterSite
from .targets import override_for


def describe(
    found: Mapping[str, AdapterSite], origin: Recipe, host: PluginHost | None = None,
    attached: Sequence[str] | None = None,
) -> Recipe:
    """The recipe that attaching to a fresh base model rebuilds ``found`` from (values aside).

    Derived from the sites themselves: the registered names of their kind, splitter,
    sampler and router classes (the names ``origin`` used where they still apply) and
    the arguments in which their configs differ from ``origin``'s; the merger becomes
    ``identity`` once anything changed. The targets are ``origin``'s when ``found`` are
    all the ``attached`` sites, else the exact site names. Every site must agree.
    """
    host = host or get_host()
    described = [_describe_site(name, site, origin, host) for name, site in found.items()]
    variants = {text for text, *_ in described}
    split = _split_args(described, host.kinds[json.loads(next(iter(variants)))["adapter"]["kind"]]) \
        if len(variants) == 1 else None
    if split is None:
        raise AdapterkitError(f"the sites no longer share one recipe ({max(len(variants), 2)} variants); "
                              "a merger must leave every site of the same kind and roles")
    kind_args, overrides = split
    data = json.loads(variants.pop())
    data["adapter"].update(kind_args)
    if overrides:
        data["adapter"]["overrides"] = overrides
    if origin.modules_to_save:
        data["adapter"]["modules_to_save"] = list(origin.modules_to_save)
    unchanged = json_ready({k: v for k, v in origin.to_dict().items() if k != "merger"}) == json_ready(data)
    data["merger"] = origin.merger.to_dict() if unchanged else {"name": "identity"}
    recipe = Recipe.from_dict(data)
    if attached is not None and set(found) != set(attached):
        recipe = attrs.evolve(recipe, targets=tuple("re:" + re.escape(n) for n in found))
    return recipe


Described = tuple[str, dict[str, Any], "str | None", dict[str, Any]]


def _describe_site(name: str, site: AdapterSite, origin: Recipe, host: PluginHost) -> Described:
    """The site's recipe without kind arguments (JSON), its kind arguments, the ``overrides``
    pattern of ``origin`` they are relative to (``None``: the recipe's own), and every field
    of its kind config."""
    kind = _registered_name(host, "kind", type(site), origin.kind)
    pattern = override_for(origin, name) if kind == origin.kind else None
    given = origin.site_args(pattern) if kind == origin.kind else {}
    data: dict[str, Any] = {
        "seed": origin.seed,
        "adapter": {"kind": kind, "targets": list(origin.targets), "skills": site.skills},
    }
    for role, obj in (("splitter", site.splitter), ("sampler", site.sampler), ("router", site.router)):
        spec = origin.role(role)
        role_name = _registered_name(host, role, type(obj), spec.name)
        role_given = spec.args if role_name == spec.name else {}
        data[role] = {"name": role_name, **_args(obj.config, host.registries[role][role_name], role_given,
                                                 f"{role} {role_name!r}")}
    args = json_ready(_args(site.config, host.kinds[kind], given, f"adapter kind {kind!r}"))
    fields = {f.name: json_ready(getattr(site.config, f.name)) for f in attrs.fields(type(site.config))}
    return json.dumps(json_ready(data), sort_keys=True), args, pattern, fields


def _split_args(
    described: Sequence[Described], kind_cls: type
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]] | None:
    """The recipe's kind arguments and the ``overrides`` (only the fields in which sites
    differ from those arguments) of described sites; ``None`` when they disagree."""
    plain = [args for _, args, pattern, _ in described if pattern is None]
    if plain:
        base = plain[0]
        if any(args != base for args in plain):
            return None
    else:  # every site is under an override: the arguments they all share are the base
        first = described[0][1]
        base = {k: v for k, v in first.items() if all(d[1].get(k) == v for d in described)}
    reference = build_config(kind_cls, base, "adapter kind")
    overrides: dict[str, dict[str, Any]] = {}
    for _, _, pattern, fields in described:
        if pattern is None:
            continue
        diff = {k: v for k, v in fields.items() if json_ready(getattr(reference, k)) != v}
        if overrides.setdefault(pattern, diff) != diff:
            return None
    return base, {p: d for p, d in overrides.items() if d}


def _registered_name(host: PluginHost, role: str, cls: type, preferred: str) -> str:
    registry = host.registries[role]
    if preferred in registry and registry[preferred] is cls:
        return preferred
    for name in registry:
        if registry[name] is cls:
            return name
    raise AdapterkitError(f"{role} class {cls.__qualname__} is not registered by any plugin, "
                          "so a file cannot name it; register it in a plugin")


def _args(config: Any, cls: type, given: Mapping[str, Any], what: str) -> dict[str, Any]:
    """``given`` updated with every config field whose value differs from what ``given`` builds."""
    out = dict(given)
    reference = build_config(cls, given, what)
    for field in attrs.fields(type(config)):
        value = getattr(config, field.name)
        if value != getattr(reference, field.name):
            out[field.name] = json_ready(value)
    return out


def json_ready(value: Any) -> Any:
    """JSON-friendly copy: tuples become lists."""
    if isinstance(value, Mapping):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value
