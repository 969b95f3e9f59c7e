"""LoRA on every layer PEFT users adapt (GPT-2's Conv1D, nn.Embedding, nn.Conv2d), against
PEFT's own LoRA on the same base; folds; refusals; bottleneck sizes of Hugging Face blocks."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import adapterkit
from adapterkit.errors import AttachError

PARITY = dict(rtol=0.0, atol=1e-5)


def gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=32, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2Model(config).eval()


class GPT2Out(nn.Module):
    """GPT-2 called on token ids, giving the last hidden state (one tensor in, one out)."""

    def __init__(self) -> None:
        super().__init__()
        self.gpt2 = gpt2()

    def forward(self, ids: Tensor) -> Tensor:
        return self.gpt2(input_ids=ids).last_hidden_state  # type: ignore[no-any-return]


def conv_net() -> nn.Module:
    """A small conv net: kernel 3 with stride 2 / padding 1, kernel 3 with padding 2, and a 1x1 kernel."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=2),
                         nn.ReLU(), nn.Conv2d(6, 5, 1), nn.Flatten()).eval()


def embedder(max_norm: float | None = None) -> nn.Module:
    """Embeddings with ``padding_idx`` (and ``max_norm``: PEFT applies both to its A's rows too)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(50, 16, padding_idx=0, max_norm=max_norm), nn.Linear(16, 8)).eval()


def token_ids(vocab: int) -> Callable[[torch.Generator], Tensor]:
    return lambda g: torch.randint(0, vocab, (3, 10), generator=g)


CASES: dict[str, tuple[Callable[[], nn.Module], list[str], Callable[[torch.Generator], Tensor], str]] = {
    # name: (model, targets, inputs, the base layer type of every site)
    "conv1d": (GPT2Out, ["c_attn", "c_proj", "c_fc"], token_ids(100), "Conv1D"),
    "wte": (GPT2Out, ["wte"], token_ids(100), "Embedding"),
    "embedding": (embedder, ["0"], token_ids(50), "Embedding"),
    "conv2d": (conv_net, ["0", "2", "4"], lambda g: torch.randn(2, 3, 9, 9, generator=g), "Conv2d"),
}


def peft_lora(base: nn.Module, targets: list[str], *, r: int = 4, alpha: int = 8) -> nn.Module:
    """PEFT's LoRA on a copy of ``base`` with random non-zero A and B."""
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "fan_in_fan_out is set to False but the target module is Conv1D"
        model = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=alpha, target_modules=targets))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


@torch.no_grad()
def copy_from_peft(ours: nn.Module, peft_model: nn.Module) -> None:
    """PEFT's tensors into our sites: ``A = lora_A.flatten(1).T``, ``B = lora_B.flatten(1).T``
    (the mapping documented in ``adapterkit_builtins.layers``)."""
    modules = dict(peft_model.base_model.model.named_modules())  # type: ignore[union-attr]
    for name, site in adapterkit.sites(ours).items():
        layer = modules[name]
        if "default" in layer.lora_embedding_A:
            a, b = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
        else:
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        site.projections["A"].weight[0].copy_(a.flatten(1).T)
        site.projections["B"].weight[0].copy_(b.flatten(1).T)


def max_diff(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max())


@pytest.mark.parametrize("case", list(CASES))
def test_lora_matches_peft_and_folds(case: str) -> None:
    make, targets, inputs, layer = CASES[case]
    base = make()
    peft_model = peft_lora(base, targets)
    ours = adapterkit.attach(copy.deepcopy(base), {"adapter": {"kind": "lora", "targets": targets, "r": 4, "alpha": 8}})
    sites = adapterkit.sites(ours)
    assert sites and {type(s.base).__name__ for s in sites.values()} == {layer}
    copy_from_peft(ours, peft_model)
    ours.eval()
    x = inputs(torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, got, bare = peft_model(x), ours(x), base(x)
    assert max_diff(expected, bare) > 0.1  # the update is really there
    torch.testing.assert_close(got, expected, **PARITY)
    adapterkit.merge(ours, "fold")
    assert not adapterkit.sites(ours)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), expected, **PARITY)


FOLDER_CASES = {**CASES, "gpt2": (GPT2Out, ["c_attn", "c_fc", "wte"], token_ids(100), "Conv1D+Embedding")}


