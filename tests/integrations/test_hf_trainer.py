"""A plain ``transformers.Trainer`` trains, evaluates, saves and reloads a routed
adapterkit model on the bundled MiniLM, with ``trainer_kwargs`` and nothing else: the
``task_ids`` column reaches the routed layers, the optimizer is adapterkit's (router
learning rate, no weight decay on routers, exact for MoSA's cells), MoSA's coarse-to-fine
sampler sees training progress, and what ``save_model`` writes reloads onto a fresh base
with bit-identical eval outputs."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
from hf_helpers import RECIPES, Rows, adapter_files, minilm, predictions, trained

import adapterkit
from adapterkit.integrations.transformers import ADAPTER_FILE, load_adapter
from adapterkit.optim import MaskedAdamW

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_trainer_trains_evaluates_saves_and_reloads(name: str, tmp_path: Any) -> None:
    from transformers import Trainer, TrainerCallback

    out = str(tmp_path / "run")
    initial = adapterkit.adapter_state_dict(adapterkit.attach(minilm(), RECIPES[name]))
    seen: list[float] = []

    class Progress(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            seen.append(float(next(iter(adapterkit.sites(model).values())).sampler.progress))

    trainer, model = trained(name, out, watch=Progress() if name == "mosa" else None)

    optimizer = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    assert isinstance(optimizer, MaskedAdamW)
    groups = {g["name"]: g for g in optimizer.param_groups}
    if name == "mhr":
        assert groups["routers"]["weight_decay"] == 0.0 and groups["routers"]["initial_lr"] == 1e-2
        assert groups["adapters"]["weight_decay"] == 0.1 and groups["adapters"]["initial_lr"] == 5e-3
    else:  # the cell-sparse parameters are the optimizer's masked ones
        assert optimizer.masked and optimizer._masks()
        assert seen == [0.0, 0.25, 0.5, 0.75]  # global_step / max_steps, reported before each step
        assert float(next(iter(adapterkit.sites(model).values())).sampler.progress) == 1.0  # training ended
    assert trainer.state.global_step == 4
    trained_state = adapterkit.adapter_state_dict(model)
    moved = [k for k in trained_state if not torch.equal(trained_state[k], initial[k])]
    assert moved, "training moved no adapter tensor"

    metrics = trainer.evaluate()
    assert torch.isfinite(torch.tensor(metrics["eval_loss"]))
    expected = predictions(trainer)
    trainer.save_model()
    for directory in (out, os.path.join(out, "checkpoint-4")):
        assert adapter_files(directory) == [ADAPTER_FILE]  # the adapter, not base weights under `.base.` keys
        assert os.path.exists(os.path.join(directory, "config.json"))

    fresh = load_adapter(out, minilm())
    reloaded = adapterkit.adapter_state_dict(fresh)
    assert reloaded.keys() == trained_state.keys()
    assert all(torch.equal(reloaded[k], trained_state[k]) for k in reloaded)
    again = Trainer(model=fresh, args=trainer.args, eval_dataset=Rows(8, 2))
    assert torch.equal(predictions(again), expected)
    if name == "mhr":  # the routed eval uses each row's task id: other ids give other outputs
        shuffled = Rows(8, 2)
        shuffled.tasks = (shuffled.tasks + 1) % 3
        assert not torch.equal(torch.as_tensor(again.predict(shuffled).predictions), expected)


def test_checkpoint_folders_reload(tmp_path: Any) -> None:
    out = str(tmp_path / "run")
    trainer, model = trained("mhr", out, max_steps=2, save_steps=1)
    first = load_adapter(os.path.join(out, "checkpoint-1"), minilm())
    last = load_adapter(os.path.join(out, "checkpoint-2"), minilm())
    final = adapterkit.adapter_state_dict(model)
    assert all(torch.equal(t, final[k]) for k, t in adapterkit.adapter_state_dict(last).items())
    assert any(not torch.equal(t, final[k]) for k, t in adapterkit.adapter_state_dict(first).items())
