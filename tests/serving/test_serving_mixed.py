"""Mixed-adapter batches: each example's output equals running it alone with its adapter
(LoRA on Linear, Conv1D and Embedding; bottleneck; MoSA-merged; collapsed Poly tasks), and
PEFT's ``adapter_names`` on the same adapters; generate with beams; torch.compile; refusals."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch
from servinglib import ATOL, gpt2, llama, logits, lora, randomize, tokens
from torch import nn

import adapterkit
from adapterkit.errors import AdapterkitError, RoutingError

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def served(make: Any, recipes: dict[str, dict[str, Any]]) -> tuple[nn.Module, dict[str, nn.Module]]:
    """A model serving ``recipes`` (random values) and, per name, a model with only that adapter."""
    model, singles = make(), {}
    for seed, (name, recipe) in enumerate(recipes.items()):
        adapterkit.attach(model, recipe, name=name)
        randomize(model, seed)
        single = adapterkit.attach(make(), recipe)
        single.load_state_dict(adapterkit.adapter_state_dict(model), strict=False)
        singles[name] = single
    singles["__base__"] = make()
    adapterkit.serve(model)
    return model, singles


def check_each_example(model: nn.Module, singles: dict[str, nn.Module], choice: list[Any], ids: torch.Tensor) -> None:
    out = logits(model, ids, adapter_names=choice)
    for i, name in enumerate(choice):
        torch.testing.assert_close(out[i], logits(singles[name or "__base__"], ids[i:i + 1])[0], **ATOL)


def test_llama_lora_of_several_ranks_and_no_adapter() -> None:
    recipes = {"r4": lora(TARGETS, 4, 8.0), "r8": lora(TARGETS, 8), "r16": lora(TARGETS, 16, 4.0),
               "rs": lora(TARGETS, 2, 2.0, dtype="base")}
    model, singles = served(llama, recipes)
    choice = ["r16", "r4", None, "r8", "rs", "r4", "__base__", "r16"]
    ids = tokens(len(choice), 9)
    check_each_example(model, singles, choice, ids)
    expected = logits(model, ids, adapter_names=choice)
    slots = adapterkit.adapter_ids(model, choice)
    assert slots.tolist() == [2, 0, 4, 1, 3, 0, 4, 2]  # slots in attach order; 4: no adapter
    torch.testing.assert_close(logits(model, ids, task_ids=slots), expected, rtol=0, atol=0)
    torch.testing.assert_close(logits(model, ids, task_ids=torch.where(slots == 4, -1, slots)), expected,
                               rtol=0, atol=0)
    with adapterkit.route(model, choice):
        torch.testing.assert_close(logits(model, ids), expected, rtol=0, atol=0)
    one = logits(model, ids, adapter_names=["r8"])  # one choice for the whole batch
    torch.testing.assert_close(one, logits(singles["r8"], ids), **ATOL)


def test_gpt2_conv1d_and_embedding() -> None:
    targets = ["c_attn", "c_fc", "wte"]
    recipes = {"a": lora(targets, 4, 8.0), "b": lora(targets, 8)}
    model, singles = served(gpt2, recipes)
    choice = ["b", "a", None, "a", "b"]
    check_each_example(model, singles, choice, tokens(len(choice), 8))


def test_bottleneck_adapters_of_several_sizes() -> None:
    recipes = {s: {"adapter": {"kind": "bottleneck", "targets": ["mlp"], "r": r, "scale": scale, "dropout": 0.0}}
               for s, r, scale in (("small", 4, 0.5), ("large", 12, 2.0))}
    model, singles = served(gpt2, recipes)
    check_each_example(model, singles, ["large", None, "small", "large"], tokens(4, 8))


def test_mosa_merged_adapters() -> None:
    """MoSA over LoRA, merged (the mean of its sparse modules: a plain LoRA), served."""
    recipe = {"seed": 0, "adapter": {"kind": "lora", "targets": ["q_proj", "v_proj"], "r": 8},
              "splitter": {"name": "mosa", "share": "down", "n_cells": 4}, "sampler": {"name": "mosa"},
              "merger": {"name": "mosa"}}
    model, singles = llama(), {"__base__": llama()}
    for seed, name in enumerate(("m0", "m1", "m2")):
        trained = adapterkit.attach(llama(), recipe)
        randomize(trained, seed)
        adapterkit.merge(trained)
        adapterkit.save(trained, f"memory://mosa-merged/{name}.safetensors")
        adapterkit.load(f"memory://mosa-merged/{name}.safetensors", model, name=name)
        singles[name] = trained
    adapterkit.serve(model)
    check_each_example(model, singles, ["m2", "m0", "m1", None, "m0"], tokens(5, 7))


@pytest.mark.parametrize("heads", [1, 2], ids=["poly", "mhr"])
def test_collapsed_poly_and_mhr_tasks(heads: int) -> None:
    """A Poly (MHR: 2 heads) inventory's tasks, each collapsed to a plain LoRA, served side by side."""
    recipe: dict[str, Any] = {
        "adapter": {"kind": "lora", "targets": ["q_proj", "v_proj"], "skills": 4, "r": 4, "alpha": 1},
        "router": {"name": "poly" if heads == 1 else "mhr", "tasks": 3},
    }
    if heads > 1:
        recipe["splitter"] = {"name": "mhr", "heads": heads}
    inventory = adapterkit.attach(llama(), recipe)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for site in adapterkit.sites(inventory).values():
            for p in site.adapter_parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    adapterkit.save(inventory, "memory://poly/inventory.safetensors")
    model = llama()
    for task in range(3):
        adapterkit.load("memory://poly/inventory.safetensors", model, name=f"task{task}")
        adapterkit.merge(model, "collapse", task=task)
    adapterkit.serve(model)
    choice = ["task2", "task0", "task1", "task1", None]
    ids = tokens(len(choice), 7)
    with adapterkit.route(inventory, [2, 0, 1, 1, 0]):
        routed = logits(inventory, ids)
    out = logits(model, ids, adapter_names=choice)
    torch.testing.assert_close(out[:4], routed[:4], **ATOL)  # the inventory routed per example
    torch.testing.assert_close(out[4], logits(llama(), ids[4:])[0], **ATOL)