@pytest.mark.parametrize("case", ["conv1d", "wte", "conv2d", "gpt2"])
def test_peft_folders_of_every_layer_round_trip(case: str, tmp_path: Any) -> None:
    """A PEFT folder (save_pretrained) imports with PEFT's outputs; ours exports to a folder
    that PeftModel.from_pretrained loads with the same outputs (fan_in_fan_out for Conv1D)."""
    from peft import PeftModel

    make, targets, inputs, _ = FOLDER_CASES[case]
    base = make()
    peft_model = peft_lora(base, targets)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    x = inputs(torch.Generator().manual_seed(2))
    ours = adapterkit.import_peft(copy.deepcopy(base), str(tmp_path / "peft"))
    with torch.no_grad():
        expected = peft_model(x)
        assert max_diff(expected, base(x)) > 0.1
        torch.testing.assert_close(ours.eval()(x), expected, **PARITY)
    config = adapterkit.export_peft(ours, str(tmp_path / "ours"))
    assert config["fan_in_fan_out"] is (case in ("conv1d", "gpt2"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (PEFT's note that it set fan_in_fan_out per layer type)
        loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, **PARITY)


def test_embedding_max_norm_matches_peft_and_does_not_fold() -> None:
    base = embedder(max_norm=1.5)
    peft_model = peft_lora(base, ["0"])
    ours = adapterkit.attach(copy.deepcopy(base), {"adapter": {"kind": "lora", "targets": ["0"], "r": 4, "alpha": 8}})
    copy_from_peft(ours, peft_model)
    x = token_ids(50)(torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), peft_model(x), **PARITY)  # both renormalise A's rows in place
    with pytest.raises(adapterkit.AdapterkitError, match="^cannot merge with 'fold': LoRA on an nn.Embedding with "
                                                         "max_norm does not fold"):
        adapterkit.merge(ours, "fold")


def test_fold_equals_unfolded_on_a_dilated_conv() -> None:
    # PEFT's lora_A drops the base's dilation (its shapes then disagree); ours keeps it, so the
    # unfolded path equals the conv with W + ΔW (ΔW as PEFT's get_delta_weight lays it out)
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=3, dilation=2)
    model = adapterkit.attach(nn.Sequential(copy.deepcopy(conv)), {"adapter": {"kind": "lora", "targets": ["0"],
                                                                               "r": 3, "alpha": 6}})
    site = adapterkit.sites(model)["0"]
    with torch.no_grad():
        site.projections["B"].weight.normal_()
    a, b = site.projections["A"].weight[0], site.projections["B"].weight[0]
    peft_a, peft_b = a.T.reshape(3, 4, 3, 3), b.T.reshape(6, 3, 1, 1)
    delta = torch.nn.functional.conv2d(peft_a.transpose(0, 1), peft_b).transpose(0, 1) * 2.0  # PEFT's formula
    x = torch.randn(2, 4, 11, 11)
    with torch.no_grad():
        torch.testing.assert_close(site.delta_weight(), delta, rtol=1e-5, atol=1e-6)
        expected = torch.nn.functional.conv2d(x, conv.weight + delta, conv.bias, 2, 3, 2)
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
        adapterkit.merge(model, "fold")
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["wte", "conv2d"])
def test_embedding_and_conv_loras_train(case: str) -> None:
    make, targets, inputs, _ = CASES[case]
    model = adapterkit.attach(make(), {"adapter": {"kind": "lora", "targets": targets, "r": 2}}).train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = inputs(torch.Generator().manual_seed(0))
    for _ in range(2):  # one factor starts at zero (B; A for an embedding, as PEFT): both move by step 2
        optimizer.zero_grad()
        model(x).square().sum().backward()
        optimizer.step()
    for site in adapterkit.sites(model).values():
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in site.adapter_parameters())
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


@pytest.mark.parametrize(("layer", "args", "message"), [
    (nn.Conv2d(4, 4, 3, groups=2), {}, "LoRA on nn.Conv2d needs groups=1, got groups=2"),
    (nn.Conv2d(4, 4, 3, padding_mode="reflect"), {}, "LoRA on nn.Conv2d needs padding_mode='zeros', got 'reflect'"),
    (nn.Embedding(10, 4, max_norm=1.0), {"skills": 2, "router": "poly"},
     "LoRA on an nn.Embedding with max_norm takes no routing by task (router PolyRouter): its rows are "
     "renormalised in place"),
])
def test_layers_lora_refuses_say_why(layer: nn.Module, args: dict[str, Any], message: str) -> None:
    recipe: dict[str, Any] = {"adapter": {"kind": "lora", "targets": ["0"], "skills": args.get("skills", 1)}}
    if "router" in args:
        recipe["router"] = {"name": args["router"], "tasks": 2}
    with pytest.raises(AttachError) as info:
        adapterkit.attach(nn.Sequential(layer), recipe)
    assert str(info.value) == f"cannot attach: site '0': {message}"


