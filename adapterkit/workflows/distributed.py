"""Data-parallel training on torch.distributed (DDP): gloo on CPU, NCCL on GPU.

Launch with ``torchrun --nproc_per_node=N -m adapterkit train config.toml`` (or call
:func:`adapterkit.workflows.train` inside an initialised process group). Each rank takes
an equal slice of every global batch; DDP averages gradients, so a step equals the
single-process step on the same global batch.

Randomness keeps single-process semantics (see :class:`Streams`): draws a whole batch
shares (the sampler's active cells, e.g. MoSA) come from a stream every rank seeds
identically, so all ranks train the same cells, exactly as one process would;
per-example noise (dropout, routing noise) comes from a per-rank stream, so examples on
different ranks get independent noise, as in one process. Both streams are re-derived
from ``(seed, step)`` at every step, so a resumed run draws what an uninterrupted one
would, and the step counter is the whole RNG state a checkpoint needs.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable
from typing import Any

import attrs
import torch
import torch.distributed as dist

from ..roles import Sampler


@attrs.frozen
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def available_devices() -> list[str]:
    """The device strings this machine takes: ``auto``, ``cpu``, ``cuda`` and ``cuda:N``
    for each visible GPU, ``mps`` where Apple's backend is available."""
    names = ["auto", "cpu"]
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count:
        names += ["cuda", *(f"cuda:{i}" for i in range(count))]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        names.append("mps")
    return names


def check_device(preference: str, local_rank: int | None = None, *, what: str = "config key 'train.device'") -> None:
    """Refuse, before any work, a device string this machine does not have (one line
    naming those it has). ``cuda`` under torchrun means ``cuda:LOCAL_RANK``."""
    from .config import ConfigError

    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    available = available_devices()
    wanted = f"cuda:{local_rank}" if preference == "cuda" else preference
    if isinstance(preference, str) and wanted in available:
        return
    from ..storage.errors import printable

    shown = repr(printable(str(preference), 100))
    if preference == "cuda" and "cuda" in available:
        reason = f"{what} is 'cuda', but this process (LOCAL_RANK {local_rank}) has no cuda:{local_rank}"
    else:
        reason = f"{what} is {shown}, which this machine does not have"
    raise ConfigError(f"{reason}; available here: {', '.join(available)}")


def pick_device(preference: str, local_rank: int = 0) -> torch.device:
    if preference == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(preference)
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local_rank}")
    return device


def setup(preference: str = "auto") -> Dist:
    """Join the process group torchrun (or the caller) set up; a single process otherwise."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    owns = False
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = pick_device(preference, local_rank)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        owns = True
    if not dist.is_initialized():
        return Dist(device=pick_device(preference))
    device = pick_device(preference, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return Dist(dist.get_rank(), dist.get_world_size(), device, owns)


def teardown(d: Dist) -> None:
    if d.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts; stable across processes, platforms and Python runs."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class Streams:
    """Two RNG streams over torch's global generators: shared (samplers) and per-rank.

    The per-rank stream is the ambient one. Every training-mode ``Sampler.gates`` call is
    wrapped to run on the shared stream, which all ranks seed identically per step.
    """

    def __init__(self, samplers: Iterable[Sampler], seed: int, rank: int, device: torch.device) -> None:
        self.samplers = list({id(s): s for s in samplers}.values())
        self.seed, self.rank = seed, rank
        self.cuda = device if device.type == "cuda" else None
        self.shared: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def _capture(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return torch.get_rng_state(), torch.cuda.get_rng_state(self.cuda) if self.cuda is not None else None

    def _restore(self, state: tuple[torch.Tensor, torch.Tensor | None]) -> None:
        torch.set_rng_state(state[0])
        if self.cuda is not None and state[1] is not None:
            torch.cuda.set_rng_state(state[1], self.cuda)

    def begin_step(self, step: int) -> None:
        torch.manual_seed(derive_seed(self.seed, "shared", step))
        self.shared = self._capture()
        torch.manual_seed(derive_seed(self.seed, "rank", self.rank, step))

    def _wrap(self, gates: Callable[..., Any]) -> Callable[..., Any]:
        def shared_gates(partition: Any, training: bool, device: torch.device) -> Any:
            if not training or self.shared is None:
                return gates(partition, training, device)
            local = self._capture()
            self._restore(self.shared)
            try:
                return gates(partition, training, device)
            finally:
                self.shared = self._capture()
                self._restore(local)

        return shared_gates

    def __enter__(self) -> Streams:
        for sampler in self.samplers:
            sampler.gates = self._wrap(sampler.gates)  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        for sampler in self.samplers:
            sampler.__dict__.pop("gates", None)
