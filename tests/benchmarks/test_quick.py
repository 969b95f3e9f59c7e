"""The accuracy studies' ``--quick`` modes run end to end and write well-formed results.

Each study runs as users run it (``python benchmarks/<study>.py --quick``) in a
subprocess, writing into a temporary folder. The checks are about structure and
invariants, never about accuracy values: every variant of every cell is present, every
number is finite, summaries are the means of the per-seed results, and the parameter
counts follow from the adapter shapes (equal across the sparse variants; per task for
the transfer methods).
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import subprocess
import sys
from typing import Any

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_study(name: str, out: str, *extra: str) -> dict[str, Any]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", f"{name}.py"), "--quick", "--out", out, *extra],
        capture_output=True, text=True, env=env, timeout=600, cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    with open(os.path.join(out, f"{name}.png"), "rb") as f:
        png = f.read()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000
    with open(os.path.join(out, f"{name}.json")) as f:
        payload: dict[str, Any] = json.load(f)
    assert payload["study"] == name and payload["mode"] == "quick"
    assert "Few-shot transfer" in done.stdout or "Sparse adapters" in done.stdout  # the printed table
    payload["stdout"] = done.stdout
    return payload


def check_metrics(rows: list[dict[str, Any]], keys: tuple[str, ...] = ("accuracy", "macro_f1")) -> None:
    for row in rows:
        for key in keys:
            assert math.isfinite(row[key]) and 0.0 <= row[key] <= 1.0, (key, row)


def check_means(summary_row: dict[str, Any], runs: list[dict[str, Any]]) -> None:
    assert summary_row["macro_f1"] == pytest.approx(statistics.fmean(r["macro_f1"] for r in runs))
    assert summary_row["accuracy"] == pytest.approx(statistics.fmean(r["accuracy"] for r in runs))
    spread = statistics.stdev([r["macro_f1"] for r in runs]) if len(runs) > 1 else 0.0
    assert summary_row["macro_f1_std"] == pytest.approx(spread)


def check_comparisons(comparisons: list[dict[str, Any]]) -> None:
    """Each paired comparison: the mean of its per-seed differences, inside its bootstrap
    interval, and a verdict that follows from the interval."""
    assert comparisons
    for c in comparisons:
        assert c["mean_diff"] == pytest.approx(statistics.fmean(c["diffs"]))
        assert c["ci_low"] - 1e-12 <= c["mean_diff"] <= c["ci_high"] + 1e-12
        expected = "holds" if c["ci_low"] > 0 else "fails" if c["ci_high"] < 0 else "within noise"
        assert c["verdict"] == expected and c["wins"] == sum(d > 0 for d in c["diffs"])


def test_sparse_quick(tmp_path: Any) -> None:
    payload = run_study("sparse", str(tmp_path))
    seeds, lrs, budget = payload["seeds"], payload["lrs"], payload["budget"]
    results, summary = payload["results"], payload["summary"]
    check_metrics(results)
    check_metrics(summary)
    assert all(v == 0.0 for v in payload["cache_check_max_abs_diff"].values())  # the cache is the full model
    expected = {"digits": {"adapter", "mosa", "hierarchical"},
                "airline": {"adapter", "mosa", "mosa-noreg", "hierarchical", "lora", "mosa-lora"},
                "multitask": {"adapter", "mosa"},
                **{f"lowres-{k}": {"adapter", "mosa", "hierarchical"} for k in payload["shots"]}}
    final = [r for r in results if r["split"] == "test"]
    assert {(r["cell"], r["variant"]) for r in final} == {(c, v) for c, vs in expected.items() for v in vs}
    chosen = {(c["cell"], c["variant"]): c["lr"] for c in payload["chosen_lr"]}
    for (cell, variant), lr in chosen.items():  # the grid ran on the validation split, every rate
        grid = [r for r in results if (r["cell"], r["variant"], r["split"]) == (cell, variant, "val")]
        assert sorted(r["lr"] for r in grid) == sorted(lrs) and lr in lrs
        best = max(r["macro_f1"] for r in grid)
        assert next(r for r in grid if r["lr"] == lr)["macro_f1"] == best
    for cell, variants in expected.items():
        for variant in variants:
            runs = [r for r in final if (r["cell"], r["variant"]) == (cell, variant)]
            assert sorted(r["seed"] for r in runs) == sorted(seeds)
            assert {r["lr"] for r in runs} == {chosen[(cell, variant)]}
            (row,) = [r for r in summary if (r["cell"], r["variant"]) == (cell, variant)]
            check_means(row, runs)
            for r in runs:  # the official schedule: every epoch at batch 128 (or the whole set)
                assert r["steps"] == budget["epochs"] * max(1, r["n_train"] // min(budget["batch_size"], r["n_train"]))
                if not cell.startswith("lowres"):  # learning curve: merged test macro-F1 per epoch step
                    assert [e for e, _ in r["curve"]] == list(range(budget["curve_every"], budget["epochs"] + 1,
                                                                  budget["curve_every"]))
                    assert r["curve"][-1][1] == pytest.approx(r["macro_f1"])
    for cell in expected:
        runs = [r for r in final if r["cell"] == cell]
        assert all(r["merged"] for r in runs)  # scored as deployed: merged into a plain adapter
        for host in ({"adapter", "mosa", "mosa-noreg", "hierarchical"}, {"lora", "mosa-lora"}):
            sizes = {r["deployed_adapter"] for r in runs if r["variant"] in host}
            assert len(sizes) <= 1  # equal deployed size within a host
        dense = next(r for r in runs if r["variant"] == "adapter")
        assert dense["trainable_adapter"] == dense["deployed_adapter"]
        for r in runs:  # per-copy biases: N - 1 extra bias copies of the split side train, then merge away
            if r["variant"] in ("mosa", "mosa-noreg"):
                n = 2 if cell == "multitask" else 4
                split_bias = 384 if r["cell"] != "digits" else 192 + 320
                extra = (n - 1) * (split_bias + (16 if cell == "multitask" else 0))
                assert r["trainable_adapter"] - r["deployed_adapter"] == extra
    text = next(r for r in final if (r["cell"], r["variant"]) == ("airline", "adapter"))
    assert text["deployed_adapter"] == 2 * 384 * 16 + 16 + 384 + 2 * 384  # one AdaptFormer adapter, last layer
    check_comparisons(payload["comparisons"])
    check_resume(str(tmp_path), payload)


def check_resume(out: str, first: dict[str, Any]) -> None:
    """Every finished run is in the journal; a process lost after some of them, resumed, trains
    only the rest and ends with the same results (runs are deterministic)."""
    journal = os.path.join(out, "sparse.partial.jsonl")
    with open(journal) as f:
        lines = f.read().splitlines()
    runs = [json.loads(line) for line in lines[1:] if "note" not in json.loads(line)]
    assert [(r["cell"], r["variant"], r["seed"], r["split"]) for r in runs] == \
        [(r["cell"], r["variant"], r["seed"], r["split"]) for r in first["results"]]
    with open(journal, "w") as f:  # lost during the 7th run from the end, mid-write
        f.write("\n".join(lines[:-7]) + "\n" + lines[-7][:20])
    resumed = run_study("sparse", out, "--resume")
    assert resumed["stdout"].count(", recorded)") == len(runs) - 7  # the rest trained again

    def same(r: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in r.items() if k != "train_seconds"}

    for key in ("results", "summary"):
        assert [same(r) for r in resumed[key]] == [same(r) for r in first[key]]
    with open(journal) as f:  # the torn line dropped, the retrained runs appended
        assert len(f.read().splitlines()) == len(lines)


def test_transfer_quick(tmp_path: Any) -> None:
    payload = run_study("transfer", str(tmp_path))
    methods, seeds, plan = payload["methods"], payload["seeds"], payload["plan"]
    assert set(methods) == {"shared-lora", "poly", "mhr", "mhr-z", "mhr-mu"}
    results, summary = payload["results"], payload["summary"]
    final = [r for r in results if r["split"] == "test"]
    check_metrics(results)
    check_metrics(summary)
    check_metrics(payload["pretraining"])
    assert payload["cache_check_max_abs_diff"] == 0.0
    assert len(payload["pretrain_domains"]) >= 12  # at least 12 pre-training tasks
    assert not set(plan["held_out"]) & set(payload["pretrain_domains"])
    assert all(payload["task_sizes"][t] > 0 for t in payload["pretrain_domains"])
    assert sorted(plan["ks"]) == [16, 32, 64]
    for method, lr in payload["chosen_lr"].items():  # chosen on validation tweets, never the test set
        grid = [r for r in results if r["method"] == method and r["split"] == "val"]
        assert sorted({r["lr"] for r in grid}) == sorted(plan["lrs"]) and lr in plan["lrs"]
        assert {r["lr"] for r in final if r["method"] == method} == {lr}
    for domain in [*plan["held_out"], "mean"]:
        for k in plan["ks"]:
            for method in methods:
                runs = [r for r in final if r["k"] == k and r["method"] == method
                        and domain in ("mean", r["domain"])]
                assert sorted({r["seed"] for r in runs}) == sorted(seeds) and runs
                (row,) = [r for r in summary if (r["domain"], r["k"], r["method"]) == (domain, k, method)]
                check_means(row, runs)
    for r in final:
        assert r["n_train"] == 3 * r["k"]  # balanced few-shot: k per class
        assert r["n_test"] % 3 == 0  # balanced test set
    # Per-task parameters follow from the shapes: MiniLM (d = 384), query+value of the last 2 layers.
    lora = payload["lora"]
    sites, d, r, skills, heads = 4, 384, lora["r"], lora["skills"], lora["heads"]
    head = d * 3 + 3
    one_lora = sites * 2 * d * r
    expected = {
        "shared-lora": one_lora + head,
        "poly": skills * one_lora + sites * skills + head,  # skills + one routing row per site
        "mhr": skills * one_lora + sites * heads * skills + head,
        "mhr-z": sites * heads * skills,  # the routing row alone
        "mhr-mu": one_lora + head,  # the averaged skills: one plain LoRA
    }
    for res in results:
        assert res["trainable_per_task"] == expected[res["method"]], res
    check_comparisons(payload["comparisons"])


# --- the committed full runs and the page that shows them ------------------------------

DOCS = os.path.join(ROOT, "docs")


def committed(name: str) -> dict[str, Any]:
    with open(os.path.join(DOCS, "benchmarks", f"{name}.json")) as f:
        return json.load(f)  # type: ignore[no-any-return]


def tables(page: str) -> list[list[list[str]]]:
    """The Markdown tables of a page: rows of stripped cells (bold marks removed), header first."""
    found: list[list[list[str]]] = []
    current: list[list[str]] = []
    with open(os.path.join(DOCS, page), encoding="utf-8") as f:
        for line in [*f.read().splitlines(), ""]:
            if line.startswith("|"):
                cells = [c.strip().replace("**", "") for c in line.strip().strip("|").split("|")]
                if not set("".join(cells)) <= set("-: "):
                    current.append(cells)
            elif current:
                found.append(current)
                current = []
    return found


def cell(row: dict[str, Any]) -> str:
    return f"{row['macro_f1']:.3f} ± {row['macro_f1_std']:.3f}"


SPARSE_COLUMNS = {"adapter": "adapter", "MoSA": "mosa", "MoSA, no reg.": "mosa-noreg",
                  "hierarchical": "hierarchical", "LoRA": "lora", "MoSA-LoRA": "mosa-lora"}
TRANSFER_METHODS = ["shared-lora", "poly", "mhr", "mhr-z", "mhr-mu"]


def test_committed_results_are_full_runs_with_every_variant() -> None:
    sparse, transfer = committed("sparse"), committed("transfer")
    for payload in (sparse, transfer):
        assert payload["mode"] == "full" and payload["seeds"] == [0, 1, 2, 3, 4]
        check_comparisons(payload["comparisons"])
    check_metrics(transfer["results"])
    # the digits grid's validation runs, taken from an earlier run's log, carry macro-F1 only (docs/benchmarks.md)
    check_metrics(sparse["results"], ("macro_f1",))
    check_metrics([r for r in sparse["results"] if r.get("source") != "log"])
    final = [r for r in sparse["results"] if r["split"] == "test"]
    assert all(r.get("source") != "log" for r in final)  # every reported run trained in full, accuracy and all
    assert all(r["curve"] for r in final if not r["cell"].startswith("lowres"))  # with its learning curve
    grids = {(r["cell"], r["variant"]) for r in sparse["results"] if r["split"] == "val"}
    assert {(r["cell"], r["variant"]) for r in final} <= grids  # every rate chosen on validation data
    cells = {r["cell"] for r in final}
    assert {"digits", "airline", "multitask"} <= cells and {f"lowres-{k}" for k in (1, 2, 4, 8, 16)} <= cells
    for r in final:  # the official schedule: 100 epochs at batch 128 (or the whole set when smaller)
        assert r["steps"] == 100 * max(1, r["n_train"] // min(128, r["n_train"]))
    assert {r["n_train"] for r in final if r["cell"] in ("digits", "airline", "multitask")} == {1000}
    assert len([r for r in transfer["results"] if r["split"] == "test"]) == 2 * 3 * 5 * 5
    assert len(transfer["pretrain_domains"]) >= 12


def test_benchmarks_page_shows_the_committed_numbers() -> None:
    sparse = {(r["cell"], r["variant"]): r for r in committed("sparse")["summary"]}
    sparse_claims = {(c["claim"], c["cell"]): c for c in committed("sparse")["comparisons"]}
    transfer = {(r["domain"], r["k"], r["method"]): r for r in committed("transfer")["summary"]}
    transfer_claims = {(c["claim"], c["k"]): c for c in committed("transfer")["comparisons"]}

    def interval(c: dict[str, Any]) -> list[str]:
        return [f"{c['mean_diff']:+.3f}", f"[{c['ci_low']:+.3f}, {c['ci_high']:+.3f}]", str(c["wins"]), c["verdict"]]

    checked = {"sparse": 0, "transfer": 0, "sparse claims": 0, "transfer claims": 0}
    for table in tables("benchmarks.md"):
        header = table[0]
        for row in table[1:]:
            if header[:3] == ["cell", "train examples", "steps"]:
                for column, value in zip(header[3:], row[3:], strict=True):
                    key = (row[0], SPARSE_COLUMNS[column])
                    assert value == (cell(sparse[key]) if key in sparse else "–"), (row, column)
                    checked["sparse"] += key in sparse
            elif header[:2] == ["held out", "k"]:
                for method, value in zip(TRANSFER_METHODS, row[2:], strict=True):
                    assert value == cell(transfer[(row[0], int(row[1]), method)]), (row, method)
                    checked["transfer"] += 1
            elif header[:2] == ["claim", "cell"]:
                assert row[2:] == interval(sparse_claims[(row[0], row[1])]), row
                checked["sparse claims"] += 1
            elif header[:2] == ["claim", "k"]:
                assert row[2:] == interval(transfer_claims[(row[0], int(row[1]))]), row
                checked["transfer claims"] += 1
    assert checked == {"sparse": len(sparse), "transfer": len(transfer), "sparse claims": len(sparse_claims),
                       "transfer claims": len(transfer_claims)}
    with open(os.path.join(DOCS, "benchmarks.md"), encoding="utf-8") as f:
        images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", f.read())
    assert images and all(os.path.exists(os.path.join(DOCS, image)) for image in images)


def test_speed_summary_on_the_page_matches_the_committed_run() -> None:
    """The speed table on the page is the committed full run's summary, row for row."""
    speed = committed("speed")
    assert speed["mode"] == "full" and not speed["failed"]
    for run in speed["runs"].values():  # the sub-results it summarises are committed beside it
        assert os.path.exists(os.path.join(DOCS, "benchmarks", run["file"]))
    expected = {(r["area"], r["measure"]): r for r in speed["summary"]}
    shown = [row for table in tables("benchmarks.md") if table[0][:3] == ["area", "measure", "ratio"]
             for row in table[1:]]
    assert len(shown) == len(expected)
    for area, measure, ratio, target, met, *_ in shown:
        row = expected[(area, measure)]
        assert ratio == f"{row['ratio']:.3f}" and target == (row["target"] or "")
        assert met == {None: "", True: "yes", False: "no"}[row["met"]]