def test_shared_skills_mix_on_a_conv() -> None:
    # skills mixed the same for every example (the uniform router) need no per-example weights
    model = adapterkit.attach(conv_net(), {"adapter": {"kind": "lora", "targets": ["0"], "skills": 3, "r": 2},
                                           "router": {"name": "uniform"}})
    site = adapterkit.sites(model)["0"]
    with torch.no_grad():
        site.projections["B"].weight.normal_()
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        mixed = site.projections["A"].weight.mean(0), site.projections["B"].weight.mean(0)
        delta = (mixed[0] @ mixed[1]).T.reshape(site.base.weight.shape)
        expected = torch.nn.functional.conv2d(x, site.base.weight + delta, site.base.bias, 2, 1)
        torch.testing.assert_close(site(x), expected, rtol=1e-5, atol=1e-5)


# --- bottleneck adapters on Hugging Face blocks ------------------------------------------


def hf_blocks() -> dict[str, tuple[nn.Module, Callable[[], tuple[Any, ...]], str, tuple[int, int]]]:
    """name: (model, its forward args, a block target, the (d_in, d_out) a parallel adapter reads/writes)."""
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, T5Config, T5EncoderModel

    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=24)).eval()
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=40, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
    t5 = T5EncoderModel(T5Config(vocab_size=50, d_model=16, d_kv=8, d_ff=36, num_layers=1, num_heads=2)).eval()
    gpt = GPT2Out().eval()
    ids = (torch.randint(0, 50, (2, 5)),)
    return {
        "BertOutput": (bert, lambda: ids, "encoder.layer.0.output", (24, 16)),  # reads the intermediate input
        "BertSelfOutput": (bert, lambda: ids, "attention.output", (16, 16)),
        "GPT2MLP": (gpt, lambda: ids, "h.0.mlp", (32, 32)),
        "GPT2Attention": (gpt, lambda: ids, "h.0.attn", (32, 32)),
        "LlamaMLP": (llama, lambda: ids, "layers.0.mlp", (16, 16)),
        "T5LayerFF": (t5, lambda: ids, "layer.1", (16, 16)),
    }


def test_bottleneck_sizes_hugging_face_blocks() -> None:
    for block, (model, args, target, (d_in, d_out)) in hf_blocks().items():
        attached = adapterkit.attach(copy.deepcopy(model), {"adapter": {"kind": "bottleneck", "targets": [target],
                                                                        "r": 4, "dropout": 0.0}})
        (site,) = adapterkit.sites(attached).values()
        assert type(site.base).__name__ == block
        assert site.projections["down"].weight.shape == (1, d_in, 4), block
        assert site.projections["up"].weight.shape == (1, 4, d_out), block
        with torch.no_grad():
            site.projections["up"].weight.normal_()
            out = attached(*args())
            bare = model(*args())
        first, before = (o if isinstance(o, Tensor) else o[0] for o in (out, bare))  # model outputs index too
        assert first.shape == before.shape and max_diff(first, before) > 1e-3, block  # the adapter acts


@pytest.mark.parametrize(("args", "unset"), [({}, "d_in and d_out"), ({"placement": "sequential"}, "d_out"),
                                             ({"d_out": 8}, "d_in")])
def test_bottleneck_names_the_size_to_set(args: dict[str, Any], unset: str) -> None:
    recipe = {"adapter": {"kind": "bottleneck", "targets": ["h.0.mlp.act"], **args}}
    with pytest.raises(AttachError) as info:
        adapterkit.attach(GPT2Out(), recipe)
    assert str(info.value) == (f"cannot attach: site 'gpt2.h.0.mlp.act': cannot infer the feature sizes of NewGELU"
                               f"Activation (it holds no Linear, Conv1D, convolution or norm layer); set {unset} in "
                               "[adapter]")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_new_layers_compile_without_graph_breaks(dtype: torch.dtype) -> None:
    import torch._dynamo
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    tokens = nn.Sequential(nn.Embedding(50, 16, padding_idx=0), Conv1D(8, 16))
    lora = {"kind": "lora", "r": 2, "dropout": 0.1}
    for model, targets, x in ((tokens, ["0", "1"], torch.randint(0, 50, (2, 5))),
                              (conv_net(), ["0", "2", "4"], torch.randn(2, 3, 9, 9))):
        torch._dynamo.reset()
        attached = adapterkit.attach(model.to(dtype), {"adapter": {**lora, "targets": targets}}).train()
        explanation = torch._dynamo.explain(attached)(x.to(dtype) if x.is_floating_point() else x)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert explanation.graph_count == 1
