"""The attrs validators of every config in adapterkit: recipes, plugin configs, workflow configs.

Each raises :class:`Invalid` (a ``ValueError``) whose message reads ``r must be a positive
integer, got 0``; :func:`keyed` re-raises it as another error type naming the key the way
that config's users write it (``config key 'r' ...``, ``recipe key 'skills' ...``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

Validator = Callable[[Any, Any, Any], None]


class Invalid(ValueError):
    """A config value out of its declared type or bounds."""

    def __init__(self, name: str, requirement: str, value: Any) -> None:
        self.name, self.requirement, self.value = name, requirement, value
        super().__init__(f"{name} must be {requirement}, got {value!r}")


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def positive(instance: Any, attribute: Any, value: Any) -> None:
    if not (_integer(value) and value >= 1):
        raise Invalid(attribute.name, "a positive integer", value)


def non_negative(instance: Any, attribute: Any, value: Any) -> None:
    if not (_integer(value) and value >= 0):
        raise Invalid(attribute.name, "a non-negative integer", value)


def positive_number(instance: Any, attribute: Any, value: Any) -> None:
    if not (_number(value) and value > 0):
        raise Invalid(attribute.name, "a positive number", value)


def non_negative_number(instance: Any, attribute: Any, value: Any) -> None:
    if not (_number(value) and value >= 0):
        raise Invalid(attribute.name, "a non-negative number", value)


def probability(instance: Any, attribute: Any, value: Any) -> None:
    if not (_number(value) and 0.0 <= value < 1.0):
        raise Invalid(attribute.name, "in [0, 1)", value)


def non_empty_str(instance: Any, attribute: Any, value: Any) -> None:
    if not (isinstance(value, str) and value):
        raise Invalid(attribute.name, "a non-empty string", value)


def one_of(*choices: Any) -> Validator:
    def check(instance: Any, attribute: Any, value: Any) -> None:
        if value not in choices:
            raise Invalid(attribute.name, f"one of {', '.join(map(repr, choices))}", value)

    return check


def at_most(limit: int, check: Validator = positive) -> Validator:
    """``check``, then an upper bound: sizes from files and configs stay sane."""

    def bounded(instance: Any, attribute: Any, value: Any) -> None:
        check(instance, attribute, value)
        if value > limit:
            raise Invalid(attribute.name, f"at most {limit:,}", value)

    return bounded


optional = attrs.validators.optional


def keyed(check: Validator, error: Callable[[str], Exception], what: str) -> Validator:
    """``check`` with its :class:`Invalid` re-raised as ``error("<what> 'name' must be ...")``."""

    def validate(instance: Any, attribute: Any, value: Any) -> None:
        try:
            check(instance, attribute, value)
        except Invalid as exc:
            raise error(f"{what} {exc.name!r} must be {exc.requirement}, got {exc.value!r}") from None

    return validate
