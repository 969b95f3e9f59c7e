"""Poly/MHR on the other layers LoRA adapts: GPT-2's Conv1D (transformers' ``[in, out]``
linear), ``nn.Embedding`` and ``nn.Conv2d``: routes per example, collapses, folds."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from polylib import poly_recipe, randomize
from torch import Tensor, nn

import adapterkit

TOL = dict(rtol=1e-5, atol=1e-5)
TASKS = [0, 1, 2, 0]


class GPT2(nn.Module):
    def __init__(self) -> None:
        from transformers import GPT2Config, GPT2Model

        super().__init__()
        torch.manual_seed(0)
        self.gpt2 = GPT2Model(GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                         eos_token_id=0))

    def forward(self, ids: Tensor) -> Tensor:
        return self.gpt2(input_ids=ids).last_hidden_state  # type: ignore[no-any-return]


def conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=2))


def embedder() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(50, 16, padding_idx=0), nn.Linear(16, 8))


def ids(vocab: int) -> Tensor:
    return torch.randint(0, vocab, (4, 9), generator=torch.Generator().manual_seed(1))


CASES: dict[str, tuple[Callable[[], nn.Module], list[str], Callable[[], Tensor], int, str]] = {
    # name: (model, targets, inputs, heads, the layer type of the first site)
    "conv1d": (GPT2, ["c_attn", "c_proj", "c_fc"], lambda: ids(100), 1, "Conv1D"),
    "conv1d-mhr": (GPT2, ["c_attn", "c_proj", "c_fc"], lambda: ids(100), 4, "Conv1D"),
    "embedding-mhr": (embedder, ["0", "1"], lambda: ids(50), 2, "Embedding"),
    "conv2d": (conv_net, ["0", "2"], lambda: torch.randn(4, 3, 9, 9, generator=torch.Generator().manual_seed(1)), 1,
               "Conv2d"),
}


def run(model: nn.Module, x: Tensor, tasks: list[int]) -> Tensor:
    with adapterkit.route(model, tasks):
        return model(x)  # type: ignore[no-any-return]


@pytest.mark.parametrize("case", list(CASES))
def test_routed_lora_routes_collapses_and_folds(case: str) -> None:
    make, targets, inputs, heads, layer = CASES[case]
    model = adapterkit.attach(make().eval(), poly_recipe(targets, heads=heads, tasks=3))
    assert type(next(iter(adapterkit.sites(model).values())).base).__name__ == layer
    randomize(model, ("projections.", "router."), seed=0)
    x = inputs()

    model.train()  # trains with a different task per example
    run(model, x, TASKS).square().mean().backward()
    params = [p for s in adapterkit.sites(model).values() for p in s.adapter_parameters()]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)

    model.eval()
    with torch.no_grad():
        expected = [run(model, x, [t] * len(TASKS)) for t in range(3)]
        mixed = run(model, x, TASKS)
    assert float((expected[0] - expected[1]).abs().max()) > 1e-3  # tasks really differ
    for row, task in enumerate(TASKS):  # per-example weights equal each task's shared ones
        torch.testing.assert_close(mixed[row], expected[task][row], **TOL)
    for task in range(3):
        collapsed = adapterkit.merge(copy.deepcopy(model), "collapse", task=task)
        with torch.no_grad():
            torch.testing.assert_close(collapsed(x), expected[task], **TOL)
        folded = adapterkit.merge(collapsed, "fold")
        assert not adapterkit.sites(folded)
        with torch.no_grad():
            torch.testing.assert_close(folded(x), expected[task], **TOL)


def test_routed_embedding_keeps_the_padding_row_frozen() -> None:
    model = adapterkit.attach(embedder(), poly_recipe(["0"], tasks=3))
    randomize(model, ("projections.", "router."), seed=0)
    x = ids(50)
    x[:, 0] = 0  # padding tokens
    run(model, x, TASKS).square().sum().backward()
    grad = adapterkit.sites(model)["0"].projections["A"].weight.grad
    assert grad is not None and grad[:, 0].abs().sum() == 0 and grad[:, 1:].abs().sum() > 0
