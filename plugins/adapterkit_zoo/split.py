"""Deterministic, stratified train/test splits shared by the bundled datasets."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np


def fraction(instance: Any, attribute: Any, value: Any) -> None:
    if not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
        raise ValueError(f"{attribute.name} must be in (0, 1), got {value!r}")


def stratified_split(keys: Sequence[Hashable], test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of train and test: within every key (label, or task and label) a seeded
    permutation puts ``round(n * test_fraction)`` items in test. Both lists are sorted."""
    groups: dict[Hashable, list[int]] = defaultdict(list)
    for i, key in enumerate(keys):
        groups[key].append(i)
    rng = np.random.default_rng(seed)
    train: list[int] = []
    test: list[int] = []
    for key in sorted(groups, key=repr):
        members = np.asarray(groups[key])[rng.permutation(len(groups[key]))]
        n_test = int(round(len(members) * test_fraction))
        test += members[:n_test].tolist()
        train += members[n_test:].tolist()
    return sorted(train), sorted(test)
