"""How LoRA's factors act on each base layer type it adapts.

Every layer keeps LoRA's one data model, ``A [p, r]`` (down) and ``B [r, q]`` (up), so
splitters, samplers, routers and mergers work on any of them unchanged; a :class:`Layer`
says what ``p`` and ``q`` are, how ``A`` and ``B`` act on the layer's input, and how
``scale * A B`` lays out as an update of ``base.weight`` (fold). For every layer the PEFT
tensors map as ``A = lora_A.flatten(1).T`` and ``B = lora_B.flatten(1).T`` (``lora_embedding_A/B``
for an embedding):

- ``nn.Linear``: ``p = in_features``, ``q = out_features``; PEFT ``lora_A.weight [r, p]``,
  ``lora_B.weight [q, r]``; ``ΔW = scale (A B)^T`` (``[out, in]``).
- ``Conv1D`` (transformers, GPT-2; ``weight [in, out]``): ``p = in``, ``q = nf``; PEFT as for
  ``nn.Linear`` (``fan_in_fan_out``); ``ΔW = scale A B`` (``[in, out]``).
- ``nn.Embedding``: ``p = num_embeddings``, ``q = embedding_dim``; PEFT
  ``lora_embedding_A [r, p]``, ``lora_embedding_B [q, r]``; ``ΔW = scale A B`` (``[num, dim]``).
- ``nn.Conv2d``: ``p = in_channels·kh·kw`` (rows ordered ``(in, kh, kw)``), ``q = out_channels``;
  PEFT ``lora_A.weight [r, in, kh, kw]``, ``lora_B.weight [q, r, 1, 1]``;
  ``ΔW = scale (A B)^T`` reshaped to ``[out, in, kh, kw]`` (PEFT's ``get_delta_weight``).
"""

from __future__ import annotations

import sys
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from adapterkit.plugin_api import batched_linear


class Layer:
    """LoRA on one base layer type: ``base(x) + scale * up(down(x, A), B)``.

    ``down``/``up`` take shared weights or per-example ones (``[b, p, r]``, routing by task).
    ``per_token``: skills can be mixed per token on the layer input (its last axis);
    ``float_input``: the input is a feature tensor (dropout and casts to the adapter dtype
    apply), not token ids.
    """

    name: ClassVar[str]
    per_token: ClassVar[bool] = True
    float_input: ClassVar[bool] = True

    def __init__(self, base: nn.Module) -> None:
        self.base = base

    @staticmethod
    def matches(base: nn.Module) -> bool:
        raise NotImplementedError

    def dims(self) -> tuple[int, int]:
        """``(p, q)`` from the base's attributes (allocates nothing: untrusted recipes size it)."""
        raise NotImplementedError

    def down(self, x: Tensor, a: Tensor) -> Tensor:
        """The ``r``-wide hidden of ``x`` under ``A`` (``[p, r]`` or per example ``[b, p, r]``)."""
        return batched_linear(x, a)

    def up(self, hidden: Tensor, b: Tensor, add_to: Tensor | None = None) -> Tensor:
        """``hidden`` under ``B``, plus ``add_to`` (the base output, same dtype) when given."""
        return batched_linear(hidden, b, add_to=add_to)

    def delta(self, product: Tensor) -> Tensor:
        """``product = scale * A B [p, q]`` laid out as an update of ``base.weight``."""
        return product.T


class Linear(Layer):
    name = "nn.Linear"

    @staticmethod
    def matches(base: nn.Module) -> bool:
        return isinstance(base, nn.Linear)

    def dims(self) -> tuple[int, int]:
        assert isinstance(self.base, nn.Linear)
        return self.base.in_features, self.base.out_features


def hf_conv1d() -> type | None:
    """transformers' ``Conv1D`` if transformers is imported (a model holding one imported it)."""
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None)


class Conv1D(Layer):
    """GPT-2's linear layer: ``y = x W + b`` with ``W [in, out]``, so ``ΔW = scale A B`` untransposed."""

    name = "Conv1D"

    @staticmethod
    def matches(base: nn.Module) -> bool:
        cls = hf_conv1d()
        return cls is not None and isinstance(base, cls)

    def dims(self) -> tuple[int, int]:
        weight = self.base.weight
        assert isinstance(weight, Tensor)
        return weight.shape[0], weight.shape[1]

    def delta(self, product: Tensor) -> Tensor:
        return product


