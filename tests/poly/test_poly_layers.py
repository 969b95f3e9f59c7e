"""Poly/MHR on GPT-2's Conv1D layers (transformers' ``[in, out]`` linear): routes, collapses, folds."""

from __future__ import annotations

import copy

import pytest
import torch
from polylib import poly_recipe, randomize
from torch import Tensor, nn

import adapterkit

TOL = dict(rtol=1e-5, atol=1e-5)


def gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=32, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2Model(config).eval()


def hidden(model: nn.Module, ids: Tensor, task: int) -> Tensor:
    with torch.no_grad(), adapterkit.route(model, [task] * ids.shape[0]):
        return model(input_ids=ids).last_hidden_state  # type: ignore[no-any-return]


@pytest.mark.parametrize("heads", [1, 4])
def test_routed_lora_on_conv1d_collapses_and_folds(heads: int) -> None:
    base = gpt2()
    model = adapterkit.attach(copy.deepcopy(base), poly_recipe(["c_attn", "c_proj", "c_fc"], heads=heads, tasks=3))
    assert {type(s.base).__name__ for s in adapterkit.sites(model).values()} == {"Conv1D"}
    randomize(model, ("projections.", "router."), seed=0)
    ids = torch.randint(0, 100, (4, 9), generator=torch.Generator().manual_seed(1))

    # trains per example (mixed task ids in one batch)
    model.train()
    with adapterkit.route(model, [0, 1, 2, 0]):
        model(input_ids=ids).last_hidden_state.square().mean().backward()
    routers = [p for s in adapterkit.sites(model).values() for p in s.router.parameters()]
    assert routers and all(p.grad is not None and p.grad.abs().sum() > 0 for p in routers)

    model.eval()
    expected = [hidden(model, ids, t) for t in range(3)]
    assert float((expected[0] - expected[1]).abs().max()) > 1e-3  # tasks really differ
    with torch.no_grad(), adapterkit.route(model, [0, 1, 2, 0]):
        mixed = model(input_ids=ids).last_hidden_state
    for row, task in enumerate([0, 1, 2, 0]):
        torch.testing.assert_close(mixed[row], expected[task][row], **TOL)
    for task in range(3):
        collapsed = adapterkit.merge(copy.deepcopy(model), "collapse", task=task)
        with torch.no_grad():
            torch.testing.assert_close(collapsed(input_ids=ids).last_hidden_state, expected[task], **TOL)
        folded = adapterkit.merge(collapsed, "fold")
        assert not adapterkit.sites(folded)
        with torch.no_grad():
            torch.testing.assert_close(folded(input_ids=ids).last_hidden_state, expected[task], **TOL)
