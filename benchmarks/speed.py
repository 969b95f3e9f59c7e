"""Study 3, speed and memory in one place: runs the four speed benchmarks and summarises their ratios.

Runs ``overhead.py``, ``mosa.py``, ``poly.py`` and ``storage.py`` one after the other
(subprocesses, output streamed, each writing its JSON into ``--out``), then reads those
JSONs back and reduces them to one row per claim: ``{area, measure, ratio, target, met,
source, note}``. Ratios are recomputed from the stored seconds and bytes; ``source``
names the file and keys they come from; ``met`` is null where there is no target.

* **overhead**: training step of MiniLM-L6 (fwd + bwd + AdamW) with adapterkit's LoRA
  and bottleneck adapter over the same adapter written by hand in plain torch (target
  <= 1.05); PEFT's LoRA over the hand-written one is shown for reference (no target).
* **mosa**: adapter memory (parameters, gradients, AdamW state, buffers) of MoSA per
  share mode over the dense adapter (share=down <= 1.25, share=none <= 1.5) and of the
  official code's N-copies layout (reference, no target); MoSA's training step over the
  dense adapter's (<= 1.05); latency of the merged MoSA model over the dense adapter's
  (<= 1.01: a merged model holds exactly the dense tensors, so any gap is noise).
* **poly**: eager Poly/MHR training step and eval latency over the hand-written floor,
  per cell (model, heads, train/eval, mixed/single-task batch; in single-task cells both
  get one id for the batch) and the worst cell (<= 1.05); ours over PEFT Poly per cell,
  both given one id per example (no target); compiled ours over compiled PEFT
  (training step < 1, eval for reference; full mode only); a collapsed and folded task
  over the bare model (<= 1.01; minima of rounds, with an A/A control in the note);
  step-time growth from H=1 to H=64 heads and K=4 to K=32 skills, ours against PEFT's
  growth (target: no worse than PEFT).
* **storage**: raw fsspec time over ``adapterkit.save`` / ``adapterkit.load`` per backend
  and size (higher is better, >= 0.8). On ``memory://`` a raw read returns the stored
  bytes object itself, no copy: that load row has no target, only a note.

Time ratios of ``--quick`` runs (3 rounds on tiny batches) are noise; memory ratios hold.
The full run uses every script's defaults (Poly compiled too; ``--threads`` passed to all
but storage): by the step times measured here (MiniLM, 32x64 tokens, one thread: 1.5 s
per training step), about 30-35 minutes on an idle 2-core machine, Poly two thirds of
it; two to three times that on a busy one.

Usage: ``python benchmarks/speed.py [--quick] [--threads 1] [--only overhead,mosa,poly,storage]
[--out DIR] [--from DIR] [--markdown]``; writes ``speed.json`` and ``speed.png`` (default
folder ``benchmarks/results``, ``benchmarks/results/quick`` with ``--quick``; with
``--from DIR``, DIR unless ``--out`` is given).
"""

from __future__ import annotations

import argparse
import json
import operator
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(__file__))
from common import RESULTS_DIR, environment, print_table, save_figure, write_json  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
AREAS = ("overhead", "mosa", "poly", "storage")
TITLES = {
    "overhead": "overhead: training-step time vs hand-written (lower is better)",
    "mosa": "MoSA: memory, step time and merged latency vs the dense adapter (lower is better)",
    "poly": "Poly/MHR: time vs floor, PEFT, bare model; step-time growth (lower is better)",
    "storage": "storage: raw fsspec time / adapterkit time (higher is better)",
}
OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le, "<": operator.lt, ">=": operator.ge, ">": operator.gt,
}
Row = dict[str, Any]


def row(area: str, measure: str, ratio: float, target: tuple[str, float] | None, source: str,
        note: str | None = None, target_text: str | None = None) -> Row:
    """A summary row; ``target`` is (operator, bound), ``met`` follows from it (null without one)."""
    met = None if target is None else OPS[target[0]](ratio, target[1])
    text = None if target is None else target_text or f"{target[0]} {target[1]:g}"
    return {"area": area, "measure": measure, "ratio": ratio, "target": text, "met": met, "source": source,
            "note": note}


