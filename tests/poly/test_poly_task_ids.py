"""Task ids the Hugging Face way: the ``task_ids=`` forward keyword of a routed model,
``route`` through DDP / DataParallel / ``torch.compile`` wrappers, and ``generate`` with
beams and several returned sequences, where each example's id follows its beams.

References are independent of the feature under test: the keyword against ``route``,
batched generation against generating each example alone with its own id."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
import torch._dynamo
import torch.distributed as dist
from torch import nn

import adapterkit
from adapterkit import RoutingError

POLY = {"router": {"name": "poly", "tasks": 3}}


@torch.no_grad()
def randomize(model: nn.Module, std: float = 0.5) -> None:
    """Non-zero adapter and router weights, so every task routes differently."""
    g = torch.Generator().manual_seed(0)
    for p in model.parameters():
        if p.requires_grad:
            p.copy_(torch.randn(p.shape, generator=g) * std)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 10))
    adapterkit.attach(model, {"adapter": {"kind": "lora", "targets": ["0", "2"], "r": 4, "skills": 4}, **POLY})
    randomize(model)
    return model.eval()


X, IDS = torch.randn(6, 16, generator=torch.Generator().manual_seed(1)), torch.tensor([2, 0, 1, 1, 0, 2])


def test_keyword_routes_like_route_and_restores() -> None:
    model = mlp()
    with adapterkit.route(model, IDS):
        expected = model(X)
    torch.testing.assert_close(model(X, task_ids=IDS), expected, rtol=0, atol=0)
    torch.testing.assert_close(model(X, task_ids=IDS.tolist()), expected, rtol=0, atol=0)
    assert not torch.equal(model(X, task_ids=torch.zeros(6, dtype=torch.long)), expected)  # ids matter
    assert model[0].routing.task_ids is None
    with adapterkit.route(model, 1):  # the keyword nests inside route and restores it
        model(X, task_ids=IDS)
        assert model[0].routing.task_ids.tolist() == [1]
    with pytest.raises(RoutingError, match=r"^task ids must lie in \[0, 3\); out of range: \[7\]"):
        model(X, task_ids=[0, 7, 1, 1, 0, 2])
    with pytest.raises(RoutingError, match="6 task ids for a batch of 5"):
        model(X[:5], task_ids=IDS)
    assert model[0].routing.task_ids is None  # restored after the failed forward too


def test_copies_and_pickles_keep_the_keyword() -> None:
    import copy
    import io

    model = mlp()
    expected = model(X, task_ids=IDS)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for other in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        assert other.forward.model is other  # bound to the copy, not to the original
        torch.testing.assert_close(other(X, task_ids=IDS), expected, rtol=0, atol=0)


def test_signature_shows_the_keyword_only_while_attached() -> None:
    import inspect

    model = mlp()
    assert list(inspect.signature(model.forward).parameters) == ["input", "task_ids"]
    adapterkit.detach(model)
    assert list(inspect.signature(model.forward).parameters) == ["input"]
    assert "forward" not in vars(model)
    with pytest.raises(TypeError):
        model(X, task_ids=IDS)
    plain = nn.Sequential(nn.Linear(16, 4))
    adapterkit.attach(plain, {"adapter": {"kind": "lora", "targets": ["0"], "r": 2}})
    assert "forward" not in vars(plain)  # unrouted models keep their forward untouched


def test_compiled_keyword_has_no_graph_breaks() -> None:
    torch._dynamo.reset()
    model = mlp()
    with adapterkit.route(model, IDS):
        expected = model(X)
    for training in (False, True):
        explanation = torch._dynamo.explain(model.train(training))(X, task_ids=IDS)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert explanation.graph_count == 1
    compiled = torch.compile(model.eval(), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(X, task_ids=IDS), expected)
    with pytest.raises(RuntimeError, match=r"task ids must lie in \[0, 3\)"):  # a device-side assert when compiled
        compiled(X, task_ids=torch.tensor([0, 7, 1, 1, 0, 2]))
    with adapterkit.route(compiled, IDS):  # route sees through the compiled wrapper
        torch.testing.assert_close(compiled(X), expected)


@pytest.fixture
def gloo_world(tmp_path: Any) -> Any:
    """A one-process gloo group, so a real DistributedDataParallel can wrap the model."""
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp_path, 'rendezvous')}", rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()


def test_route_and_keyword_through_ddp_and_data_parallel(gloo_world: Any) -> None:
    model = mlp()
    with adapterkit.route(model, IDS):
        expected = model(X)
    for wrapper in (nn.parallel.DistributedDataParallel(model), nn.DataParallel(model)):
        with adapterkit.route(wrapper, IDS):
            torch.testing.assert_close(wrapper(X), expected, rtol=0, atol=0)
        torch.testing.assert_close(wrapper(X, task_ids=IDS), expected, rtol=0, atol=0)
        assert adapterkit.summary(wrapper) is adapterkit.summary(model)
        assert adapterkit.sites(wrapper).keys() == {"0", "2"}


# --- generate -----------------------------------------------------------------------------

VOCAB = 60
INPUT = torch.randint(2, VOCAB, (3, 5), generator=torch.Generator().manual_seed(1))
TASKS = torch.tensor([2, 0, 1])
NEW = {"max_new_tokens": 5, "min_new_tokens": 5}  # equal lengths: no padding to compare around


def t5() -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                      num_heads=4, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    model = T5ForConditionalGeneration(config)
    adapterkit.attach(model, {"adapter": {"kind": "lora", "targets": ["q", "v"], "r": 4, "skills": 4}, **POLY})
    randomize(model)
    return model.eval()  # after attach: new sites start in training mode (a Poly router samples there)


def gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=1, pad_token_id=0)
    model = GPT2LMHeadModel(config)
    recipe = {"adapter": {"kind": "bottleneck", "targets": ["mlp"], "r": 4, "dropout": 0.0, "d_in": 32, "d_out": 32,
                          "scale": 1.0, "skills": 4}, **POLY}
    adapterkit.attach(model, recipe)
    randomize(model)
    return model.eval()


@pytest.mark.parametrize("make", [t5, gpt2], ids=["t5", "gpt2"])
@pytest.mark.parametrize("options", [{"num_beams": 3}, {"num_beams": 3, "num_return_sequences": 2}],
                         ids=["beams", "beams+sequences"])
def test_generate_expands_task_ids_per_example(make: Any, options: dict[str, int]) -> None:
    model = make()
    k = options.get("num_return_sequences", 1)
    out = model.generate(INPUT, task_ids=TASKS, **NEW, **options)
    assert out.shape[0] == 3 * k
    for i in range(3):
        alone = model.generate(INPUT[i : i + 1], task_ids=TASKS[i : i + 1], **NEW, **options)
        assert torch.equal(out[i * k : (i + 1) * k], alone), i
    with adapterkit.route(model, TASKS):  # route around generate does the same
        assert torch.equal(model.generate(INPUT, **NEW, **options), out)
    others = model.generate(INPUT, task_ids=(TASKS + 1) % 3, **NEW, **options)
    assert not torch.equal(others, out)  # the ids steer the generation
    assert not model.get_submodule(next(iter(adapterkit.sites(model)))).routing.repeat  # only during generate


def test_generate_refuses_ids_that_do_not_divide_the_batch() -> None:
    model = gpt2()
    with pytest.raises(RoutingError, match="2 task ids for a batch of 9, which is not a whole multiple"):
        model.generate(INPUT, task_ids=TASKS[:2], num_beams=3, **NEW)
    with pytest.raises(RoutingError, match="2 task ids for a batch of 3$"):
        model(INPUT, task_ids=TASKS[:2])  # outside generate the batch must match exactly
