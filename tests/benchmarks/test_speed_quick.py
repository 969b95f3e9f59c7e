"""``benchmarks/speed.py --quick``: the four speed benchmarks run, and the summary is theirs.

One subprocess runs the study as users run it, writing into a temporary folder. The
checks are about structure and provenance, never about speed: every ratio is finite and
positive, every summary ratio equals the one recomputed here from the sub-results' own
JSON files (stored seconds and bytes), ``met`` follows from the target, and ``--from``
on the same folder reproduces the same summary without running anything.
"""

from __future__ import annotations

import json
import math
import operator
import os
import subprocess
import sys
from typing import Any

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "benchmarks", "speed.py")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
AREAS = ["overhead", "mosa", "poly", "storage"]
OPS = {"<=": operator.le, "<": operator.lt, ">=": operator.ge}


def speed(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, env=env, timeout=600,
                          cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def load(folder: str, name: str) -> dict[str, Any]:
    with open(os.path.join(folder, name)) as f:
        return json.load(f)  # type: ignore[no-any-return]


def check_png(folder: str) -> None:
    with open(os.path.join(folder, "speed.png"), "rb") as f:
        png = f.read()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000


def expected_ratios(sub: dict[str, dict[str, Any]]) -> dict[tuple[str, str], float]:
    """Every summary ratio, recomputed from the sub-results' stored seconds and bytes."""
    out: dict[tuple[str, str], float] = {}
    med = sub["overhead"]["median_s"]
    out["overhead", "LoRA step, adapterkit / hand-written"] = med["lora/adapterkit"] / med["lora/hand-written"]
    out["overhead", "LoRA step, PEFT / hand-written"] = med["lora/peft"] / med["lora/hand-written"]
    out["overhead", "bottleneck step, adapterkit / hand-written"] = (med["bottleneck/adapterkit"]
                                                                     / med["bottleneck/hand-written"])
    mosa = sub["mosa"]
    mem = mosa["memory_bytes"]
    step = {r["variant"]: r["step_s"] for r in mosa["training"]}
    for v in ("mosa/share=down", "mosa/share=none", "n-copies/share=down", "n-copies/share=none"):
        out["mosa", f"memory vs dense, {v}"] = mem[v]["total"] / mem["dense"]["total"]
        out["mosa", f"step time vs dense, {v}"] = step[v] / step["dense"]
    latency = {r["variant"]: r["latency_s"] for r in mosa["inference"]}
    for share in ("share=down", "share=none"):
        out["mosa", f"merged inference latency vs dense, {share}"] = latency[f"mosa/merged {share}"] / latency["dense"]
    poly = sub["poly"]
    def vs_floor(r: dict[str, Any]) -> float:  # single-task cells: one id for the batch on both sides
        return float(r["ours one id s" if r["batch"] == "single" else "ours s"] / r["floor s"])

    worst = max(poly["eager"], key=vs_floor)
    for r in poly["eager"]:
        cell = f"{r['model']} {r['mode']} {r['batch']}"
        out["poly", f"eager ours/floor, {cell}"] = vs_floor(r)
        out["poly", f"eager ours/PEFT, {cell}"] = r["ours s"] / r["peft s"]
    out["poly", f"eager ours/floor, worst cell ({worst['model']} {worst['mode']} {worst['batch']})"] = vs_floor(worst)
    for c in poly["compiled"]:
        for mode in ("train", "eval"):
            out["poly", f"compiled {mode} ours/PEFT, {c['model']}"] = c[f"{mode} ours s"] / c[f"{mode} peft s"]
    for f in poly["folded"]:
        out["poly", f"collapsed+folded/bare, {f['model']}"] = f["folded s"] / f["bare s"]
    grid = {(g["H"], g["K"]): g for g in poly["growth"]}
    out["poly", "step-time growth H1K4 -> H64K4, ours"] = grid[64, 4]["ours s"] / grid[1, 4]["ours s"]
    out["poly", "step-time growth H1K4 -> H1K32, ours"] = grid[1, 32]["ours s"] / grid[1, 4]["ours s"]
    for r in sub["storage"]["rows"]:
        if r["op"] in ("save", "load"):
            raw = "raw write" if r["op"] == "save" else "raw read"
            out["storage", f"{r['op']} vs {raw}, {r['backend']} {r['size_MB']:g} MB"] = r["raw_s"] / r["ours_s"]
    return out


def test_speed_quick(tmp_path: Any) -> None:
    out = str(tmp_path / "run")
    done = speed("--quick", "--out", out, "--markdown")
    check_png(out)
    payload = load(out, "speed.json")
    assert payload["study"] == "speed" and payload["mode"] == "quick" and payload["failed"] == []
    assert payload["environment"]["threads"] == 1 and "torch" in payload["environment"]
    assert list(payload["runs"]) == AREAS
    sub = {}
    for name, run in payload["runs"].items():
        assert "--quick" in run["command"] and out in run["command"] and run["wall_s"] > 0
        assert run["args"]["quick"] is True and run["environment"]["cpu_count"]
        assert run["file"] == ("mosa-quick.json" if name == "mosa" else f"{name}.json")
        sub[name] = load(out, run["file"])
        assert f"=== {name}: done in" in done.stdout  # each run announced with its wall time

    rows = payload["summary"]
    assert all(set(r) == {"area", "measure", "ratio", "target", "met", "source", "note"} for r in rows)
    assert [r["area"] for r in rows] == sorted((r["area"] for r in rows), key=AREAS.index)
    expected = expected_ratios(sub)
    keys = [(r["area"], r["measure"]) for r in rows]
    assert len(keys) == len(set(keys)) and set(keys) == set(expected)  # every claim once, nothing else
    for r in rows:
        assert math.isfinite(r["ratio"]) and r["ratio"] > 0, r
        assert r["ratio"] == pytest.approx(expected[r["area"], r["measure"]], rel=1e-12), r
        assert r["source"].startswith(payload["runs"][r["area"]]["file"] + " "), r
        assert (r["met"] is None) == (r["target"] is None), r
        if r["target"] and not r["measure"].startswith("step-time growth"):
            op, bound = r["target"].split()
            assert r["met"] == OPS[op](r["ratio"], float(bound)), r
        assert r["measure"] in done.stdout and f"| {r['area']} | {r['measure']} | {r['ratio']:.3f} |" in done.stdout
    grid = {(g["H"], g["K"]): g for g in sub["poly"]["growth"]}
    for r in rows:
        if r["measure"].startswith("step-time growth"):  # target: no worse than PEFT's growth
            end = (64, 4) if "H64" in r["measure"] else (1, 32)
            assert r["met"] == (r["ratio"] <= grid[end]["peft s"] / grid[1, 4]["peft s"])
    targets = {r["measure"]: r["target"] for r in rows}
    assert targets["LoRA step, adapterkit / hand-written"] == "<= 1.05"
    assert targets["LoRA step, PEFT / hand-written"] is None  # PEFT's overhead: a reference, not our claim
    assert targets["memory vs dense, mosa/share=down"] == "<= 1.25"
    assert targets["memory vs dense, mosa/share=none"] == "<= 1.5"
    assert targets["merged inference latency vs dense, share=down"] == "<= 1.01"
    for measure, target in targets.items():
        for prefix, want in (("eager ours/floor", "<= 1.05"), ("collapsed+folded", "<= 1.01"), ("save vs", ">= 0.8")):
            assert not measure.startswith(prefix) or target == want, (measure, target)
    assert sub["poly"]["compiled"] == []  # --quick does not compile
    (free,) = [r for r in rows if r["area"] == "storage" and r["measure"].startswith("load vs raw read, memory")]
    assert free["target"] is None and "no copy" in free["note"]

    again = str(tmp_path / "again")
    speed("--from", out, "--out", again)
    check_png(again)
    replayed = load(again, "speed.json")
    assert replayed["summary"] == rows and replayed["runs"] == payload["runs"]
    assert replayed["mode"] == "quick" and replayed["environment"]["threads"] == 1