def test_matches_peft_adapter_names(tmp_path: Any) -> None:
    from peft import PeftModel

    targets = ["q_proj", "v_proj", "down_proj"]
    recipes = {"a": lora(targets, 4, 8.0), "b": lora(targets, 8), "c": lora(targets, 16, 4.0)}
    model, _ = served(llama, recipes)
    adapterkit.activate(model, "a")  # leave serving to export each adapter
    for name in recipes:
        adapterkit.activate(model, name)
        adapterkit.export_peft(model, str(tmp_path / name))
    adapterkit.serve(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(llama(), str(tmp_path / "a"), adapter_name="a")
        for name in ("b", "c"):
            peft_model.load_adapter(str(tmp_path / name), adapter_name=name)
    peft_model.eval()
    choice = ["c", "a", "__base__", "b", "a", "c"]
    ids = tokens(len(choice), 9)
    with torch.no_grad():
        theirs = peft_model(input_ids=ids, adapter_names=choice).logits
    torch.testing.assert_close(logits(model, ids, adapter_names=choice), theirs, **ATOL)


def test_greedy_generation_of_32_prompts_each_with_its_own_adapter() -> None:
    model = llama()
    names = [f"p{i}" for i in range(32)]
    for seed, name in enumerate(names):
        adapterkit.attach(model, lora(["q_proj", "v_proj"], 2 + seed % 3 * 2), name=name)
        randomize(model, seed, std=0.5)
    adapterkit.serve(model)
    prompts = tokens(32, 6, seed=1)
    together = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=6,
                              do_sample=False, pad_token_id=0, adapter_names=names)
    beams = model.generate(input_ids=prompts[:4], attention_mask=torch.ones_like(prompts[:4]), max_new_tokens=4,
                           do_sample=False, num_beams=3, pad_token_id=0, adapter_names=names[:4])
    for i, name in enumerate(names):
        one = prompts[i:i + 1]
        alone = model.generate(input_ids=one, attention_mask=torch.ones_like(one), max_new_tokens=6,
                               do_sample=False, pad_token_id=0, adapter_names=[name])
        assert same_tokens(together[i], alone[0]), name
        if i < 4:
            alone = model.generate(input_ids=one, attention_mask=torch.ones_like(one), max_new_tokens=4,
                                   do_sample=False, num_beams=3, pad_token_id=0, adapter_names=[name])
            assert same_tokens(beams[i], alone[0]), name
    distinct = {tuple(row.tolist()) for row in together[:, 6:]}
    assert len(distinct) > 8  # the adapters really differ


