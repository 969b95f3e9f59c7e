"""PEFT ``LORA`` folders both ways, against PEFT 0.21 itself: a SEQ_CLS adapter with its head
(``modules_to_save``), ``rank_pattern``/``alpha_pattern`` and rsLoRA on real MiniLM; plain
LoRA on a small T5; every exported folder loads in ``PeftModel.from_pretrained`` unchanged."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peftlib import SEQ_CLS, TOL, max_diff, minilm_inputs, output, randomize, randomize_trainable, t5_inputs

import adapterkit
from adapterkit import PeftInteropError, export_peft, export_peft_tasks, import_peft
from adapterkit.peft_interop import from_peft, read_peft


def peft_loads(base: torch.nn.Module, folder: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The output of ``base`` with the folder loaded by PEFT itself."""
    return output(PeftModel.from_pretrained(copy.deepcopy(base), folder).eval(), inputs)


@pytest.mark.parametrize("rslora", [False, True])
def test_seq_cls_adapter_with_head_and_patterns_round_trips(seqcls, tmp_path, rslora: bool) -> None:
    inputs = minilm_inputs()
    peft_model = get_peft_model(copy.deepcopy(seqcls), LoraConfig(**SEQ_CLS, use_rslora=rslora)).eval()
    randomize(peft_model, ("lora_", "modules_to_save"), seed=5)  # the head's trained copy too
    peft_model.save_pretrained(tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["modules_to_save"] == [
        "classifier", "score"]
    reference = output(peft_model, inputs)

    ours = import_peft(copy.deepcopy(seqcls), str(tmp_path / "peft")).eval()
    recipe = adapterkit.recipe_of(ours)
    assert recipe is not None and recipe.modules_to_save == ("classifier",)
    ranks = {n: s.config.r for n, s in adapterkit.sites(ours).items()}
    layer = "bert.encoder.layer.{}.attention.self.{}"
    assert ranks[layer.format(1, "query")] == 8 and ranks[layer.format(3, "value")] == 2
    assert [s.name for s in adapterkit.summary(ours).saved] == ["classifier"]
    imported = output(ours, inputs)
    print(f"SEQ_CLS import (rslora={rslora}): max |ours - PEFT| = {max_diff(imported, reference):.3g}")
    assert max_diff(imported, reference) <= TOL
    assert max_diff(imported, output(seqcls, inputs)) > 1e-2  # the adapter and the head do something

    export_peft(ours, str(tmp_path / "back"))
    config = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["classifier"] and config["rank_pattern"] and config["alpha_pattern"]
    exported = peft_loads(seqcls, str(tmp_path / "back"), inputs)
    again = output(import_peft(copy.deepcopy(seqcls), str(tmp_path / "back")).eval(), inputs)
    print(f"SEQ_CLS export (rslora={rslora}): PEFT {max_diff(exported, reference):.3g}, "
          f"re-import {max_diff(again, reference):.3g}")
    assert max_diff(exported, reference) <= TOL and max_diff(again, reference) <= TOL


def test_our_lora_with_overrides_and_head_exports(seqcls, tmp_path) -> None:
    recipe = {"adapter": {"kind": "lora", "targets": ["query", "value", "attention.output.dense"], "r": 4,
                          "alpha": 8, "overrides": {"value": {"r": 2, "alpha": 3}, "layer.0.attention.self.query":
                                                    {"alpha": 1}},
                          "modules_to_save": ["classifier", "attention.output.LayerNorm"]}}
    ours = adapterkit.attach(copy.deepcopy(seqcls), recipe).eval()
    randomize_trainable(ours, seed=2)
    inputs = minilm_inputs()
    config = export_peft(ours, str(tmp_path / "peft"))
    assert (config["r"], config["lora_alpha"]) == (4, 8.0)  # the commonest; the others as patterns
    assert len(config["rank_pattern"]) == 6 and len(config["alpha_pattern"]) == 7
    diff = max_diff(peft_loads(seqcls, str(tmp_path / "peft"), inputs), output(ours, inputs))
    print(f"plain LoRA with overrides and head: PEFT load max diff {diff:.3g}")
    assert diff <= TOL


def test_merged_mosa_over_lora_exports(seqcls, tmp_path) -> None:
    recipe = {"adapter": {"kind": "lora", "targets": ["query", "value"], "r": 4},
              "splitter": {"name": "mosa", "n_cells": 4, "share": "down"}, "sampler": {"name": "mosa"},
              "merger": {"name": "mosa"}}
    ours = adapterkit.attach(copy.deepcopy(seqcls), recipe).eval()
    randomize_trainable(ours, seed=3)
    inputs = minilm_inputs()
    with pytest.raises(PeftInteropError, match="split into cells; merge it first"):
        export_peft(ours, str(tmp_path / "split"))
    before = output(ours, inputs)
    adapterkit.merge(ours)  # leaves a plain LoRA
    export_peft(ours, str(tmp_path / "peft"))
    diff = max_diff(peft_loads(seqcls, str(tmp_path / "peft"), inputs), before)
    print(f"MoSA-over-LoRA merged: PEFT load vs our split eval max diff {diff:.3g}")
    assert diff <= TOL


def test_each_task_of_an_mhr_inventory_exports_as_plain_lora(seqcls, tmp_path) -> None:
    recipe = {"adapter": {"kind": "lora", "targets": ["query", "value"], "skills": 4, "r": 4, "alpha": 1,
                          "modules_to_save": ["classifier"]},
              "splitter": {"name": "mhr", "heads": 8}, "router": {"name": "poly", "tasks": 3}}
    ours = adapterkit.attach(copy.deepcopy(seqcls), recipe).eval()
    randomize_trainable(ours, seed=4, std=0.3)
    inputs = minilm_inputs()
    history = adapterkit.history(ours)
    written = export_peft_tasks(ours, str(tmp_path / "tasks"))
    assert list(written) == [str(tmp_path / "tasks" / f"task-{t}") for t in range(3)]
    assert all(c["peft_type"] == "LORA" and c["modules_to_save"] == ["classifier"] for c in written.values())
    assert adapterkit.history(ours) == history and len(adapterkit.sites(ours)) == 12  # left as it was
    outputs = []
    for task, folder in enumerate(written):
        with adapterkit.route(ours, task):
            routed = output(ours, inputs)
        diff = max_diff(peft_loads(seqcls, folder, inputs), routed)
        print(f"MHR task {task}: PEFT load of the collapsed folder vs routed eval max diff {diff:.3g}")
        assert diff <= TOL
        outputs.append(routed)
    assert max_diff(outputs[0], outputs[1]) > 1e-3  # the tasks really differ
    lora = adapterkit.attach(copy.deepcopy(seqcls), {"adapter": {"kind": "lora", "targets": ["query"]}})
    with pytest.raises(PeftInteropError, match="needs an adapter routed by task ids"):
        export_peft_tasks(lora, str(tmp_path / "none"))


@pytest.mark.parametrize("model_name", ["t5", "minilm"])
def test_plain_lora_import_export_parity(request: pytest.FixtureRequest, tmp_path, model_name: str) -> None:
    base = request.getfixturevalue("t5_base" if model_name == "t5" else "seqcls")
    inputs, targets = (t5_inputs(), ["q", "v"]) if model_name == "t5" else (minilm_inputs(), ["query", "value"])
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=12, target_modules=targets)).eval()
    randomize(peft_model, ("lora_",), seed=3)
    peft_model.save_pretrained(tmp_path / "peft")
    reference = output(peft_model, inputs)
    ours = import_peft(copy.deepcopy(base), str(tmp_path / "peft")).eval()
    assert max_diff(output(ours, inputs), reference) <= TOL
    assert max_diff(output(ours, inputs), output(base, inputs)) > 1e-2
    export_peft(ours, str(tmp_path / "back"))
    assert max_diff(peft_loads(base, str(tmp_path / "back"), inputs), reference) <= TOL


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (LoraConfig(r=4, target_modules=["q"], use_dora=True), "use_dora"),
        (LoraConfig(r=4, target_modules=["q"], bias="lora_only"), "bias"),
        (LoraConfig(r=4, target_modules=["q"], lora_bias=True), "lora_bias"),
    ],
)
def test_what_would_change_the_math_is_refused(t5_base, tmp_path, config: LoraConfig, message: str) -> None:
    get_peft_model(copy.deepcopy(t5_base), config).save_pretrained(tmp_path / "peft")
    with pytest.raises(PeftInteropError, match=message) as info:
        import_peft(copy.deepcopy(t5_base), str(tmp_path / "peft"))
    assert "\n" not in str(info.value)


