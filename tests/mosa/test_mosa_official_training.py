"""The official training details: the Cars hidden-state regulariser (loss term
``consistency-hidden``) against a hand-written reference, and the official optimizer's rule
(AdamW eps 1e-6, no weight decay on parameters named with "bias")."""

from __future__ import annotations

import pytest
import torch
from adapterkit_mosa import ConsistencyHidden, load_preset
from adapterkit_mosa.consistency import symmetric_kl
from mosa_testlib import VOCAB, mosa_recipe, randomize_deltas
from torch.nn import functional as F

import adapterkit
from adapterkit.optim import adamw
from adapterkit.plugins import get_host

LAYERS = 8  # more than the 6 hidden states the regulariser compares


def deep_bert() -> torch.nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=LAYERS, num_attention_heads=2, intermediate_size=32,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    model = adapterkit.attach(BertModel(config), mosa_recipe(n_cells=2, share="up", r=4))
    randomize_deltas(model)
    return model.train()


def test_hidden_state_term_is_the_official_formula(batch) -> None:
    """loss = CE(o1) + symKL(o1, o2) + 0.01/L * sum_{i<6} MSE(h1_i, h2_i): h_i are the block
    outputs (Hugging Face's hidden_states[1:]); two passes with fresh draws; gradient through both."""
    model = deep_bert()
    labels = torch.tensor([0, 1, 1, 0])

    def forward() -> torch.Tensor:
        return model(**batch).last_hidden_state[:, 0, :2]

    term = get_host().losses["consistency-hidden"]
    assert term is ConsistencyHidden
    torch.manual_seed(3)
    ours = ConsistencyHidden()(forward, lambda logits: F.cross_entropy(logits, labels))
    torch.manual_seed(3)  # the same draws, by hand
    p1, p2 = (model(**batch, output_hidden_states=True) for _ in range(2))
    o1, o2 = p1.last_hidden_state[:, 0, :2], p2.last_hidden_state[:, 0, :2]
    h1, h2 = p1.hidden_states[1:], p2.hidden_states[1:]  # one per layer, after the embeddings
    assert len(h1) == LAYERS and not torch.equal(h1[-1], h2[-1])  # fresh draws per pass
    deep = sum(((a - b) ** 2).mean() for a, b in zip(h1[:6], h2[:6], strict=True)) / LAYERS * 0.01
    reference = F.cross_entropy(o1, labels) + symmetric_kl(o1, o2) + deep
    torch.testing.assert_close(ours, reference)
    assert deep > 0
    grads = torch.autograd.grad(deep, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)  # no stop-gradient on the hidden states
    assert "consistency-hidden" == load_preset("fgvc-cars").training["loss"]


def test_official_optimizer_rule_no_decay_on_biases_and_eps(batch, loss) -> None:
    """adamw(no_decay=[...]) puts every parameter whose name contains a word in a group without
    weight decay (the official rule: "bias", "LayerNorm.bias", "LayerNorm.weight"); eps reaches
    the groups. Checked against torch's AdamW with the same two groups."""
    preset = load_preset("vtab", r=4)
    t = preset.training
    torch.manual_seed(0)
    from mosa_testlib import tiny_bert

    recipe = {"adapter": {**preset.recipe.to_dict()["adapter"], "dropout": 0.0}}  # dense: AdamW is the reference
    ours, theirs = (adapterkit.attach(tiny_bert(), recipe) for _ in range(2))
    optimizer = adamw(ours, lr=t["lr"], weight_decay=t["weight_decay"], eps=t["eps"], no_decay=t["no_decay"])
    groups = {g["name"]: g for g in optimizer.param_groups}
    named = {id(p): n for n, p in ours.named_parameters()}
    exempt = {named[id(p)] for p in groups["no decay"]["params"]}
    assert exempt and all("bias" in n for n in exempt) and groups["no decay"]["weight_decay"] == 0.0
    assert all("bias" not in named[id(p)] for p in groups["adapters"]["params"])
    assert any(n.endswith("norm.weight") for n in (named[id(p)] for p in groups["adapters"]["params"]))
    assert {g["eps"] for g in optimizer.param_groups} == {1e-6}
    trainable = [(n, p) for n, p in theirs.named_parameters() if p.requires_grad]
    reference = torch.optim.AdamW(
        [{"params": [p for n, p in trainable if "bias" not in n], "weight_decay": 0.01},
         {"params": [p for n, p in trainable if "bias" in n], "weight_decay": 0.0}],
        lr=t["lr"], eps=1e-6, foreach=False,
    )
    for model in (ours, theirs):
        randomize_deltas(model)
        model.train()
    for _ in range(4):
        for model, opt in ((ours, optimizer), (theirs, reference)):
            loss(model, batch).backward()
            opt.step()
            opt.zero_grad()
    for (name, a), b in zip(adapterkit.adapter_state_dict(ours).items(),
                            adapterkit.adapter_state_dict(theirs).values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)


def test_workflow_config_takes_eps_and_no_decay() -> None:
    from adapterkit.workflows.config import ConfigError, OptimConfig

    assert OptimConfig(eps=1e-6, no_decay=["bias"]).no_decay == ("bias",)
    with pytest.raises(ConfigError, match="optim.no_decay' must be a list of names"):
        OptimConfig(no_decay="bias")
