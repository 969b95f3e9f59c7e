"""The committed results of ``benchmarks/stream.py`` (``docs/benchmarks/stream.json``) are
consistent: every record of each file was counted and every full batch read back through
the pipeline; the summary's growth and ratios are recomputed from the stored figures and
``met`` follows from them; the 1,000,000-line file met the bound.

(``--quick`` is not run here: its three processes each load MiniLM, about 90 s on the
shared 2-core machine, more than the suite's budget for it.)
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BATCH = 32


def check(payload: dict[str, Any], sizes: list[int]) -> None:
    assert payload["study"] == "stream"
    assert [m["lines"] for m in payload["memory"]] == sizes
    for row in payload["memory"]:
        assert row["records"] == row["lines"]
        assert row["iterated_examples"] == row["lines"] // BATCH * BATCH  # one epoch, the last partial batch dropped
        assert row["train_steps"] == payload["steps"]
        assert row["peak_rss_mb"] == max(row["train_peak_rss_mb"], row["iterate_peak_rss_mb"])
        assert 0 < row["baseline_rss_mb"] <= row["train_peak_rss_mb"] and row["worker_peak_rss_mb"] > 0
    bound, memory = payload["bound"], payload["memory"]
    assert bound["largest_peak_mb"] == memory[-1]["peak_rss_mb"]
    assert math.isclose(bound["growth_measured_mb"], memory[-1]["peak_rss_mb"] - memory[0]["peak_rss_mb"])
    met = (bound["largest_peak_mb"] <= bound["peak_rss_mb"] and bound["growth_measured_mb"] <= bound["growth_mb"]
           and bound["iterate_growth_mb"] <= bound["growth_mb"])
    assert bound["met"] is met
    throughput = payload["throughput"]
    assert [p["workers"] for p in throughput["pipeline"]] == [0, 1, 2] and throughput["default_workers"] == 1
    for row in throughput["pipeline"]:
        assert math.isclose(row["examples_per_s"], row["examples"] / row["seconds"])
    default, model = throughput["pipeline"][1], throughput["model_examples_per_s"]
    assert math.isclose(model, BATCH / throughput["model_step_s"])
    assert math.isclose(throughput["pipeline_over_model"], default["examples_per_s"] / model)
    assert throughput["bottleneck"] == ("model" if throughput["pipeline_over_model"] > 1 else "data")
    loop = throughput["loop"]
    assert loop["streamed"]["steps"] == loop["pre-encoded"]["steps"] == payload["steps"]


def test_committed_stream_results() -> None:
    with open(os.path.join(ROOT, "docs", "benchmarks", "stream.json")) as f:
        payload = json.load(f)
    assert payload["mode"] == "full"
    check(payload, [100_000, 1_000_000])
    assert payload["bound"]["met"]
