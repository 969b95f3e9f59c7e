"""Streamed data (``[data] stream = true``): peak memory against the file's size, and the
data pipeline's throughput against the model step.

* **memory**: a generated JSONL file of text-classification records (``--lines``, by
  default 100,000 and 1,000,000) trains MiniLM-L6 with a LoRA (the ``files`` dataset,
  streamed, the default number of DataLoader workers) for ``--steps`` steps through
  :func:`adapterkit.workflows.train`, then the same pipeline is iterated over the whole
  file (one epoch, tokenization included). Each size runs in its own process, which
  reports its peak RSS (``VmHWM``) and its workers' (``RUSAGE_CHILDREN``). The bound:
  the peak of the largest file stays under ``BOUND_MB`` and within ``GROWTH_MB`` of the
  smallest file's (a file read into memory would add hundreds of MB per million lines).
* **throughput**: examples/s of the pipeline (read, parse, tokenize to MiniLM's 64
  tokens, hand to the training process) with 0, the default (1) and 2 workers, alone,
  against the model step (forward + backward + AdamW, MiniLM + LoRA r=8 on query/value,
  batch 32, one thread) as examples/s; and the training loop itself, streamed against
  pre-encoded tensors, over the same steps.

Usage: ``python benchmarks/stream.py [--quick] [--lines 100000,1000000] [--steps 10]
[--threads 1] [--out DIR]``; writes ``stream.json`` (default folder
``benchmarks/results``, ``benchmarks/results/quick`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import attrs

sys.path.insert(0, os.path.dirname(__file__))
from common import RESULTS_DIR, print_table, write_json  # noqa: E402

BOUND_MB = 1500.0  # peak RSS of the training process, any file size
GROWTH_MB = 64.0  # at most this much more for the largest file than for the smallest
BATCH = 32
WORDS = ("flight delayed again great crew lost bag seat upgrade thanks late gate cancelled friendly rude "
         "phone battery screen update love hate new store support music festival weekend tickets sold").split()
CLASSES = ("negative", "neutral", "positive")


def generate(path: str, lines: int, seed: int = 0) -> int:
    """``lines`` JSONL records ``{"text", "label"}`` (tweet-like, 8-24 words); returns the bytes written."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(lines):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 24)))
            f.write(json.dumps({"text": text, "label": rng.choice(CLASSES)}) + "\n")
    return os.path.getsize(path)


