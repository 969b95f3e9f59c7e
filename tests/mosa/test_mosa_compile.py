"""``torch.compile(fullgraph=True)`` captures a MoSA training step: draws stay on the device.

The ``aot_eager`` backend runs dynamo's full-graph capture and AOT autograd (where a host
sync or data-dependent Python branch would break the graph) without inductor's C++
build; the benchmark exercises inductor.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from mosa_testlib import randomize_deltas, split_modules

from adapterkit.optim import adamw


@pytest.mark.parametrize("splitter", ["mosa", "hierarchical"])
def test_compiled_training_step_confines_gradients_and_never_recompiles(make_model, batch, loss, splitter) -> None:
    torch._dynamo.reset()
    model = make_model(splitter=splitter, share="none")
    randomize_deltas(model)
    optimizer = adamw(model, lr=1e-2, weight_decay=0.1)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    split = split_modules(model)
    model.train()
    seen: set[int] = set()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(6):
            loss(compiled, batch).backward()
            before = [(m.delta.detach().clone(), m.touched.clone()) for m in split]
            for m, (_, touched) in zip(split, before, strict=True):
                active = touched[m.cell_ids.long()]
                assert torch.all(m.delta.grad[:, ~active] == 0)
                assert (m.delta.grad[:, active] != 0).float().mean() > 0.5  # (a sparse `up` can block some)
                if splitter == "mosa":
                    assert int(touched.sum()) == 1
                seen.add(int(touched.nonzero()[0]))
            optimizer.step()
            optimizer.zero_grad()
            for m, (delta, touched) in zip(split, before, strict=True):
                inactive = ~touched[m.cell_ids.long()]
                assert torch.equal(m.delta[:, inactive], delta[:, inactive])
    assert len(seen) > 1  # fresh draws inside the one compiled graph
