"""An example third-party adapterkit plugin: a softmax task router.

Poly normalises sigmoid scores over skills; this router uses a tempered softmax over
per-task logits instead. It plugs into any recipe with ``[router] name = "softmax"``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import torch
from torch import Tensor, nn

from adapterkit.plugin_api import Registry, Router, hookimpl, positive


class SoftmaxRouter(Router):
    """``w[b, h, :] = softmax(logits[task_ids[b], h] / temperature)``."""

    needs_task_ids = True  # the site will pass the ids set by adapterkit.route

    @attrs.frozen
    class Config:
        tasks: int = attrs.field(validator=positive)
        temperature: float = 1.0

    def __init__(self, config: Config, *, heads: int, skills: int, generator: torch.Generator) -> None:
        super().__init__(config, heads=heads, skills=skills, generator=generator)
        self.logits = nn.Parameter(torch.zeros(config.tasks, heads, skills))

    @property
    def n_tasks(self) -> int:  # declared: adapterkit.route checks task ids against it
        return int(self.config.tasks)

    @classmethod
    def for_tasks(cls, args: Mapping[str, Any], n_tasks: int) -> dict[str, Any]:
        """``adapterkit train`` fills the task count in from the data."""
        if args.get("tasks", n_tasks) != n_tasks:
            raise ValueError(f"the router declares tasks = {args['tasks']}, but the data has {n_tasks} tasks")
        return {**args, "tasks": n_tasks}

    def check(self, skills: int) -> None:
        if skills < 2:
            raise ValueError("the softmax router mixes skills: set [adapter] skills >= 2")

    def forward(self, task_ids: Tensor | None) -> Tensor:
        assert task_ids is not None
        return torch.softmax(self.logits[task_ids] / self.config.temperature, dim=-1)


@hookimpl
def adapterkit_register_routers(registry: Registry[Router]) -> None:
    registry.add("softmax", SoftmaxRouter)
