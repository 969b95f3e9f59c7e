"""Recipes: a method as a composition of an adapter kind, target sites and four roles.

A recipe is a frozen attrs object, loadable from a dict or TOML::

    seed = 0
    [adapter]
    kind = "lora"            # adapter kind
    targets = ["query", "value"]
    skills = 1               # K, the size of the skill inventory
    r = 8                    # ...any other key is an argument of the kind
    modules_to_save = ["classifier"]   # base modules trained fully and saved with the adapter
    [adapter.overrides]      # per-site kind arguments (PEFT's rank_pattern/alpha_pattern)
    value = { r = 16, alpha = 32 }
    [splitter]
    name = "mosa"
    n_cells = 4              # ...any other key is an argument of the role

Unknown keys are errors naming the key, both here and in role/kind arguments (which
the plugin's ``Config`` validates when the recipe is resolved).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import tomllib

from .errors import RecipeError
from .validators import at_most, keyed, non_negative, positive

ROLES = ("splitter", "sampler", "router", "merger")
MAX_SKILLS = 65_536  # K: far beyond any method's inventory, small enough to refuse absurd files early
DEFAULT_ROLE_NAMES = {"splitter": "dense", "sampler": "all", "router": "none", "merger": "identity"}


def _frozen_mapping(value: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return dict(value or {})


@attrs.frozen
class RoleSpec:
    """A role by plugin name plus the arguments for its ``Config``."""

    name: str
    args: Mapping[str, Any] = attrs.field(factory=dict, converter=_frozen_mapping)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **self.args}


def _targets(value: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


_positive = keyed(positive, RecipeError, "recipe key")


def _role(default: str) -> Any:
    return attrs.field(factory=lambda: RoleSpec(default))


def _names(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, (list, tuple)):
        raise RecipeError("recipe key 'adapter.modules_to_save' must be a list of module name patterns, "
                          f"got {type(value).__name__}")
    return tuple(value)


def _overrides(value: Mapping[str, Mapping[str, Any]] | None) -> Mapping[str, Mapping[str, Any]]:
    if not isinstance(value, Mapping) or not all(isinstance(v, Mapping) for v in value.values()):
        raise RecipeError("recipe key 'adapter.overrides' must map site patterns to tables of kind arguments")
    return {k: dict(v) for k, v in value.items()}


RESERVED_ARGS = ("kind", "targets", "skills", "modules_to_save", "overrides")


@attrs.frozen
class Recipe:
    """Adapter kind + arguments, target module patterns, and the four roles.

    ``overrides`` maps a site pattern (matched like ``targets``) to kind arguments that
    replace ``kind_args`` at the sites it matches (at most one pattern per site);
    ``modules_to_save`` names base modules (matched like ``targets``) that train fully and
    are saved with the adapter (heads, LayerNorms).
    """

    kind: str
    targets: tuple[str, ...] = attrs.field(converter=_targets)
    kind_args: Mapping[str, Any] = attrs.field(factory=dict, converter=_frozen_mapping)
    overrides: Mapping[str, Mapping[str, Any]] = attrs.field(factory=dict, converter=_overrides)
    modules_to_save: tuple[str, ...] = attrs.field(default=(), converter=_names)
    skills: int = attrs.field(default=1, validator=keyed(at_most(MAX_SKILLS), RecipeError, "recipe key"))
    splitter: RoleSpec = _role("dense")
    sampler: RoleSpec = _role("all")
    router: RoleSpec = _role("none")
    merger: RoleSpec = _role("identity")
    seed: int = attrs.field(default=0, validator=keyed(at_most(2**63 - 1, non_negative), RecipeError, "recipe key"))

    @targets.validator
    def _check_targets(self, attribute: attrs.Attribute, value: tuple[str, ...]) -> None:  # type: ignore[type-arg]
        if not value or not all(isinstance(t, str) and t for t in value):
            raise RecipeError("recipe key 'adapter.targets' must be a non-empty list of module name patterns")

    @modules_to_save.validator
    def _check_saved(self, attribute: attrs.Attribute, value: tuple[str, ...]) -> None:  # type: ignore[type-arg]
        if not all(isinstance(t, str) and t for t in value):
            raise RecipeError("recipe key 'adapter.modules_to_save' must be a list of module name patterns")

    @overrides.validator
    def _check_overrides(self, attribute: attrs.Attribute, value: Mapping[str, Any]) -> None:  # type: ignore[type-arg]
        for pattern, args in value.items():
            if not isinstance(pattern, str) or not pattern:
                raise RecipeError("recipe key 'adapter.overrides' needs non-empty site patterns as keys")
            bad = sorted(k for k in args if not isinstance(k, str) or k in RESERVED_ARGS)
            if bad:
                raise RecipeError(f"recipe key 'adapter.overrides.{pattern}' may set kind arguments only, "
                                  f"not {bad[0]!r}")

    def site_args(self, pattern: str | None) -> dict[str, Any]:
        """The kind arguments at a site matched by override ``pattern`` (``None``: no override)."""
        return {**self.kind_args, **(self.overrides[pattern] if pattern is not None else {})}

    def role(self, role: str) -> RoleSpec:
        spec: RoleSpec = getattr(self, role)
        return spec

    def to_dict(self) -> dict[str, Any]:
        """The plain-dict form that :meth:`from_dict` reads back (JSON/TOML friendly)."""
        adapter = {"kind": self.kind, "targets": list(self.targets), "skills": self.skills, **self.kind_args}
        if self.overrides:  # (absent when unused: older files and digests stay as they were)
            adapter["overrides"] = {k: dict(v) for k, v in self.overrides.items()}
        if self.modules_to_save:
            adapter["modules_to_save"] = list(self.modules_to_save)
        out: dict[str, Any] = {"seed": self.seed, "adapter": adapter}
        for role in ROLES:
            out[role] = self.role(role).to_dict()
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Recipe:
        data = dict(data)
        known = {"seed", "adapter", *ROLES}
        for key in data:
            if key not in known:
                raise RecipeError(f"unknown recipe key {key!r}; valid keys: {', '.join(sorted(known))}")
        adapter = dict(_table(data, "adapter", required=True))
        try:
            kind = adapter.pop("kind")
            targets = adapter.pop("targets")
        except KeyError as missing:
            raise RecipeError(f"recipe table [adapter] needs key {missing.args[0]!r}") from None
        skills = adapter.pop("skills", 1)
        overrides = adapter.pop("overrides", None) or {}
        saved = adapter.pop("modules_to_save", None) or ()
        roles = {}
        for role in ROLES:
            table = dict(_table(data, role, required=False))
            name = table.pop("name", DEFAULT_ROLE_NAMES[role])
            roles[role] = RoleSpec(name, table)
        seed = data.get("seed", 0)
        if not isinstance(seed, int):
            raise RecipeError(f"recipe key 'seed' must be an integer, got {seed!r}")
        return cls(kind=kind, targets=targets, kind_args=adapter, overrides=overrides, modules_to_save=saved,
                   skills=skills, seed=seed, **roles)

    @classmethod
    def from_toml(cls, text: str) -> Recipe:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise RecipeError(f"malformed recipe TOML: {exc}") from None
        return cls.from_dict(data)


def _table(data: Mapping[str, Any], key: str, *, required: bool) -> Mapping[str, Any]:
    value = data.get(key)
    if value is None:
        if required:
            raise RecipeError(f"recipe needs a table [{key}]")
        return {}
    if not isinstance(value, Mapping):
        raise RecipeError(f"recipe key {key!r} must be a table, got {type(value).__name__}")
    return value


def build_config(cls: type, args: Mapping[str, Any], what: str) -> Any:
    """Instantiate ``cls.Config`` from recipe arguments with one-line errors."""
    config_cls = cls.Config  # type: ignore[attr-defined]
    fields = {f.name for f in attrs.fields(config_cls)}
    for key in args:
        if key not in fields:
            valid = ", ".join(sorted(fields)) or "none"
            raise RecipeError(f"unknown key {key!r} for {what}; valid keys: {valid}")
    try:
        return config_cls(**args)
    except RecipeError:
        raise
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"bad arguments for {what}: {exc}") from None
