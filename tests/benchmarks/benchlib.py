"""Running a benchmark's ``--quick`` mode as users run it, in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_quick(name: str, out: str) -> tuple[str, dict[str, Any]]:
    """``python benchmarks/<name>.py --quick --out OUT``: what it printed and its results (``OUT/<name>.json``)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", f"{name}.py"), "--quick", "--out", out],
                          capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    with open(os.path.join(out, f"{name}.json")) as f:
        return done.stdout, json.load(f)
