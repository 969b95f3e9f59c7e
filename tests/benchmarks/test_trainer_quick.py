"""``benchmarks/trainer.py --quick`` runs end to end and writes well-formed results.

Structure and arithmetic only, never speed: both loops ran every round, each step time
is the median round time over the steps per round, and the ratio is theirs."""

from __future__ import annotations

import math
import statistics
from typing import Any

import pytest
from benchlib import run_quick


@pytest.mark.slow
def test_trainer_quick(tmp_path: Any) -> None:
    printed, payload = run_quick("trainer", str(tmp_path))
    steps, rounds = payload["args"]["steps"], payload["args"]["rounds"]
    assert set(payload["round_s"]) == {"transformers.Trainer", "adapterkit loop"}
    for name, times in payload["round_s"].items():
        assert len(times) == rounds and all(math.isfinite(t) and t > 0 for t in times)
        assert payload["step_s"][name] == pytest.approx(statistics.median(times) / steps)
    step = payload["step_s"]
    ratio = payload["ratio_trainer_vs_adapterkit"]
    assert ratio == pytest.approx(step["transformers.Trainer"] / step["adapterkit loop"])
    assert f"Trainer / adapterkit loop: {ratio:.3f}" in printed