def test_a_head_the_model_lacks_is_refused(seqcls, tmp_path) -> None:
    get_peft_model(copy.deepcopy(seqcls), LoraConfig(**SEQ_CLS)).save_pretrained(tmp_path / "peft")
    renamed = copy.deepcopy(seqcls)
    renamed.head = renamed.classifier
    del renamed.classifier
    with pytest.raises(adapterkit.AttachError, match=r"no module matches modules_to_save \['classifier'\]"):
        import_peft(renamed, str(tmp_path / "peft"))
    assert not adapterkit.is_attached(renamed)


def test_peft_folder_errors(tmp_path) -> None:
    with pytest.raises(PeftInteropError, match="no adapter_config.json"):
        read_peft(str(tmp_path))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    with pytest.raises(PeftInteropError, match="no adapter_model.safetensors"):
        read_peft(str(tmp_path))
    with pytest.raises(PeftInteropError, match="IA3"):
        from_peft({"peft_type": "IA3"}, {})
    with pytest.raises(PeftInteropError, match="unexpected tensor"):
        from_peft({"peft_type": "LORA", "r": 4}, {"base_model.model.q.lora_magnitude_vector": torch.zeros(4)})
    with pytest.raises(PeftInteropError, match="not a valid regular expression"):
        from_peft({"peft_type": "LORA", "r": 4, "rank_pattern": {"(": 2}},
                  {"base_model.model.q.lora_A.weight": torch.zeros(4, 8),
                   "base_model.model.q.lora_B.weight": torch.zeros(8, 4)})
    with pytest.raises(PeftInteropError, match=r"'q': lora_A.weight \(4, 8\) and .* do not hold rank 2"):
        from_peft({"peft_type": "LORA", "r": 4, "rank_pattern": {"q": 2}},
                  {"base_model.model.q.lora_A.weight": torch.zeros(4, 8),
                   "base_model.model.q.lora_B.weight": torch.zeros(8, 4)})
