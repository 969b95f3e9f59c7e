"""``modules_to_save`` (base modules trained fully and saved with the adapter) and per-site
kind ``overrides``, on a small BERT classifier built from a config."""

from __future__ import annotations

import copy
import json
import struct

import fsspec
import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

import adapterkit
from adapterkit.storage.format import KEY_RECIPE
from adapterkit.storage.tensors import encode

RECIPE = {"adapter": {"kind": "lora", "targets": ["query", "value"], "r": 2,
                      "modules_to_save": ["classifier", "LayerNorm"]}}


def classifier(labels: int = 3) -> nn.Module:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        num_labels=labels)
    return BertForSequenceClassification(config).eval()


BATCH = {"input_ids": torch.randint(0, 100, (4, 7), generator=torch.Generator().manual_seed(1))}
LABELS = torch.tensor([0, 1, 2, 1])


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**BATCH).logits


def trained(base: nn.Module, recipe: dict = RECIPE, steps: int = 3) -> nn.Module:
    model = adapterkit.attach(copy.deepcopy(base), recipe)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(**BATCH).logits, LABELS).backward()
        optimizer.step()
    return model.eval()


def test_modules_to_save_train_and_are_counted_saved_loaded_and_restored(tmp_path) -> None:
    base = classifier()
    model = trained(base)
    saved = ["bert.embeddings.LayerNorm", *(f"bert.encoder.layer.{i}.{part}.LayerNorm" for i in range(2)
                                            for part in ("attention.output", "output")), "classifier"]
    summary = adapterkit.summary(model)
    assert [s.name for s in summary.saved] == saved
    head = sum(p.numel() for n in saved for p in model.get_submodule(n).parameters())
    lora = sum(s.trainable for s in summary.sites)
    assert summary.trainable == lora + head == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert "classifier (saved)" in str(summary) and "+ 6 modules to save" in str(summary)
    assert not model.bert.pooler.dense.weight.requires_grad and model.classifier.weight.requires_grad
    assert not torch.equal(model.classifier.weight, base.classifier.weight)  # it trained
    out = logits(model)

    info = adapterkit.save(model, str(tmp_path / "a.safetensors"))
    assert {"modules_to_save/classifier/weight", "modules_to_save/bert.embeddings.LayerNorm/bias"} <= {
        t.name for t in info.tensors}
    loaded = adapterkit.load(str(tmp_path / "a.safetensors"), copy.deepcopy(base)).eval()
    assert torch.equal(logits(loaded), out)
    assert [s.name for s in adapterkit.summary(loaded).saved] == saved

    with adapterkit.disabled(model):  # the original head and norms run
        assert torch.equal(logits(model), logits(base))
    assert torch.equal(logits(model), out)
    adapterkit.detach(model)
    assert torch.equal(model.classifier.weight, base.classifier.weight)
    assert torch.equal(logits(model), logits(base))
    assert all(p.requires_grad for p in model.parameters())  # as before attach


def test_merge_and_fold_keep_the_modules_to_save(tmp_path) -> None:
    base = classifier()
    model = trained(base)
    out = logits(model)
    adapterkit.merge(model, "fold")
    assert adapterkit.recipe_of(model) is None and (logits(model) - out).abs().max() <= 1e-5
    info = adapterkit.save(model, str(tmp_path / "folded.safetensors"))
    assert info.folded_recipe is not None and info.folded_recipe.modules_to_save == ("classifier", "LayerNorm")
    loaded = adapterkit.load(str(tmp_path / "folded.safetensors"), copy.deepcopy(base))
    assert (logits(loaded) - out).abs().max() <= 1e-5
    adapterkit.detach(loaded)
    assert (logits(loaded) - logits(base)).abs().max() <= 1e-5


def test_overrides_build_per_site_and_round_trip(tmp_path) -> None:
    recipe = {"adapter": {"kind": "lora", "targets": ["query", "value"], "r": 2, "alpha": 4,
                          "overrides": {"value": {"r": 4}, "layer.1.attention.self.query": {"alpha": 1}}}}
    model = trained(classifier(), recipe, steps=1)
    ranks = {n: (s.config.r, s.scale) for n, s in adapterkit.sites(model).items()}
    assert ranks["bert.encoder.layer.0.attention.self.value"] == (4, 1.0)
    assert ranks["bert.encoder.layer.0.attention.self.query"] == (2, 2.0)
    assert ranks["bert.encoder.layer.1.attention.self.query"] == (2, 0.5)
    info = adapterkit.save(model, str(tmp_path / "o.safetensors"))
    assert info.recipe == adapterkit.Recipe.from_dict(recipe)
    loaded = adapterkit.load(str(tmp_path / "o.safetensors"), classifier())
    assert torch.equal(logits(loaded), logits(model))
    adapterkit.merge(model, "identity")  # describe() re-derives the recipe from the sites
    assert adapterkit.recipe_of(model) == adapterkit.Recipe.from_dict(recipe)


