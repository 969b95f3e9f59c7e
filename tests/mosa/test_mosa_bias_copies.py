"""Per-copy biases (``bias_copies = true``, the official ``ADAPTER.BIAS``): each of the N modules
of a split side has its own full bias, drawn with its weight and merged by the mean; checked
against the official layout built by hand (N explicit copies of weight and bias)."""

from __future__ import annotations

import pytest
import torch
from adapterkit_mosa import BiasCopies, SparseDelta
from mosa_testlib import HIDDEN, mosa_recipe, randomize_deltas, tiny_bert
from torch.nn import functional as F

import adapterkit
from adapterkit.optim import adamw

N = 4


def copies_of(module: SparseDelta | BiasCopies) -> list[torch.Tensor]:
    """Module i's training-time tensor in the official layout (N full copies)."""
    w0 = module.w0 if module.w0 is not None else 0
    if isinstance(module, BiasCopies):
        return [w0 + module.delta[:, i] for i in range(N)]
    return [w0 + (module.cell_ids == i) * module.delta for i in range(N)]


def drawn(module: SparseDelta) -> int:
    cells = module.touched.nonzero().flatten().tolist()
    assert len(cells) == 1
    module.touched.zero_()
    return int(cells[0])


@pytest.mark.parametrize("share", ["down", "none"])
def test_each_copy_runs_whole_and_the_merge_is_the_mean_of_copies(share: str) -> None:
    model = adapterkit.attach(tiny_bert(), mosa_recipe(share=share, splitter_args={"bias_copies": True}))
    randomize_deltas(model)
    site = next(iter(adapterkit.sites(model).values()))
    proj = site.projections
    split = [side for side in ("down", "up") if isinstance(proj[side], SparseDelta)]
    assert split == (["up"] if share == "down" else ["down", "up"])
    for side in ("down", "up"):  # a split side's bias has N copies; a shared side keeps one bias
        assert isinstance(proj[f"{side}_bias"], BiasCopies) == (side in split)
        if side in split:
            assert proj[f"{side}_bias"].delta.shape == (1, N, proj[side].delta.shape[-1])
    full = {name: proj[name] for side in split for name in (side, f"{side}_bias")}
    reference = {name: copies_of(m) for name, m in full.items()}
    fixed = {name: m.weight[0] for name, m in proj.items() if name not in full}
    site.train()
    h = torch.randn(3, 5, HIDDEN)
    for _ in range(6):  # training forwards: the output of copy i (weight and bias), drawn together
        out = site.adapter(h)
        picks = {name: drawn(m) for name, m in full.items()}
        for side in split:
            assert picks[side] == picks[f"{side}_bias"]
        w = {name: reference[name][picks[name]][0] for name in full} | fixed
        expected = F.gelu(h @ w["down"] + w["down_bias"]) @ w["up"] + w["up_bias"]
        torch.testing.assert_close(out, expected * site.scale)
    site.eval()
    evaluated = site.adapter(h)
    adapterkit.merge(model)  # the official merge: the mean of the N copies
    merged = next(iter(adapterkit.sites(model).values()))
    for name, copies in reference.items():
        torch.testing.assert_close(merged.projections[name].weight[0], torch.stack(copies).mean(0)[0])
    torch.testing.assert_close(merged.adapter(h), evaluated)


def test_only_the_drawn_copy_of_the_bias_trains(batch, loss) -> None:
    model = adapterkit.attach(tiny_bert(), mosa_recipe(splitter_args={"bias_copies": True}))
    randomize_deltas(model)
    biases = [m for m in model.modules() if isinstance(m, BiasCopies)]
    optimizer = adamw(model, lr=1e-2, weight_decay=0.01)
    model.train()
    for _ in range(3):
        before = [m.delta.detach().clone() for m in biases]
        loss(model, batch).backward()
        picks = [int(m.touched.nonzero()) for m in biases]
        for m, i in zip(biases, picks, strict=True):
            grad = m.delta.grad[0]
            assert grad[i].abs().sum() > 0 and not grad[torch.arange(N) != i].any()
        optimizer.step()
        optimizer.zero_grad()
        for m, old, i in zip(biases, before, picks, strict=True):
            others = torch.arange(N) != i
            assert torch.equal(m.delta[0, others], old[0, others]) and not torch.equal(m.delta[0, i], old[0, i])


def test_shared_bias_is_the_default() -> None:
    model = adapterkit.attach(tiny_bert(), mosa_recipe(share="none"))
    assert not any(isinstance(m, BiasCopies) for m in model.modules())
