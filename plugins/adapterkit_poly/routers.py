"""Routers of the Poly/MHR family: ``poly`` (learned), ``private`` (one-hot), ``uniform``.

All return ``(batch, H, K)`` weights normalised over skills. Every op is a torch op on
device (no ``.item()``, no data-dependent branch), so routed models compile with
``torch.compile(fullgraph=True)``; task ids are validated once per forward by
``adapterkit.route``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import attrs
import torch
from torch import Tensor, nn

from adapterkit.plugin_api import Router, positive, positive_number

EPS = 1e-12  # the reference's normaliser guard: w = y / (sum_k y + EPS)


def relaxed_bernoulli(logits: Tensor, temperature: float, uniform: Tensor) -> Tensor:
    """A reparameterised relaxed-Bernoulli sample given the uniform noise ``uniform``.

    ``sigmoid((log u - log(1-u) + log p - log(1-p)) / tau)`` with ``p = sigmoid(logits)``,
    as ``torch.distributions.RelaxedBernoulli(temperature, logits=logits).rsample()``:
    ``u``, ``p`` and the sample are clamped the same way, so equal noise gives equal samples.
    """
    info = torch.finfo(logits.dtype)
    u = uniform.clamp(info.eps, 1 - info.eps)
    p = torch.sigmoid(logits).clamp(info.eps, 1 - info.eps)
    y = torch.sigmoid((u.log() - (-u).log1p() + p.log() - (-p).log1p()) / temperature)
    return y.clamp(info.tiny, 1 - info.eps)  # torch's SigmoidTransform clips the same way


def normalise(y: Tensor) -> Tensor:
    return y / (y.sum(-1, keepdim=True) + EPS)


class TaskRouter(Router):
    """A router of ``config.tasks`` tasks: declares them (:attr:`n_tasks`) and takes the
    count from the data (:meth:`for_tasks`)."""

    @property
    def n_tasks(self) -> int | None:
        return int(self.config.tasks)

    @classmethod
    def for_tasks(cls, args: Mapping[str, Any], n_tasks: int) -> dict[str, Any]:
        given = args.get("tasks")
        if given is None:
            if n_tasks < 1:
                raise ValueError("this router routes tasks, but the data has no tasks")
            return {**args, "tasks": n_tasks}
        if given != max(n_tasks, 1):
            raise ValueError(f"the router declares tasks = {given}, but the data has {n_tasks or 'no'} tasks")
        return dict(args)


class PolyRouter(TaskRouter):
    """Polytropon routing: per task, per head, one logit per skill.

    ``logits: [tasks, H*K]`` (PEFT's ``module_logits`` layout), init ``U(-init_range,
    init_range)``. Training: relaxed Bernoulli at ``temperature`` with fresh noise per
    example and per layer (``relaxed = false``: the eval weights, a plain sigmoid, as the
    MHR T0 configuration trains); eval: ``sigmoid``; then normalised over skills (not softmax).
    """

    needs_task_ids: ClassVar[bool] = True
    logits: nn.Parameter

    @attrs.frozen
    class Config:
        tasks: int = attrs.field(validator=positive)
        temperature: float = attrs.field(default=1.0, validator=positive_number)
        init_range: float = attrs.field(default=1e-3, validator=positive_number)
        relaxed: bool = True  # False: no relaxed-Bernoulli noise in training

    def __init__(self, config: Any, *, heads: int, skills: int, generator: torch.Generator) -> None:
        super().__init__(config, heads=heads, skills=skills, generator=generator)
        logits = torch.empty(self.config.tasks, heads * skills)
        logits.uniform_(-self.config.init_range, self.config.init_range, generator=generator)
        self.logits = nn.Parameter(logits)

    def forward(self, task_ids: Tensor | None) -> Tensor:
        assert task_ids is not None  # the site checks before calling
        z = self.logits[task_ids].view(-1, self.heads, self.skills)
        if self.training and self.config.relaxed:
            y = relaxed_bernoulli(z, self.config.temperature, torch.rand_like(z))
        else:
            y = torch.sigmoid(z)
        return normalise(y)

    def extra_repr(self) -> str:
        return f"tasks={self.config.tasks}, heads={self.heads}, skills={self.skills}"


class PrivateRouter(TaskRouter):
    """One private skill per task: task ``t`` uses skill ``t`` only (needs ``skills == tasks``)."""

    needs_task_ids: ClassVar[bool] = True
    table: Tensor

    @attrs.frozen
    class Config:
        tasks: int = attrs.field(validator=positive)

    def __init__(self, config: Any, *, heads: int, skills: int, generator: torch.Generator) -> None:
        super().__init__(config, heads=heads, skills=skills, generator=generator)
        # a buffer, so it follows the site's device and dtype
        self.register_buffer("table", torch.eye(self.config.tasks, skills), persistent=False)

    def check(self, skills: int) -> None:
        if skills != self.config.tasks:
            raise ValueError(
                f"router 'private' needs one skill per task: skills={skills} but tasks={self.config.tasks}"
            )

    def forward(self, task_ids: Tensor | None) -> Tensor:
        assert task_ids is not None
        return self.table[task_ids].unsqueeze(1).expand(-1, self.heads, -1)


class UniformRouter(Router):
    """Every skill weighs ``1/K`` for every example and head: the average adapter (MHR-mu).

    Returns weights of batch size 1, so the site mixes once and runs a plain matmul.
    """

    table: Tensor

    def __init__(self, config: Any, *, heads: int, skills: int, generator: torch.Generator) -> None:
        super().__init__(config, heads=heads, skills=skills, generator=generator)
        self.register_buffer("table", torch.full((1, 1, skills), 1.0 / skills), persistent=False)

    def forward(self, task_ids: Tensor | None) -> Tensor:
        return self.table.expand(1, self.heads, self.skills)
