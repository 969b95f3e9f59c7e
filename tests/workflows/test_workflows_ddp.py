"""Data-parallel training on 2 gloo processes (torch.multiprocessing.spawn, file://
rendezvous): both ranks end with identical adapters, and they match single-process
training on the same global batches. DDP's ``find_unused_parameters`` is on only when a
probe forward finds a trainable parameter outside the graph (an adapter on a layer the
backbone never calls); the probe leaves no trace (RNG, MoSA's touched cells).

The recipe draws random MoSA cells at every forward (twice per step: the consistency
regulariser's second pass), so the match also shows that every rank draws the cells a
single process draws. Tolerance: DDP averages two half-batch gradients where one
process sums one full batch, so results agree to float32 rounding (measured here
~4e-7 after 8 AdamW steps, while training moves weights by ~5e-2); we assert max |diff| <= 1e-5."""

from __future__ import annotations

import os

import torch
import torch.multiprocessing as mp
from lm_helpers import lm_config
from wf_helpers import ddp_worker, mlp_config, state

from adapterkit import workflows
from adapterkit.storage import load_tensors
from adapterkit.workflows.data import encode
from adapterkit.workflows.distributed import Dist
from adapterkit.workflows.loop import Trainer

TOLERANCE = 1e-5


def test_two_gloo_ranks_match_each_other_and_one_process(tmp_path: os.PathLike[str]) -> None:
    config = mlp_config(train={"steps": 8, "batch_size": 32, "loss": {"name": "consistency", "weight": 1.0}})
    out = str(tmp_path)
    mp.spawn(ddp_worker, args=(2, os.path.join(out, "rendezvous"), config, out), nprocs=2, join=True)
    rank0 = load_tensors(os.path.join(out, "rank0.safetensors"))
    rank1 = load_tensors(os.path.join(out, "rank1.safetensors"))
    assert rank0.keys() == rank1.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name

    single = state(workflows.train(workflows.from_dict(config), progress=False, echo=lambda _: None).classifier)
    initial = state(workflows.run.prepare(workflows.from_dict(config))[2])
    worst = max(float((rank0[n] - single[n]).abs().max()) for n in single)
    moved = max(float((initial[n] - single[n]).abs().max()) for n in single)
    print(f"DDP vs single max|diff| {worst:.3g}, moved {moved:.3g}")
    assert worst <= TOLERANCE, worst
    assert moved > 100 * TOLERANCE  # training moved the weights far more than the DDP/single gap


def _spare_config(**train: object) -> dict[str, object]:
    config = mlp_config(model={"backbone": "wf_helpers:mlp_with_spare"}, train={**train})
    config["recipe"]["adapter"]["targets"] = ["1", "3", "spare"]  # type: ignore[index]
    return config


def test_probe_finds_parameters_outside_the_graph_and_leaves_no_trace() -> None:
    for config, expected in ((mlp_config(), []), (_spare_config(), ["spare"])):
        _, corpus, classifier = workflows.run.prepare(workflows.from_dict(config))
        data = encode(classifier.backbone, corpus.train, corpus.classes, corpus.tasks)
        trainer = Trainer(classifier, workflows.from_dict(config).optim, workflows.from_dict(config).train, Dist(0, 2))
        trainer.setup(len(data))
        buffers = {n: b.clone() for n, b in classifier.named_buffers()}
        assert any(n.endswith("touched") for n in buffers)  # MoSA marks the cells a forward uses
        rng = torch.get_rng_state()
        unreached = trainer._unreached(data)
        assert sorted({n.split(".")[1] for n in unreached}) == expected, unreached
        assert torch.equal(rng, torch.get_rng_state())
        for name, value in classifier.named_buffers():
            assert torch.equal(buffers[name], value), name


def test_two_gloo_ranks_with_an_adapter_outside_the_graph(tmp_path: os.PathLike[str]) -> None:
    # find_unused_parameters=False here would fail the run: the probe turns it on
    config = _spare_config(steps=4)
    out = str(tmp_path)
    mp.spawn(ddp_worker, args=(2, os.path.join(out, "rendezvous"), config, out), nprocs=2, join=True)
    rank0 = load_tensors(os.path.join(out, "rank0.safetensors"))
    rank1 = load_tensors(os.path.join(out, "rank1.safetensors"))
    initial = state(workflows.run.prepare(workflows.from_dict(config))[2])
    assert rank0.keys() == rank1.keys() == initial.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    spare = [n for n in rank0 if ".spare." in n]
    assert spare and all(torch.equal(rank0[n], initial[n]) for n in spare)  # never reached, never moved
    assert not torch.equal(rank0["head.weight"], initial["head.weight"])


def test_two_gloo_ranks_train_a_causal_lm_as_one_process(
    lm_folders: dict[str, str], tmp_path: os.PathLike[str]
) -> None:
    """DDP on a language model: both ranks end identical and match one process on the same
    global batches. The loss is a mean over target tokens per rank; class-word targets give
    every example as many tokens (the word and eos), so the ranks' means average to the
    global mean and the match holds to float32 rounding (as above)."""
    config = lm_config(lm_folders["llama"], "causal-lm", ["q_proj", "v_proj"], train={"steps": 4, "batch_size": 8})
    config["recipe"] = {"seed": 0, "adapter": {"kind": "lora", "targets": ["q_proj", "v_proj"], "r": 4}}
    out = str(tmp_path)
    mp.spawn(ddp_worker, args=(2, os.path.join(out, "rendezvous"), config, out), nprocs=2, join=True)
    rank0, rank1 = (load_tensors(os.path.join(out, f"rank{r}.safetensors")) for r in (0, 1))
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[n], rank1[n]) for n in rank0)
    single = state(workflows.train(workflows.from_dict(config), progress=False, echo=lambda _: None).classifier)
    initial = state(workflows.run.prepare(workflows.from_dict(config))[2])
    worst = max(float((rank0[n] - single[n]).abs().max()) for n in single)
    moved = max(float((initial[n] - single[n]).abs().max()) for n in single)
    print(f"causal-lm DDP vs single max|diff| {worst:.3g}, moved {moved:.3g}")
    assert worst <= TOLERANCE and moved > 100 * TOLERANCE, (worst, moved)