def same_tokens(batched: torch.Tensor, alone: torch.Tensor) -> bool:
    """Equal, up to the padding a batch adds after an example's end of sequence."""
    n = alone.shape[0]
    return torch.equal(batched[:n], alone) and bool((batched[n:] == 0).all())


def test_compiled_mixed_batch_has_no_graph_breaks() -> None:
    torch._dynamo.reset()
    model, _ = served(llama, {"a": lora(["q_proj", "v_proj"], 4), "b": lora(["q_proj", "v_proj"], 8)})
    ids = tokens(4, 6)
    slots = adapterkit.adapter_ids(model, ["b", None, "a", "b"])
    expected = logits(model, ids, task_ids=slots)
    explanation = torch._dynamo.explain(model)(input_ids=ids, task_ids=slots)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(input_ids=ids, task_ids=slots).logits, expected, **ATOL)
        with pytest.raises(RuntimeError, match=r"adapter ids must lie in \[-1, 2\]"):
            compiled(input_ids=ids, task_ids=torch.tensor([0, 5, 1, 1]))


def test_refusals_are_one_line_and_change_nothing() -> None:
    recipes = {"a": lora(["q_proj", "v_proj"], 4), "b": lora(["q_proj", "v_proj"], 8)}
    model, _ = served(llama, recipes)
    ids = tokens(3, 5)
    cases = [
        (RoutingError, "no adapter named 'z' is served; served: \\['a', 'b'\\]", dict(adapter_names=["a", "z", None])),
        (RoutingError, r"adapter ids must lie in \[-1, 2\]", dict(task_ids=[0, 3, 1])),
        (RoutingError, "3 adapter choices|adapter choices for a batch", dict(adapter_names=["a", "b"])),
        (RoutingError, "pass task_ids= or adapter_names=, not both", dict(adapter_names=["a"], task_ids=[0])),
    ]
    for error, message, kwargs in cases:
        with pytest.raises(error, match=message) as info:
            logits(model, ids, **kwargs)
        assert "\n" not in str(info.value)
    for call in (lambda: adapterkit.save(model, "memory://x.safetensors"), lambda: adapterkit.merge(model)):
        with pytest.raises(AdapterkitError, match=r"serves several adapters in mixed batches; adapterkit.activate"):
            call()
    with pytest.raises(AdapterkitError, match="no named adapter 'z'"):
        adapterkit.serve(model, ["a", "z"])
    adapterkit.attach(model, {"adapter": {"kind": "lora", "targets": ["q_proj", "v_proj"], "skills": 2},
                              "router": {"name": "poly", "tasks": 2}}, name="poly")  # leaves serving
    with pytest.raises(RoutingError, match=r"adapter_names= picks adapters in mixed batches: adapterkit.serve"):
        logits(model, ids, adapter_names=["a", "b", None])
    adapterkit.delete(model, "poly")
    adapterkit.activate(model, "a")
    adapterkit.merge(model, "fold")
    with pytest.raises(AdapterkitError, match="folded into the base weights"):
        adapterkit.serve(model)


def test_routed_adapters_must_be_collapsed_first() -> None:
    model = llama()
    adapterkit.attach(model, {"adapter": {"kind": "lora", "targets": ["q_proj"], "skills": 2},
                              "router": {"name": "poly", "tasks": 2}}, name="poly")
    with pytest.raises(AdapterkitError, match="holds 2 routed skills; serve its tasks one by one"):
        adapterkit.serve(model)
    assert adapterkit.active_adapter(model) == "poly"  # a refused serve leaves the model as it was
    unnamed = adapterkit.attach(llama(), {"adapter": {"kind": "lora", "targets": ["q_proj"], "skills": 2},
                                          "router": {"name": "poly", "tasks": 2}})
    with pytest.raises(AdapterkitError, match="holds 2 routed skills"):
        adapterkit.serve(unnamed)
    assert adapterkit.adapters(unnamed) == [] and adapterkit.summary(unnamed).trainable > 0  # still unnamed
    bare = llama()
    with pytest.raises(AdapterkitError, match="nothing to serve"):
        adapterkit.serve(bare)
    with pytest.raises(AdapterkitError, match="nothing to serve: .* the library selection is empty"):
        adapterkit.serve(bare, library=adapterkit.Library.init("memory://empty-serving-library"))
    assert not adapterkit.is_attached(bare)