@pytest.mark.parametrize(
    ("adapter", "message"),
    [
        ({"overrides": {"value": {"r": 4}, "layer.0.attention.self.value": {"r": 8}}}, r"overrides \[.*\] all match"),
        ({"overrides": {"key": {"r": 4}}}, "overrides pattern 'key' matches no site"),
        ({"overrides": {"value": {"targets": ["x"]}}}, "may set kind arguments only, not 'targets'"),
        ({"overrides": {"value": {"rank": 4}}}, "unknown key 'rank' for adapter kind 'lora' \\(overrides 'value'\\)"),
        ({"modules_to_save": ["attention"]}, "cannot hold or sit inside the adapter site"),
        ({"modules_to_save": ["head"]}, r"no module matches modules_to_save \['head'\]"),
    ],
)
def test_bad_overrides_and_modules_to_save_are_one_line_errors(adapter: dict, message: str) -> None:
    model = classifier()
    with pytest.raises(adapterkit.AdapterkitError, match=message) as info:
        adapterkit.attach(model, {"adapter": {"kind": "lora", "targets": ["query", "value"], **adapter}})
    assert "\n" not in str(info.value) and not adapterkit.is_attached(model)


def test_untrusted_files_with_modules_to_save_fail_in_one_line(tmp_path) -> None:
    url = str(tmp_path / "three.safetensors")
    adapterkit.save(trained(classifier(3), steps=1), url)
    two = classifier(2)
    before = {k: v.clone() for k, v in two.state_dict().items()}
    shape = r"module to save 'classifier': (weight|bias) has shape \[3(, 32)?\] in the file but \[2(, 32)?\] in the"
    with pytest.raises(adapterkit.StorageError, match=shape) as info:
        adapterkit.load(url, two)
    assert "\n" not in str(info.value) and not adapterkit.is_attached(two)
    assert all(torch.equal(two.state_dict()[k], v) for k, v in before.items())

    # a header declaring a huge module-to-save tensor over the real bytes
    data = (tmp_path / "three.safetensors").read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + length])
    header["modules_to_save/classifier/weight"]["shape"] = [2**40, 32]
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    (tmp_path / "huge.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + data[8 + length:])
    with pytest.raises(adapterkit.StorageError, match=r"tensor 'modules_to_save/classifier/weight': 384 bytes for "
                                                      r"shape \(1099511627776, 32\)") as info:
        adapterkit.load(str(tmp_path / "huge.safetensors"), two)
    assert "\n" not in str(info.value) and not adapterkit.is_attached(two)


@pytest.mark.parametrize("change", [{"modules_to_save": ["bert"]}, {"overrides": {"value": {"r": 2**40}}}])
def test_a_crafted_recipe_with_modules_to_save_or_overrides_is_refused_before_attaching(tmp_path, change) -> None:
    """A validly digested file whose recipe saves the whole encoder, or gives a site a huge rank."""
    url, crafted = str(tmp_path / "real.safetensors"), str(tmp_path / "crafted.safetensors")
    adapterkit.save(trained(classifier(3), steps=1), url)
    recipe = adapterkit.inspect(url).recipe.to_dict()  # type: ignore[union-attr]
    recipe["adapter"].update(change)
    meta = {**fsspec_meta(url), KEY_RECIPE: json.dumps(recipe)}
    _, parts = encode(adapterkit.load_tensors(url), meta, "adapter")
    fs, path = fsspec.core.url_to_fs(crafted)
    fs.pipe(path, b"".join(bytes(p) for p in parts))
    model = classifier(3)
    with pytest.raises(adapterkit.StorageError, match=r"its recipe would allocate [\d,]+ adapter elements") as info:
        adapterkit.load(crafted, model)
    assert "\n" not in str(info.value) and not adapterkit.is_attached(model)


def fsspec_meta(url: str) -> dict[str, str]:
    """Every metadata value of a file (adapterkit's own keys included), read from its header."""
    from adapterkit.storage.io import read_header
    from adapterkit.storage.urls import resolve

    return dict(read_header(resolve(url, None)).metadata)
