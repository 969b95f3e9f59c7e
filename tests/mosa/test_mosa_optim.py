"""The optimizer never moves inactive cells; each cell trains as its own AdamW parameter."""

from __future__ import annotations

import pytest
import torch
from mosa_testlib import mosa_recipe, randomize_deltas, split_modules, tiny_bert

import adapterkit
from adapterkit.optim import MaskedAdamW, adamw

HYPER = {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.1}


def test_inactive_cells_stay_bit_identical_under_masked_adamw(make_model, batch, loss) -> None:
    model = make_model(share="none")
    randomize_deltas(model)
    optimizer = adamw(model, lr=HYPER["lr"], weight_decay=HYPER["weight_decay"])
    split = split_modules(model)
    model.train()
    moved = 0
    for _ in range(8):  # momentum from earlier steps is non-zero in cells that sit out this one
        loss(model, batch).backward()
        before = [(m.delta.detach().clone(), {k: v.clone() for k, v in optimizer.state[m.delta].items()
                   if torch.is_tensor(v)}, m.touched.clone()) for m in split]
        optimizer.step()
        optimizer.zero_grad()
        for m, (delta, state, touched) in zip(split, before, strict=True):
            inactive = ~touched[m.cell_ids.long()]
            assert inactive.float().mean() == pytest.approx(0.75, abs=0.01)
            assert torch.equal(m.delta[:, inactive], delta[:, inactive])  # bit-identical
            for key, value in state.items():
                if key != "cell_step":
                    assert torch.equal(optimizer.state[m.delta][key][:, inactive], value[:, inactive])
            moved += int((m.delta[:, ~inactive] != delta[:, ~inactive]).sum())
            assert not m.touched.any()  # the step consumed the marks
    assert moved > 0


def test_plain_adamw_drifts_inactive_cells_the_reference_bug(make_model, batch, loss) -> None:
    model = make_model(share="down")
    randomize_deltas(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], **HYPER)
    module = split_modules(model)[0]
    model.train()
    drifted = False
    for _ in range(4):
        loss(model, batch).backward()
        touched, delta = module.touched.clone(), module.delta.detach().clone()
        module.touched.zero_()
        optimizer.step()
        optimizer.zero_grad()
        inactive = ~touched[module.cell_ids.long()]
        drifted |= not torch.equal(module.delta[:, inactive], delta[:, inactive])
    assert drifted  # what MaskedAdamW exists to prevent


def test_each_cell_trains_exactly_like_its_own_adamw_parameter(make_model, batch, loss) -> None:
    """Reference: one packed parameter per cell under torch's AdamW, gradient ``None`` while inactive."""
    model = make_model(share="none")
    randomize_deltas(model)
    optimizer = adamw(model, lr=HYPER["lr"], weight_decay=HYPER["weight_decay"], betas=HYPER["betas"])
    split = split_modules(model)
    masks = [[m.cell_ids == c for c in range(4)] for m in split]
    packed = [
        [torch.nn.Parameter(m.delta.detach()[:, mask].clone()) for mask in ms]
        for m, ms in zip(split, masks, strict=True)
    ]
    reference = torch.optim.AdamW([p for cells in packed for p in cells], foreach=False, **HYPER)
    model.train()
    for _ in range(10):
        loss(model, batch).backward()
        for m, ms, cells in zip(split, masks, packed, strict=True):
            for c, (mask, p) in enumerate(zip(ms, cells, strict=True)):
                p.grad = m.delta.grad[:, mask].clone() if m.touched[c] else None
        reference.step()
        optimizer.step()
        optimizer.zero_grad()
    for m, ms, cells in zip(split, masks, packed, strict=True):
        for mask, p in zip(ms, cells, strict=True):
            torch.testing.assert_close(m.delta.detach()[:, mask], p.detach(), rtol=1e-5, atol=1e-7)


def test_dense_parameters_get_plain_adamw(batch, loss) -> None:
    recipe = {"adapter": mosa_recipe()["adapter"]}
    ours, theirs = (adapterkit.attach(tiny_bert(), recipe) for _ in range(2))
    for model in (ours, theirs):
        randomize_deltas(model)
        model.train()
    opt_ours = MaskedAdamW([p for p in ours.parameters() if p.requires_grad], **HYPER)
    opt_theirs = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], foreach=False, **HYPER)
    for _ in range(5):
        for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            loss(model, batch).backward()
            opt.step()
            opt.zero_grad()
    for a, b in zip(adapterkit.adapter_state_dict(ours).values(), adapterkit.adapter_state_dict(theirs).values(),
                    strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_bad_hyperparameters_are_refused() -> None:
    with pytest.raises(ValueError, match="invalid AdamW hyperparameters"):
        MaskedAdamW([torch.nn.Parameter(torch.zeros(2))], lr=-1.0)
