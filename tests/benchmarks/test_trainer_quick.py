"""``benchmarks/trainer.py --quick`` runs end to end and writes well-formed results.

Structure and arithmetic only, never speed: both loops ran every round, each step time
is the median round time over the steps per round, and the ratio is theirs."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from typing import Any

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_trainer_quick(tmp_path: Any) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "trainer.py"), "--quick", "--out",
                           str(tmp_path)], capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    with open(os.path.join(tmp_path, "trainer.json")) as f:
        payload = json.load(f)
    steps, rounds = payload["args"]["steps"], payload["args"]["rounds"]
    assert set(payload["round_s"]) == {"transformers.Trainer", "adapterkit loop"}
    for name, times in payload["round_s"].items():
        assert len(times) == rounds and all(math.isfinite(t) and t > 0 for t in times)
        assert payload["step_s"][name] == pytest.approx(statistics.median(times) / steps)
    step = payload["step_s"]
    ratio = payload["ratio_trainer_vs_adapterkit"]
    assert ratio == pytest.approx(step["transformers.Trainer"] / step["adapterkit loop"])
    assert f"Trainer / adapterkit loop: {ratio:.3f}" in done.stdout
