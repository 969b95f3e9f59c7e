"""Parity with PEFT itself for the poly plugin's ``POLY`` format: Poly/MHR, import and export, eval
and training mode (LoRA folders: tests/peft)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import PeftModel
from peft.tuners.poly.layer import PolyLayer
from polylib import MODELS, output, peft_poly

import adapterkit
from adapterkit import PeftInteropError, export_peft, import_peft
from adapterkit.errors import AdapterkitError
from adapterkit.peft_interop import from_peft

TOL = 1e-5
CASES = [(model, heads) for model in MODELS for heads in (1, MODELS[model][3])]


def _peft_grads(peft_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """PEFT gradients under the saved-file key names (adapter name dropped)."""
    return {n.replace(".default", ""): p.grad for n, p in peft_model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(("model_name", "heads"), CASES)
def test_poly_import_export_parity(request: pytest.FixtureRequest, tmp_path, model_name: str, heads: int) -> None:
    fixture, make_inputs, targets, _ = MODELS[model_name]
    base = request.getfixturevalue(fixture)
    inputs, task_ids = make_inputs(), torch.tensor([0, 2, 1, 2, 0])
    peft_model = peft_poly(base, heads=heads, targets=targets).eval()
    peft_model.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        reference = output(peft_model.base_model, inputs, task_ids=task_ids)

    ours = import_peft(copy.deepcopy(base), str(tmp_path / "peft")).eval()
    assert len(adapterkit.sites(ours)) == sum(isinstance(m, PolyLayer) for m in peft_model.modules())
    with torch.no_grad(), adapterkit.route(ours, task_ids):
        imported = output(ours, inputs)
    assert (imported - reference).abs().max().item() <= TOL

    export_peft(ours, str(tmp_path / "back"))
    back = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "back")).eval()
    with torch.no_grad():
        exported = output(back.base_model, inputs, task_ids=task_ids)
    assert (exported - reference).abs().max().item() <= TOL

    # training mode: the same uniform noise (same seed, same draw order) gives the same
    # relaxed-Bernoulli weights, outputs and gradients
    peft_model.train()
    ours.train()
    torch.manual_seed(123)
    peft_out = output(peft_model.base_model, inputs, task_ids=task_ids)
    peft_out.square().mean().backward()
    torch.manual_seed(123)
    with adapterkit.route(ours, task_ids):
        our_out = output(ours, inputs)
    our_out.square().mean().backward()
    assert (our_out - peft_out).abs().max().item() <= TOL
    assert (our_out - output(peft_model.base_model, inputs, task_ids=task_ids)).abs().max() > 1e-6  # noise is live
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    _, expected = from_peft(config, _peft_grads(peft_model))
    ours_grads = {f"{n}.{k}": p.grad for n, s in adapterkit.sites(ours).items() for k, p in s.named_parameters()
                  if p.grad is not None}
    assert set(ours_grads) == set(expected)
    for key, grad in expected.items():
        torch.testing.assert_close(ours_grads[key], grad, rtol=1e-4, atol=1e-6, msg=key)


def test_export_refuses_what_peft_cannot_express(t5_base, tmp_path) -> None:
    from polylib import poly_recipe

    scaled = adapterkit.attach(copy.deepcopy(t5_base), poly_recipe(["q"], r=4, **{"alpha": 2}))
    with pytest.raises(PeftInteropError, match="exactly 1/r"):
        export_peft(scaled, str(tmp_path / "a"))
    uniform = adapterkit.attach(copy.deepcopy(t5_base), poly_recipe(["q"], router="uniform"))
    with pytest.raises(PeftInteropError, match="collapse"):
        export_peft(uniform, str(tmp_path / "b"))
    assert issubclass(PeftInteropError, AdapterkitError)