def parse_target(text: str) -> tuple[str, float]:
    """``"<= 1.05"`` or ``"<= 1.0123 (PEFT's growth)"`` -> ("<=", 1.05)."""
    op, bound = text.split()[:2]
    return op, float(bound)


# --- the four areas ---------------------------------------------------------------------


def overhead_rows(p: dict[str, Any], file: str) -> list[Row]:
    med = p["median_s"]
    out = []
    for kind, label in (("lora", "LoRA"), ("bottleneck", "bottleneck")):
        floor = f"{kind}/hand-written"
        out.append(row("overhead", f"{label} step, adapterkit / hand-written", med[f"{kind}/adapterkit"] / med[floor],
                       ("<=", 1.05), f"{file} median_s[{kind}/adapterkit] / median_s[{floor}]"))
        if kind == "lora":
            out.append(row("overhead", "LoRA step, PEFT / hand-written", med["lora/peft"] / med[floor], None,
                           f"{file} median_s[lora/peft] / median_s[{floor}]", "reference: PEFT's own overhead"))
    return out


def mosa_rows(p: dict[str, Any], file: str) -> list[Row]:
    mem, quick = p["memory_bytes"], p["args"].get("quick", False)
    step = {r["variant"]: r["step_s"] for r in p["training"]}
    latency = {r["variant"]: r["latency_s"] for r in p["inference"]}
    out = []
    for variant, target in (("mosa/share=down", ("<=", 1.25)), ("mosa/share=none", ("<=", 1.5)),
                            ("n-copies/share=down", None), ("n-copies/share=none", None)):
        note = None
        if variant.startswith("n-copies"):
            note = "official code's layout, reference" + ("; quick: 8 draws may leave copies unused" if quick else "")
        out.append(row("mosa", f"memory vs dense, {variant}", mem[variant]["total"] / mem["dense"]["total"],
                       target, f"{file} memory_bytes[{variant}].total / memory_bytes[dense].total", note))
    for variant in ("mosa/share=down", "mosa/share=none", "n-copies/share=down", "n-copies/share=none"):
        mosa = variant.startswith("mosa")
        out.append(row("mosa", f"step time vs dense, {variant}", step[variant] / step["dense"],
                       ("<=", 1.05) if mosa else None,
                       f"{file} training[variant={variant}].step_s / training[variant=dense].step_s",
                       None if mosa else "official code's layout, reference"))
    same = p.get("merged_same_structure_as_dense")
    for variant in ("mosa/merged share=down", "mosa/merged share=none"):
        out.append(row("mosa", f"merged inference latency vs dense, {variant.split()[-1]}",
                       latency[variant] / latency["dense"], ("<=", 1.01),
                       f"{file} inference[variant={variant}].latency_s / inference[variant=dense].latency_s",
                       "same tensors and ops as the dense adapter" if same else None))
    return out