class Embedding(Layer):
    """PEFT's embedding LoRA: ``emb(x) + scale * embedding(x, A) B`` with the base's
    ``padding_idx``, ``max_norm`` and friends applied to ``A``'s rows; no dropout."""

    name = "nn.Embedding"
    per_token = False
    float_input = False

    @staticmethod
    def matches(base: nn.Module) -> bool:
        return isinstance(base, nn.Embedding)

    def dims(self) -> tuple[int, int]:
        assert isinstance(self.base, nn.Embedding)
        return self.base.num_embeddings, self.base.embedding_dim

    def down(self, x: Tensor, a: Tensor) -> Tensor:
        base = self.base
        assert isinstance(base, nn.Embedding)
        if a.dim() == 2:
            return F.embedding(x, a, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq,
                               base.sparse)
        rows = torch.arange(a.shape[0], device=x.device).view(-1, *(1,) * (x.dim() - 1))
        hidden = a[rows, x]  # example i reads its own A_i's rows
        if base.padding_idx is not None:  # as F.embedding: the padding row gets no gradient
            hidden = torch.where((x == base.padding_idx).unsqueeze(-1), hidden.detach(), hidden)
        return hidden

    def delta(self, product: Tensor) -> Tensor:
        assert isinstance(self.base, nn.Embedding)
        if self.base.max_norm is not None:
            raise ValueError("LoRA on an nn.Embedding with max_norm does not fold: the base's rows and A's "
                             "are renormalised apart")
        return product


class Conv2d(Layer):
    """PEFT's per-kernel LoRA: ``A`` a conv ``in -> r`` with the base's kernel, stride, padding
    and dilation, ``B`` a 1x1 conv ``r -> out``; ``A``'s rows run over ``(in, kh, kw)``."""

    name = "nn.Conv2d"
    per_token = False

    @staticmethod
    def matches(base: nn.Module) -> bool:
        return isinstance(base, nn.Conv2d)

    def dims(self) -> tuple[int, int]:
        base = self.base
        assert isinstance(base, nn.Conv2d)
        if base.groups != 1:
            raise ValueError(f"LoRA on nn.Conv2d needs groups=1, got groups={base.groups}")
        if base.padding_mode != "zeros":
            raise ValueError(f"LoRA on nn.Conv2d needs padding_mode='zeros', got {base.padding_mode!r}")
        kh, kw = base.kernel_size
        return base.in_channels * kh * kw, base.out_channels

    def down(self, x: Tensor, a: Tensor) -> Tensor:
        base = self.base
        assert isinstance(base, nn.Conv2d)
        r = a.shape[-1]
        if a.dim() == 2:
            kernel = a.T.reshape(r, base.in_channels, *base.kernel_size)
            return F.conv2d(x, kernel, None, base.stride, base.padding, base.dilation)
        # per-example kernels: one grouped conv, the examples stacked as groups
        batch = a.shape[0]
        kernel = a.transpose(1, 2).reshape(batch * r, base.in_channels, *base.kernel_size)
        hidden = F.conv2d(x.reshape(1, -1, *x.shape[2:]), kernel, None, base.stride, base.padding, base.dilation,
                          groups=batch)
        return hidden.view(batch, r, *hidden.shape[2:])

    def up(self, hidden: Tensor, b: Tensor, add_to: Tensor | None = None) -> Tensor:
        out = F.conv2d(hidden, b.T[..., None, None]) if b.dim() == 2 else torch.einsum("brhw,brq->bqhw", hidden, b)
        return out if add_to is None else add_to + out

    def delta(self, product: Tensor) -> Tensor:
        weight = self.base.weight
        assert isinstance(weight, Tensor)
        return product.T.reshape(weight.shape)


LAYERS: tuple[type[Layer], ...] = (Linear, Conv1D, Embedding, Conv2d)


def layer_of(base: nn.Module) -> Layer:
    """The :class:`Layer` for ``base``, or ``ValueError`` naming the layer types LoRA adapts."""
    for cls in LAYERS:
        if cls.matches(base):
            return cls(base)
    names = ", ".join(cls.name for cls in LAYERS)
    raise ValueError(f"LoRA adapts {names}; got {type(base).__name__}")
