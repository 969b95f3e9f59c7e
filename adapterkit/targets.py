"""Which modules a recipe adapts: PEFT-like target patterns and per-site overrides."""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

from torch import nn

from .errors import AttachError
from .recipe import Recipe
from .site import AdapterSite


def match_target(name: str, pattern: str) -> bool:
    """PEFT-like target matching.

    ``re:<regex>`` full-matches the module name; a pattern with ``*`` or ``?`` is a glob
    over the full name where ``*`` stays within one dotted component and ``**`` crosses
    them (``encoder.layer.*.output``); otherwise it matches the name or its dotted
    suffix (``query`` matches ``encoder.layer.0.attention.self.query``).
    """
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    if "*" in pattern or "?" in pattern:
        return re.fullmatch(_glob_regex(pattern), name) is not None
    return name == pattern or name.endswith("." + pattern)


@functools.lru_cache(maxsize=256)
def _glob_regex(pattern: str) -> str:
    parts = re.split(r"(\*\*|\*|\?)", pattern)
    table = {"**": ".*", "*": "[^.]*", "?": "[^.]"}
    return "".join(table.get(part, re.escape(part)) for part in parts)


def find_sites(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """Names of modules matching any target, outermost only (no nested sites)."""
    found: list[str] = []
    for name, module in model.named_modules():
        if not name or isinstance(module, AdapterSite):
            continue
        if any(name.startswith(f + ".") for f in found):
            continue
        if any(match_target(name, p) for p in targets):
            found.append(name)
    return found


def override_for(recipe: Recipe, name: str) -> str | None:
    """The ``overrides`` pattern that matches site ``name`` (``None``: none); two are an error."""
    matches = [p for p in recipe.overrides if match_target(name, p)]
    if len(matches) > 1:
        raise AttachError(name, f"overrides {matches} all match it; at most one may")
    return matches[0] if matches else None