def poly_rows(p: dict[str, Any], file: str) -> list[Row]:
    out = []
    cells = [(f"{r['model']} {r['mode']} {r['batch']}", r) for r in p["eager"]]

    def key(r: dict[str, Any]) -> str:
        return f"eager[model={r['model']},mode={r['mode']},batch={r['batch']}]"

    def vs_floor(r: dict[str, Any]) -> tuple[float, str]:
        # single-task batches: the floor runs one id for the batch, so ours does too
        ours = "ours one id s" if "ours one id s" in r else "ours s"
        return r[ours] / r["floor s"], f"{ours} / floor s"

    for cell, r in cells:
        ratio, how = vs_floor(r)
        out.append(row("poly", f"eager ours/floor, {cell}", ratio, ("<=", 1.05), f"{file} {key(r)}: {how}"))
    if cells:
        cell, r = max(cells, key=lambda c: vs_floor(c[1])[0])
        out.append(row("poly", f"eager ours/floor, worst cell ({cell})", vs_floor(r)[0], ("<=", 1.05),
                       f"{file} max over eager[*]: {vs_floor(r)[1]}"))
    for cell, r in cells:
        out.append(row("poly", f"eager ours/PEFT, {cell}", r["ours s"] / r["peft s"], None,
                       f"{file} {key(r)}: ours s / peft s"))
    for c in p["compiled"]:
        breaks = f"graph breaks: ours {c['ours graph breaks']}, PEFT {c['peft graph breaks']}"
        for mode in ("train", "eval"):  # the claim is about the training step; eval is shown for reference
            out.append(row("poly", f"compiled {mode} ours/PEFT, {c['model']}",
                           c[f"{mode} ours s"] / c[f"{mode} peft s"], ("<", 1.0) if mode == "train" else None,
                           f"{file} compiled[model={c['model']}]: {mode} ours s / {mode} peft s", breaks))
    for f in p["folded"]:
        control = f.get("A/A: bare copy/bare")
        note = None if control is None else f"A/A control (bare copy/bare): {control:.3f}"
        out.append(row("poly", f"collapsed+folded/bare, {f['model']}", f["folded s"] / f["bare s"], ("<=", 1.01),
                       f"{file} folded[model={f['model']}]: folded s / bare s (minima)", note))
    grid = {(g["H"], g["K"]): g for g in p["growth"]}
    for start, end in (((1, 4), (64, 4)), ((1, 4), (1, 32))):
        if start in grid and end in grid:
            a, b = grid[start], grid[end]
            ours, peft = b["ours s"] / a["ours s"], b["peft s"] / a["peft s"]
            span = f"H{start[0]}K{start[1]} -> H{end[0]}K{end[1]}"
            src = f"growth[H={end[0]},K={end[1]}] / growth[H={start[0]},K={start[1]}]"
            out.append(row("poly", f"step-time growth {span}, ours", ours, ("<=", peft),
                           f"{file} {src}: ours s (target: the same for peft s)",
                           f"floor grows {b['floor s'] / a['floor s']:.3f}", f"<= {peft:.4f} (PEFT's growth)"))
    return out


def storage_rows(p: dict[str, Any], file: str) -> list[Row]:
    out = []
    for r in p["rows"]:
        if r["op"] not in ("save", "load"):
            continue
        raw = "raw write" if r["op"] == "save" else "raw read"
        free_read = r["op"] == "load" and r["backend"] == "memory"
        note = "memory:// raw read returns the stored bytes object, no copy: no reader can match it" \
            if free_read else None
        out.append(row("storage", f"{r['op']} vs {raw}, {r['backend']} {r['size_MB']:g} MB", r["raw_s"] / r["ours_s"],
                       None if free_read else (">=", 0.8),
                       f"{file} rows[backend={r['backend']},size_MB={r['size_MB']:g},op={r['op']}]: raw_s / ours_s",
                       note))
    return out


ROWS: dict[str, Callable[[dict[str, Any], str], list[Row]]] = {
    "overhead": overhead_rows, "mosa": mosa_rows, "poly": poly_rows, "storage": storage_rows,
}


def sub_args(name: str, payload: dict[str, Any]) -> dict[str, Any]:
    """The configuration a sub-run recorded (poly keeps it at the top level)."""
    if "args" in payload:
        return dict(payload["args"])
    return {k: payload.get(k) for k in ("device", "batch", "rounds", "r", "tasks", "skills", "quick")}


# --- running ----------------------------------------------------------------------------


def result_file(name: str, quick: bool) -> str:
    return "mosa-quick.json" if name == "mosa" and quick else f"{name}.json"


def command(name: str, quick: bool, threads: int, out: str) -> list[str]:
    cmd = [sys.executable, os.path.join(HERE, f"{name}.py"), "--out", out]
    if quick:
        cmd.append("--quick")
    if name != "storage":  # storage times I/O and hashing, not torch ops
        cmd += ["--threads", str(threads)]
    return cmd


