"""Shared benchmark helpers: interleaved timing and result tables."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

RESULTS_DIR = os.path.join(os.path.dirname(__file__), "results")


def interleaved(
    variants: dict[str, Callable[[], Any]],
    *,
    rounds: int,
    warmup: int = 2,
    prepare: dict[str, Callable[[], Any]] | None = None,
) -> dict[str, list[float]]:
    """Run each variant once per round, in rotating order, and return per-variant times (s).

    Interleaving spreads machine noise evenly across variants; compare medians.
    ``prepare[name]`` (optional) runs before each call of ``name``, outside the timer
    (e.g. a fresh copy of state the call mutates, such as a KV cache).
    """
    prepare = prepare or {}
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            if name in prepare:
                prepare[name]()
            start = time.perf_counter()
            variants[name]()
            elapsed = time.perf_counter() - start
            if r >= warmup:
                times[name].append(elapsed)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def environment() -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
    }


def print_table(title: str, rows: list[dict[str, Any]], columns: list[str]) -> None:
    print(f"\n{title}")
    widths = [max([len(c), *(len(_fmt(r.get(c))) for r in rows)]) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in rows:
        print("  ".join(_fmt(row.get(c)).ljust(w) for c, w in zip(columns, widths, strict=True)))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    return "" if value is None else str(value)


def write_json(name: str, payload: dict[str, Any], directory: str | None = None) -> str:
    directory = directory or RESULTS_DIR
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"{name}.json")
    with open(path, "w") as fh:
        json.dump({"environment": environment(), **payload}, fh, indent=2)
    return path


# --- accuracy studies (sparse.py, transfer.py): the workflows' own pieces, cached ----------


def set_threads(threads: int | None) -> None:
    """Pin torch's intra-op threads: on a shared, busy machine 1 thread beats 2 that thrash."""
    if threads:
        torch.set_num_threads(threads)


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def paired(a: list[float], b: list[float], *, resamples: int = 10_000, seed: int = 0) -> dict[str, Any]:
    """Paired comparison of ``a`` and ``b`` (one value per seed, same seeds in the same order):
    the mean of the per-seed differences ``a - b`` and its bootstrap 95% interval (percentile,
    ``resamples`` resamples of the differences), and a verdict on ``a >= b``: ``holds`` (the
    interval lies above 0), ``fails`` (below 0) or ``within noise`` (it contains 0)."""
    import numpy as np

    diffs = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if len(diffs) == 0 or len(a) != len(b):
        raise ValueError(f"paired needs equal, non-empty lists, got {len(a)} and {len(b)}")
    rng = np.random.default_rng(seed)
    means = diffs[rng.integers(0, len(diffs), size=(resamples, len(diffs)))].mean(1)
    low, high = (float(v) for v in np.percentile(means, [2.5, 97.5]))
    verdict = "holds" if low > 0 else "fails" if high < 0 else "within noise"
    return {"n": len(diffs), "mean_diff": float(diffs.mean()), "ci_low": low, "ci_high": high,
            "wins": int((diffs > 0).sum()), "verdict": verdict, "diffs": [float(d) for d in diffs]}


def trainable_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


class Bench:
    """One dataset object and one pristine backbone body per config, reused across runs.

    ``adapterkit.workflows.train`` re-reads the corpus and rebuilds the pretrained body
    on every call (seconds each); a study makes dozens of runs, so it keeps them here and
    builds each run's classifier exactly as ``workflows.models.build_classifier`` does
    (seeded, frozen body, recipe attached, new head), from a deep copy of the body.
    """

    def __init__(self) -> None:
        self._datasets: dict[str, Any] = {}
        self._corpora: dict[str, Any] = {}
        self._bodies: dict[str, tuple[Any, torch.nn.Module]] = {}

    def dataset(self, data: Any) -> Any:
        from adapterkit.workflows.data import resolve_dataset

        key = json.dumps([data.dataset, dict(data.args)], sort_keys=True)
        if key not in self._datasets:
            self._datasets[key] = resolve_dataset(data)
        return self._datasets[key]

    def corpus(self, data: Any, seed: int) -> Any:
        """``workflows.Corpus.load`` with the dataset read once (subsampling seeded by ``seed``)."""
        from adapterkit.workflows.data import Corpus, check_examples, subsample

        key = json.dumps([data.dataset, dict(data.args), data.train_per_task, data.test_per_task, data.balanced,
                          seed], sort_keys=True)
        if key not in self._corpora:
            dataset = self.dataset(data)
            classes, tasks = dataset.classes(), dataset.tasks()
            splits = {}
            for split, per_task in (("train", data.train_per_task), ("test", data.test_per_task)):
                examples = dataset.examples(split)
                check_examples(examples, classes, tasks, split)
                splits[split] = subsample(examples, per_task, balanced=data.balanced, seed=seed)
            self._corpora[key] = Corpus(dataset, classes, tasks, splits["train"], splits["test"])
        return self._corpora[key]

    def backbone(self, model: Any) -> tuple[Any, torch.nn.Module]:
        from adapterkit.workflows.models import resolve_backbone

        key = json.dumps([model.backbone, dict(model.args)], sort_keys=True)
        if key not in self._bodies:
            backbone = resolve_backbone(model)
            self._bodies[key] = (backbone, backbone.build())
        return self._bodies[key]

    def classifier(self, model: Any, recipe: Any, num_classes: int, seed: int) -> Any:
        backbone, pristine = self.backbone(model)
        return build_classifier(backbone, pristine, recipe, num_classes, seed)


