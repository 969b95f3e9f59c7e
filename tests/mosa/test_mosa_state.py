"""Save -> load -> identical: cells travel with the adapter; a resumed run continues exactly."""

from __future__ import annotations

import torch
from mosa_testlib import mosa_recipe, randomize_deltas, split_modules, tiny_bert
from safetensors.torch import load_file, save_file

import adapterkit
from adapterkit.optim import adamw


def train(model, optimizer, batch, loss, steps: int) -> None:
    model.train()
    for _ in range(steps):
        loss(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad()


def test_save_load_restores_cells_and_outputs_and_resumes_exactly(tmp_path, batch, loss) -> None:
    model = adapterkit.attach(tiny_bert(), mosa_recipe(share="none"))
    randomize_deltas(model)
    optimizer = adamw(model, lr=1e-2)
    torch.manual_seed(0)
    train(model, optimizer, batch, loss, 3)
    state = adapterkit.adapter_state_dict(model)
    assert not any(k.endswith("touched") for k in state)  # transient, not saved
    assert all(state[k].dtype == torch.uint8 for k in state if k.endswith("cell_ids"))
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "adapter.safetensors"))
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")

    other = mosa_recipe(share="none", splitter_args={"seed": 99})  # different cells until loaded
    restored = adapterkit.attach(tiny_bert(), other)
    assert not torch.equal(split_modules(restored)[0].cell_ids, split_modules(model)[0].cell_ids)
    missing, unexpected = restored.load_state_dict(load_file(str(tmp_path / "adapter.safetensors")), strict=False)
    assert not unexpected and not set(missing) & set(state)
    for a, b in zip(split_modules(model), split_modules(restored), strict=True):
        assert torch.equal(a.cell_ids, b.cell_ids) and a.cell_ids.dtype == b.cell_ids.dtype == torch.uint8
    model.eval()
    restored.eval()
    assert torch.equal(model(**batch).last_hidden_state, restored(**batch).last_hidden_state)

    restored_opt = adamw(restored, lr=1e-2)
    restored_opt.load_state_dict(torch.load(tmp_path / "optimizer.pt", weights_only=True))
    for m, opt in ((model, optimizer), (restored, restored_opt)):
        torch.manual_seed(1)  # same draws
        train(m, opt, batch, loss, 2)
    for (key, a), b in zip(adapterkit.adapter_state_dict(model).items(),
                           adapterkit.adapter_state_dict(restored).values(), strict=True):
        assert torch.equal(a, b), key