def config(train: str, test: str, steps: int, workers: int | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {"dataset": "files", "train": train, "test": test, "stream": True}
    if workers is not None:
        data["workers"] = workers
    return {
        "model": {"backbone": "minilm", "max_length": 64},
        "data": data,
        "recipe": {"seed": 0, "adapter": {"kind": "lora", "targets": ["query", "value"], "r": 8}},
        "train": {"steps": steps, "batch_size": BATCH, "seed": 0},
        "eval": {"every_epoch": False},
        "output": {"merge": False},
    }


def peak_mb() -> tuple[float, float]:
    """(this process's peak RSS, the largest waited-for child's), in MB."""
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return hwm / 1024, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def reset_peak() -> None:
    """Restart ``VmHWM`` at the current RSS (Linux: ``/proc/self/clear_refs``)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _pipeline(result: Any, workers: int | None = None) -> tuple[Any, Any]:
    """The run's streamed train split as a pipeline (its own DataLoader workers), and one epoch's plan."""
    from adapterkit import workflows
    from adapterkit.workflows.models import resolve_objective
    from adapterkit.workflows.stream import Encoder, Plan, TrainStream

    cfg = result.config
    corpus = workflows.Corpus.load(cfg.data, cfg.train.seed)
    objective = resolve_objective(cfg.model)
    encoder = Encoder(objective, result.classifier.backbone, corpus.classes, corpus.tasks)
    stream = TrainStream(corpus.stream, encoder, cfg.data.workers if workers is None else workers,
                         cfg.data.shuffle_buffer, cfg.train.seed)
    per_epoch = len(stream) // BATCH
    return stream, Plan(BATCH, per_epoch, per_epoch)


def child_memory(args: argparse.Namespace) -> dict[str, Any]:
    """Train ``--steps`` steps on the file, then iterate the pipeline over all of it."""
    from adapterkit_zoo.minilm import MiniLM

    from adapterkit import workflows

    MiniLM(MiniLM.Config()).build()  # torch, transformers and the model loaded: what any run holds
    baseline, _ = peak_mb()
    started = time.perf_counter()
    result = workflows.train(workflows.from_dict(config(args.file, args.test, args.steps)), progress=False,
                             echo=lambda _: None)
    trained = time.perf_counter() - started
    stream, plan = _pipeline(result)
    trained_peak, _ = peak_mb()
    steps = result.steps
    del result
    gc.collect()
    reset_peak()  # from here: the peak of reading and tokenizing the whole file alone
    started, examples = time.perf_counter(), 0
    for _, part in stream.batches(plan):
        examples += len(part)
    iterated = time.perf_counter() - started
    iterate_peak, workers = peak_mb()
    return {"records": len(stream), "baseline_rss_mb": baseline, "train_steps": steps, "train_s": trained,
            "iterated_examples": examples,
            "iterate_s": iterated, "peak_rss_mb": max(trained_peak, iterate_peak), "train_peak_rss_mb": trained_peak,
            "iterate_peak_rss_mb": iterate_peak, "worker_peak_rss_mb": workers}


def child_throughput(args: argparse.Namespace) -> dict[str, Any]:
    """Pipeline examples/s per worker count; the model step; the loop streamed vs in memory."""
    import torch

    from adapterkit import workflows
    from adapterkit.objectives import Encoded
    from adapterkit.workflows.distributed import Dist
    from adapterkit.workflows.loop import Trainer, make_optimizer
    from adapterkit.workflows.models import resolve_objective
    from adapterkit.workflows.stream import Plan

    cfg = workflows.from_dict(config(args.file, args.test, args.steps))
    cfg, corpus, classifier = workflows.run.prepare(cfg)
    objective = resolve_objective(cfg.model)
    holder = Run(cfg, classifier)
    pipeline = []
    for workers in (0, 1, 2):
        stream, _ = _pipeline(holder, workers)
        plan = Plan(BATCH, args.batches, args.batches)
        started, examples = time.perf_counter(), 0
        for _, part in stream.batches(plan):
            examples += len(part)
        elapsed = time.perf_counter() - started
        pipeline.append({"workers": workers, "examples": examples, "seconds": elapsed,
                         "examples_per_s": examples / elapsed})

    stream, _ = _pipeline(holder, 0)
    first = stream.first(Plan(BATCH, 1, 1))
    optimizer = make_optimizer(classifier, cfg.optim)
    classifier.train()
    times = []
    for i in range(2 + args.rounds):
        started = time.perf_counter()
        loss = objective.loss(classifier(**first.inputs), first.labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= 2:
            times.append(time.perf_counter() - started)
    step_s = statistics.median(times)

    loop = {}
    for name in ("pre-encoded", "streamed"):
        cfg, corpus, classifier = workflows.run.prepare(cfg)
        stream, _ = _pipeline(Run(cfg, classifier))
        data: Any = stream
        if name == "pre-encoded":  # the examples of the stream's first steps, encoded up front
            parts = [part for _, part in stream.batches(Plan(BATCH, args.steps, args.steps), workers=0)]
            data = Encoded({k: torch.cat([p.inputs[k] for p in parts]) for k in parts[0].inputs},
                           torch.cat([p.labels for p in parts]), torch.cat([p.tasks for p in parts]))
        trainer = Trainer(classifier, cfg.optim, cfg.train, Dist(), progress=False, objective=objective)
        trainer.setup(len(data), streamed=name == "streamed")
        started = time.perf_counter()
        trainer.fit(data)
        loop[name] = {"steps": trainer.total, "seconds": time.perf_counter() - started}
    return {"batch": BATCH, "max_length": 64, "model_step_s": step_s, "model_examples_per_s": BATCH / step_s,
            "pipeline": pipeline, "loop": loop}


@attrs.frozen
class Run:
    """What :func:`_pipeline` reads of a run: its config and model."""

    config: Any
    classifier: Any


def run_child(kind: str, file: str, test: str, args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--file", file, "--test", test,
           "--steps", str(args.steps), "--threads", str(args.threads), "--batches", str(args.batches),
           "--rounds", str(args.rounds)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=7200)
    if done.returncode:
        raise SystemExit(f"{kind} child failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1,000 and 4,000 lines, one step: checks the script runs")
    parser.add_argument("--lines", default=None, help="file sizes, comma-separated (default 100000,1000000)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default 10)")
    parser.add_argument("--batches", type=int, default=None, help="pipeline batches timed (default 200)")
    parser.add_argument("--rounds", type=int, default=None, help="model steps timed (default 10)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", choices=("memory", "throughput"), help=argparse.SUPPRESS)
    parser.add_argument("--file", help=argparse.SUPPRESS)
    parser.add_argument("--test", help=argparse.SUPPRESS)
    args = parser.parse_args()
    quick = args.quick
    args.steps = args.steps or (1 if quick else 10)
    args.batches = args.batches or (4 if quick else 200)
    args.rounds = args.rounds or (1 if quick else 10)
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        out = child_memory(args) if args.child == "memory" else child_throughput(args)
        print(json.dumps(out))
        return
    sizes = [int(n) for n in (args.lines or ("1000,4000" if quick else "100000,1000000")).split(",")]
    out_dir = args.out or os.path.join(RESULTS_DIR, "quick" if quick else "")
    memory = []
    with tempfile.TemporaryDirectory() as tmp:
        test = os.path.join(tmp, "test.jsonl")
        generate(test, 64, seed=1)
        files = {}
        for lines in sizes:
            files[lines] = os.path.join(tmp, f"train-{lines}.jsonl")
            size = generate(files[lines], lines)
            print(f"memory: {lines:,} lines ({size / 2**20:.0f} MB) ...", flush=True)
            memory.append({"lines": lines, "file_mb": size / 2**20, **run_child("memory", files[lines], test, args)})
        print("throughput ...", flush=True)
        throughput = run_child("throughput", files[sizes[0]], test, args)
    peaks = [m["peak_rss_mb"] for m in memory]
    growth = peaks[-1] - peaks[0]
    iterate_growth = memory[-1]["iterate_peak_rss_mb"] - memory[0]["iterate_peak_rss_mb"]
    default = next(p for p in throughput["pipeline"] if p["workers"] == 1)
    ratio = default["examples_per_s"] / throughput["model_examples_per_s"]
    loop = throughput["loop"]
    payload = {
        "study": "stream", "mode": "quick" if quick else "full",
        "threads": args.threads, "steps": args.steps,
        "memory": memory,
        "bound": {"peak_rss_mb": BOUND_MB, "growth_mb": GROWTH_MB, "largest_peak_mb": peaks[-1],
                  "growth_measured_mb": growth, "iterate_growth_mb": iterate_growth,
                  "met": peaks[-1] <= BOUND_MB and growth <= GROWTH_MB and iterate_growth <= GROWTH_MB},
        "throughput": {**throughput, "default_workers": 1, "pipeline_over_model": ratio,
                       "bottleneck": "model" if ratio > 1 else "data",
                       "loop_streamed_over_pre_encoded": loop["streamed"]["seconds"] / loop["pre-encoded"]["seconds"]},
    }
    path = write_json("stream", payload, out_dir)
    print_table("memory (peak RSS, MB)", memory,
                ["lines", "file_mb", "baseline_rss_mb", "train_peak_rss_mb", "iterate_peak_rss_mb",
                 "worker_peak_rss_mb", "train_s", "iterate_s"])
    print_table("throughput (examples/s)", [*throughput["pipeline"], {"workers": "model step",
                "examples_per_s": throughput["model_examples_per_s"]}], ["workers", "examples_per_s"])
    print(f"bound met: {payload['bound']['met']} (largest {peaks[-1]:.0f} MB, growth {growth:.1f} MB); "
          f"pipeline / model step {ratio:.1f}x; loop streamed / pre-encoded "
          f"{payload['throughput']['loop_streamed_over_pre_encoded']:.3f}; wrote {path}")


if __name__ == "__main__":
    main()