def build_classifier(backbone: Any, pristine: torch.nn.Module, recipe: Any, num_classes: int, seed: int) -> Any:
    """As ``workflows.models.build_classifier``: a seeded deep copy of ``pristine``, frozen, the
    recipe attached, a new head."""
    import copy

    from adapterkit import attach
    from adapterkit.zoo import Classifier

    torch.manual_seed(seed)
    body = copy.deepcopy(pristine)
    for p in body.parameters():
        p.requires_grad_(False)
    attach(body, recipe)
    torch.manual_seed(seed)
    return Classifier(backbone, body, num_classes)


def fit(classifier: Any, data: Any, optim: Any, train: Any, on_epoch: Callable[[int, Any], None] | None = None
        ) -> dict[str, Any]:
    """Train with the workflows' own loop (AdamW exact for sparse cells, warm-up and schedule,
    sampler progress, MoSA's consistency regulariser, task routing); no progress bar.
    ``on_epoch(epoch, classifier)`` runs after every epoch (e.g. a learning-curve point)."""
    from adapterkit.workflows.distributed import Dist
    from adapterkit.workflows.loop import Trainer

    trainer = Trainer(classifier, optim, train, Dist(), echo=lambda _: None, progress=False, on_epoch=on_epoch)
    trainer.setup(len(data))
    start = time.perf_counter()
    steps = trainer.fit(data)
    return {"steps": steps, "train_seconds": time.perf_counter() - start}


def evaluate_deployed(classifier: Any, test: Any, tasks: list[str], batch_size: int = 128) -> tuple[Any, bool]:
    """Accuracy/macro-F1 rows of the model as deployed: merged by the recipe's merger when
    it merges (``merged`` True), else as trained (routed models route their task ids)."""
    from adapterkit.workflows.evaluation import evaluate
    from adapterkit.workflows.loop import merged_copy
    from adapterkit.workflows.models import is_routed

    model, reason = merged_copy(classifier)
    return evaluate(model, test, tasks, batch_size, is_routed(model)), reason is None


def save_figure(fig: Any, name: str, directory: str | None = None) -> str:
    directory = directory or RESULTS_DIR
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"{name}.png")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


S3_ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}


def start_moto() -> tuple[Any, dict[str, Any]]:
    """A moto S3 server on loopback with a bucket ``bench``: ``(server, storage options)``."""
    import logging

    import fsspec
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no per-request lines
    os.environ.update(S3_ENV)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = {"client_kwargs": {"endpoint_url": f"http://{host}:{port}"}}
    fsspec.filesystem("s3", **options).mkdir("bench")
    return server, options


class Journal:
    """A study's finished runs, one JSON line each, appended (and synced) as each run ends, so a
    lost process loses at most the run in progress. The first line is a header (the study's
    settings); ``resume`` reuses the recorded runs of a journal with the same header, keyed by
    ``key(run)``, instead of training them again."""

    def __init__(self, path: str, header: dict[str, Any], key: Callable[[dict[str, Any]], tuple[Any, ...]],
                 *, resume: bool) -> None:
        self.path, self.key = path, key
        self.done: dict[tuple[Any, ...], dict[str, Any]] = {}
        self.notes: set[str] = set()  # a resumed study notes the same things again: kept once
        if resume and os.path.exists(path):
            recorded, runs, notes = read_journal(path)
            if recorded != header:
                raise SystemExit(f"{path} was written with other settings ({recorded}); "
                                 "rerun with those or without --resume")
            self.done = {key(r): r for r in runs}
            self.notes = {json.dumps({"note": n}) for n in notes}
            with open(path + ".tmp", "w") as fh:  # rewritten whole: a torn last line would swallow the next
                records = [{"header": header}, *({"note": n} for n in notes), *runs]
                fh.writelines(json.dumps(record) + "\n" for record in records)
            os.replace(path + ".tmp", path)
            return
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as fh:
            fh.write(json.dumps({"header": header}) + "\n")

    def run(self, wanted: tuple[Any, ...], train: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any], bool]:
        """The recorded run ``wanted`` if there is one (``True``), else ``train()``, recorded."""
        if wanted in self.done:
            return self.done[wanted], True
        result = train()
        self.note(result)
        self.done[self.key(result)] = result
        return result, False

    def note(self, record: dict[str, Any]) -> None:
        """Append ``record`` (a run, or ``{"note": ...}`` for anything else worth keeping)."""
        line = json.dumps(record)
        if "note" in record:
            if line in self.notes:
                return
            self.notes.add(line)
        with open(self.path, "a") as fh:
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())


def read_journal(path: str) -> tuple[dict[str, Any], list[dict[str, Any]], list[Any]]:
    """A journal's header, runs and notes (a torn last line, from a process killed mid-write,
    is skipped)."""
    with open(path) as fh:
        lines = fh.read().splitlines()
    header = json.loads(lines[0])["header"]
    runs, notes = [], []
    for line in lines[1:]:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "note" in record:
            notes.append(record["note"])
        else:
            runs.append(record)
    return header, runs, notes
