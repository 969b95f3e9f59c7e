"""Adapters anywhere: one safetensors file per adapter at any fsspec URL (DESIGN.md §4).

``save``/``load`` move an attached model's adapter; ``save_tensors``/``load_tensors`` any
named tensors; ``inspect``/``ls`` read headers only; ``cp`` copies with verification.
"""

from __future__ import annotations

from .api import AdapterInfo, ListEntry, cp, inspect, load, ls, save
from .errors import StorageError
from .format import FORMAT_VERSION, TensorInfo
from .tensors import load_tensors, save_tensors
from .urls import parse_options

__all__ = [
    "FORMAT_VERSION",
    "AdapterInfo",
    "ListEntry",
    "StorageError",
    "TensorInfo",
    "cp",
    "inspect",
    "load",
    "load_tensors",
    "ls",
    "parse_options",
    "save",
    "save_tensors",
]
