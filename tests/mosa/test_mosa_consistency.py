"""The consistency regulariser: symmetric KL with stop-gradient between two fresh draws."""

from __future__ import annotations

import pytest
import torch
from adapterkit_mosa import consistency_loss, symmetric_kl
from adapterkit_mosa.consistency import kl_to_detached
from mosa_testlib import randomize_deltas, split_modules
from torch.nn import functional as F


def test_kl_to_detached_is_kl_of_the_detached_target_and_sends_no_gradient_to_it() -> None:
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(5, 7, generator=generator, requires_grad=True)
    b = torch.randn(5, 7, generator=generator, requires_grad=True)
    p_b = F.softmax(b, -1)
    by_hand = (p_b * (F.log_softmax(b, -1) - F.log_softmax(a, -1))).sum(-1).mean()
    torch.testing.assert_close(kl_to_detached(a, b), by_hand)
    kl_to_detached(a, b).backward()
    assert a.grad is not None and b.grad is None  # stop-gradient on the target
    torch.testing.assert_close(symmetric_kl(a, b), 0.5 * (kl_to_detached(a, b) + kl_to_detached(b, a)))
    assert float(symmetric_kl(a, a).detach()) == pytest.approx(0.0, abs=1e-7)


def test_consistency_loss_runs_two_draws_and_weights_the_kl(make_model, batch) -> None:
    model = make_model(share="none")
    randomize_deltas(model)
    model.train()
    head = torch.nn.Linear(32, 3)
    labels = torch.tensor([0, 1, 2, 1])

    def forward() -> torch.Tensor:
        return head(model(**batch).last_hidden_state[:, 0])

    torch.manual_seed(3)
    out = consistency_loss(forward, lambda logits: F.cross_entropy(logits, labels), weight=0.5)
    assert float(out.consistency.detach()) > 0  # the two passes drew different cells
    torch.testing.assert_close(out.loss, out.task + 0.5 * out.consistency)
    out.loss.backward()
    assert any(int(m.touched.sum()) == 2 for m in split_modules(model))  # both draws train
    torch.manual_seed(3)
    single = consistency_loss(forward, lambda logits: F.cross_entropy(logits, labels), weight=0.0)
    torch.testing.assert_close(single.task, out.task)  # same first draw
    assert float(single.consistency) == 0.0


def test_the_registered_loss_term_is_the_regulariser(make_model, batch) -> None:
    from adapterkit.workflows.loop import make_loss_term

    model = make_model(share="none")
    randomize_deltas(model)
    model.train()
    labels = torch.tensor([0, 1, 2, 1])
    head = torch.nn.Linear(32, 3)

    def forward() -> torch.Tensor:
        return head(model(**batch).last_hidden_state[:, 0])

    def task(logits: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, labels)

    term = make_loss_term({"name": "consistency", "weight": 0.5})  # what [train] loss = {...} builds
    torch.manual_seed(3)
    by_term = term(forward, task)
    torch.manual_seed(3)
    assert torch.equal(by_term, consistency_loss(forward, task, weight=0.5).loss)