def test_a_served_model_moves_with_the_base() -> None:
    model, singles = served(llama, {"a": lora(["q_proj"], 4)})
    moved = copy.deepcopy(model).to(torch.float64)  # every slot moves with the model
    assert all(p.dtype == torch.float64 for p in moved.parameters())
    ids = tokens(2, 5)
    torch.testing.assert_close(logits(moved, ids, adapter_names=["a", None]).float(),
                               logits(model, ids, adapter_names=["a", None]), **ATOL)


def test_a_library_as_the_store_loads_on_first_use_with_an_lru_bound() -> None:
    from adapterkit import Library

    library = Library.init("memory://serving-library")
    singles = {"__base__": llama()}
    for seed, r in enumerate((2, 4, 8, 4, 2)):
        single = adapterkit.attach(llama(), lora(["q_proj", "v_proj"], r, float(r)))
        randomize(single, seed)
        library.add(single, f"lib{seed}", tags=["odd"] if seed % 2 else [])
        singles[f"lib{seed}"] = single
    model = llama()
    adapterkit.attach(model, lora(["q_proj", "v_proj"], 16), name="pinned")
    randomize(model, 7)
    pinned = adapterkit.attach(llama(), lora(["q_proj", "v_proj"], 16))
    pinned.load_state_dict(adapterkit.adapter_state_dict(model), strict=False)
    singles["pinned"] = pinned
    adapterkit.serve(model, library=library, resident=2)
    serving = adapterkit.serving.serving_of(model)
    assert adapterkit.served(model) == ["pinned", None, None] and serving.loads == 0  # nothing read yet
    ids = tokens(4, 6)
    check_each_example(model, singles, ["lib0", "pinned", "lib3", None], ids)
    assert serving.loads == 2 and adapterkit.served(model) == ["pinned", "lib0", "lib3"]
    check_each_example(model, singles, ["lib3", "lib3", "pinned", "lib3"], ids)  # resident: no read
    assert serving.loads == 2
    check_each_example(model, singles, ["lib4", "lib3", None, "lib4"], ids)  # lib0 least recently used: out
    assert serving.loads == 3 and adapterkit.served(model) == ["pinned", "lib4", "lib3"]
    check_each_example(model, singles, ["lib0", "lib1", "pinned", "lib0"], ids)  # both evicted in turn
    assert adapterkit.served(model) == ["pinned", "lib0", "lib1"]
    with pytest.raises(RoutingError, match="this batch names 3 library adapters but 2 slots are free"):
        logits(model, ids, adapter_names=["lib2", "lib3", "lib4", "pinned"])
    with pytest.raises(RoutingError, match="no adapter named 'lib9' is served"):
        logits(model, ids, adapter_names=["lib9", None, None, None])
    assert adapterkit.served(model) == ["pinned", "lib0", "lib1"]  # refused batches load nothing

    selective = llama()
    adapterkit.serve(selective, library=library, entries=library.select(tags="odd"), resident=1)
    check_each_example(selective, singles, ["lib3", None, "lib3", "lib3"], ids)
    with pytest.raises(RoutingError, match="no adapter named 'lib0' is served"):
        logits(selective, ids, adapter_names=["lib0", None, None, None])


def test_a_serving_model_reports_its_packed_sites() -> None:
    model, _ = served(llama, {"a": lora(["q_proj"], 4), "b": lora(["q_proj"], 8)})
    report = adapterkit.summary(model)
    assert [s.name for s in report.sites] == [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]
    assert report.trainable == 0  # serving is inference: the packs do not train
    assert str(report).endswith(f"trainable 0 of {report.total:,} parameters (0.000%)")
