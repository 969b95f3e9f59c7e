"""Randomness under data parallelism: samplers draw from a stream every rank shares (the
same MoSA cells everywhere, as one process would draw), everything else (dropout,
routing noise) from a per-rank stream (independent noise per example, as in one
process); both re-derived from (seed, step)."""

from __future__ import annotations

import torch
from wf_helpers import mlp_config

from adapterkit import workflows
from adapterkit.attach import sites
from adapterkit.roles import Partition
from adapterkit.workflows.distributed import Streams, derive_seed


class Recorder:
    """A sampler stand-in recording its training draws (torch's global RNG, like MoSA's)."""

    def __init__(self) -> None:
        self.draws: list[int] = []

    def gates(self, partition: Partition, training: bool, device: torch.device) -> torch.Tensor:
        index = int(torch.randint(partition.n_cells, ()))
        self.draws.append(index)
        return torch.nn.functional.one_hot(torch.tensor(index), partition.n_cells).float()


def _step(rank: int, step: int) -> tuple[list[int], torch.Tensor]:
    sampler = Recorder()
    with Streams([sampler], seed=7, rank=rank, device=torch.device("cpu")) as streams:
        streams.begin_step(step)
        noise = []
        for _ in range(3):  # three layers: sampler draw, then per-example noise
            sampler.gates(Partition(n_cells=8), True, torch.device("cpu"))
            noise.append(torch.rand(4))
    assert "gates" not in sampler.__dict__  # unwrapped again
    return sampler.draws, torch.stack(noise)


def test_sampler_draws_shared_noise_per_rank() -> None:
    draws0, noise0 = _step(0, 5)
    draws1, noise1 = _step(1, 5)
    assert draws0 == draws1  # every rank trains the same cells
    assert not torch.equal(noise0, noise1)  # examples on different ranks get independent noise
    again, later = _step(0, 5), _step(0, 6)
    assert again[0] == draws0 and torch.equal(again[1], noise0)  # a function of (seed, step) alone
    assert not torch.equal(later[1], noise0)
    # the shared stream continues across layers (fresh draw per forward), it is not re-seeded per call
    torch.manual_seed(derive_seed(7, "shared", 5))
    assert draws0 == [int(torch.randint(8, ())) for _ in range(3)]


def test_scheduled_sampler_gets_training_progress() -> None:
    config = mlp_config(train={"steps": 4})
    config["recipe"].update(
        splitter={"name": "hierarchical", "levels": [2, 4]},
        sampler={"name": "hierarchical", "schedule": "coarse-to-fine"},
    )
    result = workflows.train(workflows.from_dict(config), progress=False, echo=lambda _: None)
    samplers = {id(s.sampler): s.sampler for s in sites(result.classifier.body).values()}
    assert len(samplers) == 1
    (sampler,) = samplers.values()
    assert float(sampler.progress) == 3 / 4  # set before the last of 4 steps
