"""``benchmarks/serving.py --quick`` runs end to end and writes well-formed results.

Structure and arithmetic only, never speed: every variant ran every round of every cell,
throughputs are tokens over median round times, the ratios are theirs, PEFT's outputs
matched ours and the served model traced without graph breaks."""

from __future__ import annotations

import math
import statistics
from typing import Any

import pytest
from benchlib import run_quick

TIMED = {"mixed", "peft", "single", "sub-batches", "bare"}


@pytest.mark.slow
def test_serving_quick(tmp_path: Any) -> None:
    printed, payload = run_quick("serving", str(tmp_path))
    args = payload["args"]
    cells = {(row["model"], row["phase"], row["r"], row["U"]) for row in payload["rows"]}
    assert cells == {(m, p, r, u) for m, phases in (("llama", ("prefill", "decode")), ("minilm", ("prefill",)))
                     for p in phases for r in args["ranks"] for u in args["adapters"]}
    for row in payload["rows"]:
        assert set(row["round_s"]) == TIMED
        seq = args["seq"] if row["model"] == "llama" else args["minilm_seq"]
        tokens = args["batch"] * (1 if row["phase"] == "decode" else seq)
        for name, times in row["round_s"].items():
            assert len(times) == args["rounds"] and all(math.isfinite(t) and t > 0 for t in times)
            assert row[f"{name}_tok_s"] == pytest.approx(tokens / statistics.median(times))
        assert row["mixed_vs_peft"] == pytest.approx(row["mixed_tok_s"] / row["peft_tok_s"])
        assert row["mixed_vs_single"] == pytest.approx(row["mixed_tok_s"] / row["single_tok_s"])
        assert row["mixed_vs_sub"] == pytest.approx(row["mixed_tok_s"] / row["sub-batches_tok_s"])
        assert row["peft_max_abs_diff"] <= 1e-4
        assert row["graph_breaks"] == 0
    assert len(payload["loadavg_before"]) == 3 and "wrote" in printed
