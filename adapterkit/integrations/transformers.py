"""``transformers.Trainer`` (and ``accelerate``, which it runs on) with adapterkit, unchanged.

Importing this module imports ``transformers`` (``import adapterkit`` does not).

A plain ``Trainer`` trains, evaluates and saves an attached model given
:func:`trainer_kwargs`::

    trainer = Trainer(model=model, args=args, train_dataset=data, **trainer_kwargs(model, args))

- the optimizer is :func:`adapterkit.optim.adamw` (router learning rate, no weight decay on
  routers, exact for MoSA's cells), built from ``args``' learning rate, weight decay and
  Adam betas/epsilon; the Trainer adds its scheduler as usual;
- a routed model takes ``task_ids`` as a forward keyword whose name its forward signature
  shows, so the Trainer keeps a ``task_ids`` dataset column and passes it to every call;
- :class:`AdapterkitCallback` reports training progress to the samplers
  (``Sampler.set_progress(global_step / max_steps)``) before each step, and 1 once
  training ends;
- ``model.save_pretrained`` (what ``Trainer.save_model`` and checkpoints call) writes the
  adapter, as a PEFT model does: ``adapterkit.safetensors`` (:data:`ADAPTER_FILE`) and
  the base's ``config.json``, never the base weights under renamed keys. Reload with
  :func:`load_adapter` onto a fresh base model.
"""

from __future__ import annotations

import os
import types
from typing import Any

from torch import nn
from transformers import TrainerCallback, TrainingArguments

from ..attach import state_of, unwrap
from ..optim import adamw
from ..storage import load, save
from ..training import freeze_norm_statistics, set_progress

ADAPTER_FILE = "adapterkit.safetensors"


def trainer_kwargs(model: nn.Module, args: TrainingArguments, *, router_lr: float | None = None) -> dict[str, Any]:
    """``Trainer(...)`` keyword arguments for an attached ``model``: ``optimizers`` (adapterkit's
    AdamW, the Trainer's own scheduler) and ``callbacks``. Makes ``model.save_pretrained``
    write the adapter (see the module docs)."""
    model = unwrap(model)
    state_of(model)  # a clear error for a model without adapters
    optimizer = adamw(model, lr=args.learning_rate, weight_decay=args.weight_decay, router_lr=router_lr,
                      betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    if "save_pretrained" not in vars(model):
        model.save_pretrained = types.MethodType(save_pretrained, model)  # type: ignore[assignment]
    return {"optimizers": (optimizer, None), "callbacks": [AdapterkitCallback()]}


def save_pretrained(model: nn.Module, save_directory: str | os.PathLike[str], *args: Any,
                    is_main_process: bool = True, **kwargs: Any) -> None:
    """Write the adapter of ``model`` (and its config, if it has one) into ``save_directory``:
    the ``save_pretrained`` that :func:`trainer_kwargs` gives the model. The Trainer's
    ``state_dict`` (the full model's) and other arguments are not needed."""
    if not is_main_process:
        return
    os.makedirs(save_directory, exist_ok=True)
    save(model, os.path.join(os.fspath(save_directory), ADAPTER_FILE))
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "save_pretrained"):
        config.save_pretrained(save_directory)


def load_adapter(directory: str | os.PathLike[str], model: nn.Module) -> nn.Module:
    """Load the adapter a Trainer saved into ``directory`` (the output folder or a
    ``checkpoint-N`` folder) onto ``model``, a fresh base model; returns it."""
    return load(os.path.join(os.fspath(directory), ADAPTER_FILE), model)  # (with its samplers' progress)


class AdapterkitCallback(TrainerCallback):
    """Before each optimizer step: the samplers' training progress (``global_step /
    max_steps``, as adapterkit's own loop reports it) and frozen batch-norm statistics
    kept frozen (``model.train()`` would update them). At the end of training the
    progress is 1: a scheduled sampler's eval gates (MoSA coarse-to-fine) are those of the
    finished schedule, and the saved adapter carries that progress."""

    def on_step_begin(self, args: TrainingArguments, state: Any, control: Any, model: nn.Module | None = None,
                      **kwargs: Any) -> None:
        if model is not None:
            model = unwrap(model)
            set_progress(model, state.global_step / max(1, state.max_steps))
            freeze_norm_statistics(model)

    def on_train_end(self, args: TrainingArguments, state: Any, control: Any, model: nn.Module | None = None,
                     **kwargs: Any) -> None:
        if model is not None:
            set_progress(unwrap(model), 1.0)