def run(name: str, cmd: list[str]) -> tuple[int, float]:
    """Run one benchmark, streaming its output indented; returns (exit code, wall seconds)."""
    print(f"\n=== {name}: {' '.join(os.path.relpath(c) if c.startswith(HERE) else c for c in cmd[1:])}", flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            for part in line.rstrip("\n").split("\r"):  # progress bars redraw with \r: one line each
                if part.strip():
                    print(f"  | {part}", flush=True)
        code = proc.wait()
    wall = time.perf_counter() - start
    print(f"=== {name}: {'done' if code == 0 else f'FAILED (exit {code})'} in {wall:.1f} s", flush=True)
    return code, wall


# --- summary, table, plot ---------------------------------------------------------------


def summarise(directory: str, files: dict[str, str]) -> tuple[list[Row], dict[str, dict[str, Any]]]:
    rows: list[Row] = []
    payloads = {}
    for name, file in files.items():
        with open(os.path.join(directory, file)) as fh:
            payloads[name] = json.load(fh)
        rows += ROWS[name](payloads[name], file)
    return rows, payloads


def fmt_met(met: bool | None) -> str:
    return "" if met is None else "yes" if met else "NO"


def print_summary(rows: list[Row]) -> None:
    table = [{**r, "ratio": f"{r['ratio']:.3f}", "met": fmt_met(r["met"]), "note": r["note"] or ""} for r in rows]
    print_table("Speed and memory: summary (ratio, target, met)", table,
                ["area", "measure", "ratio", "target", "met", "note"])
    targeted = [r for r in rows if r["met"] is not None]
    print(f"\ntargets met: {sum(r['met'] for r in targeted)} of {len(targeted)}")


def markdown(rows: list[Row]) -> str:
    lines = ["| area | measure | ratio | target | met | note |", "| --- | --- | ---: | --- | --- | --- |"]
    for r in rows:
        met = {None: "", True: "yes", False: "**no**"}[r["met"]]
        lines.append(f"| {r['area']} | {r['measure']} | {r['ratio']:.3f} | {r['target'] or ''} | {met} | "
                     f"{r['note'] or ''} |")
    return "\n".join(lines)


def plot(rows: list[Row], out: str, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    colours = {True: "#2e8b57", False: "#c0392b", None: "#9e9e9e"}
    areas = [a for a in AREAS if any(r["area"] == a for r in rows)]
    counts = [sum(r["area"] == a for r in rows) for a in areas]
    height = 0.24 * sum(counts) + 0.75 * len(areas) + 1.0
    fig, axes = plt.subplots(len(areas), 1, figsize=(11, height), squeeze=False,
                             gridspec_kw={"height_ratios": [c + 1.5 for c in counts]})
    for ax, area in zip(axes[:, 0], areas, strict=True):
        sub = [r for r in rows if r["area"] == area]
        ys = list(range(len(sub)))[::-1]
        ratios = [r["ratio"] for r in sub]
        bounds = [parse_target(r["target"])[1] if r["target"] else None for r in sub]
        right = 1.15 * max([*ratios, *(b for b in bounds if b is not None), 1.0])
        ax.barh(ys, ratios, height=0.7, color=[colours[r["met"]] for r in sub])
        for y, ratio, bound in zip(ys, ratios, bounds, strict=True):
            if bound is not None:
                ax.plot([bound, bound], [y - 0.45, y + 0.45], color="black", linewidth=2)
            ax.text(max(ratio, bound or 0.0) + right * 0.01, y, f"{ratio:.3f}", va="center", fontsize=7)
        ax.axvline(1.0, color="#555555", linestyle=":", linewidth=1)
        ax.set_xlim(0, right)
        ax.set_yticks(ys, [r["measure"] for r in sub], fontsize=7.5)
        ax.set_ylim(-0.7, len(sub) - 0.3)
        ax.set_title(TITLES[area], fontsize=9.5, loc="left")
        ax.tick_params(axis="x", labelsize=8)
    handles = [Patch(color=colours[True], label="target met"), Patch(color=colours[False], label="target not met"),
               Patch(color=colours[None], label="no target (reference)"),
               Line2D([], [], color="black", linewidth=2, label="target"),
               Line2D([], [], color="#555555", linestyle=":", label="ratio 1.0")]
    top = 1 - 0.55 / height
    fig.suptitle(title, fontsize=11, x=0.01, y=1 - 0.08 / height, ha="left", va="top")
    fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(0.01, 1 - 0.35 / height), ncol=5, fontsize=8,
               frameon=False)
    fig.tight_layout(rect=(0, 0, 1, top))
    return save_figure(fig, "speed", out)


# --- main -------------------------------------------------------------------------------


def pick_files(directory: str, names: list[str], quick: bool) -> dict[str, str]:
    """Result files for ``--from``: those a previous speed.json names, else by name (mosa: full or quick)."""
    recorded: dict[str, str] = {}
    previous = os.path.join(directory, "speed.json")
    if os.path.exists(previous):
        with open(previous) as fh:
            recorded = {n: r["file"] for n, r in json.load(fh).get("runs", {}).items()}
    files = {}
    for name in names:
        options = [recorded[name]] if name in recorded else []
        options += [result_file(name, quick), result_file(name, not quick)]
        found = next((f for f in options if os.path.exists(os.path.join(directory, f))), None)
        if found is None:
            raise SystemExit(f"--from {directory}: no {name} results ({', '.join(dict.fromkeys(options))})")
        files[name] = found
    return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="every benchmark in its quick mode (about a minute)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for each benchmark (default 1)")
    parser.add_argument("--only", default=",".join(AREAS), help="comma-separated subset of " + ",".join(AREAS))
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results, quick: .../quick)")
    parser.add_argument("--from", dest="source", metavar="DIR", default=None,
                        help="only summarise the results already in DIR (no runs)")
    parser.add_argument("--markdown", action="store_true", help="also print the summary as a Markdown table")
    args = parser.parse_args()
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(names) - set(AREAS))
    if unknown or not names:
        parser.error(f"--only: unknown {unknown}; choose from {','.join(AREAS)}")
    names = [a for a in AREAS if a in names]

    runs: dict[str, dict[str, Any]] = {}
    failed: list[str] = []
    threads: int | None = args.threads
    if args.source:
        directory = os.path.abspath(args.source)
        out = os.path.abspath(args.out or directory)
        files = pick_files(directory, names, args.quick)
        previous: dict[str, Any] = {}
        if os.path.exists(os.path.join(directory, "speed.json")):
            with open(os.path.join(directory, "speed.json")) as fh:
                previous = json.load(fh)
        runs = {n: r for n, r in previous.get("runs", {}).items() if n in names and r["file"] == files[n]}
        threads = previous.get("environment", {}).get("threads")
    else:
        directory = out = os.path.abspath(args.out or (os.path.join(RESULTS_DIR, "quick") if args.quick
                                                         else RESULTS_DIR))
        files = {}
        total = time.perf_counter()
        for name in names:
            cmd = command(name, args.quick, args.threads, out)
            code, wall = run(name, cmd)
            file = result_file(name, args.quick)
            if code != 0 or not os.path.exists(os.path.join(out, file)):
                failed.append(name)
                continue
            files[name] = file
            runs[name] = {"command": [os.path.relpath(c, os.path.dirname(HERE)) if c.startswith(HERE) else c
                                      for c in cmd[1:]], "file": file, "wall_s": round(wall, 2)}
        print(f"\nall runs: {time.perf_counter() - total:.1f} s" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
        if not files:
            return 1

    rows, payloads = summarise(directory, files)
    for name, payload in payloads.items():
        runs.setdefault(name, {"command": None, "file": files[name], "wall_s": None})
        runs[name].update({"args": sub_args(name, payload), "environment": payload.get("environment")})
    quick = any(sub_args(n, p).get("quick") for n, p in payloads.items())
    note = "quick: time ratios from 3 rounds on tiny inputs are noise; memory ratios hold" if quick else None
    print_summary(rows)
    if note:
        print(f"({note})")
    if args.markdown:
        print("\n" + markdown(rows))
    mode = "quick" if quick else "full"
    env = {**environment(), "threads": threads}  # this process only aggregates: report the runs' threads
    path = write_json("speed", {"environment": env, "study": "speed", "mode": mode, "note": note,
                                "runs": {n: runs[n] for n in names if n in runs}, "failed": failed,
                                "summary": rows}, out)
    title = "Speed and memory: ratios per claim" + (" (quick run: time ratios are noise)" if quick else "")
    print(f"\nwrote {path}\nwrote {plot(rows, out, title)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
