"""adapterkit's Poly/MHR plugin: routed skill inventories, their mergers and PEFT interop.

Provides routers ``poly`` (alias ``mhr``: heads come from the splitter), ``private`` and
``uniform``; splitter ``mhr``; mergers ``average``, ``weighted`` and ``collapse``; few-shot
adaptation (:func:`adapt`), :func:`unfold`, model soups (:func:`soup`) and the PEFT ``POLY``
format (:func:`adapterkit.import_peft`, :func:`adapterkit.export_peft`, ``adapterkit import``/``export``).

Recipes (MiniLM, query/value)::

    # Poly: K skills mixed per task          # MHR: the same plus heads
    [adapter]                                [splitter]
    kind = "lora"                            name = "mhr"
    targets = ["query", "value"]             heads = 8
    skills = 4
    r = 8
    alpha = 1        # scale exactly 1/r, as the reference
    [router]
    name = "poly"
    tasks = 8
"""

from __future__ import annotations

from adapterkit.plugin_api import AdaptMode, Merger, PeftFormat, Registry, Router, Splitter, hookimpl

from .adapt import MODE_CLASSES, MODES, adapt, load_routing, load_routing_state_dict, routing_state_dict, save_routing
from .mergers import Average, Collapse, Weighted, soup, unfold
from .peft import PolyFormat
from .routers import PolyRouter, PrivateRouter, UniformRouter
from .splitter import MHRSplitter

__all__ = [
    "MODES",
    "Average",
    "Collapse",
    "MHRSplitter",
    "PolyFormat",
    "PolyRouter",
    "PrivateRouter",
    "UniformRouter",
    "Weighted",
    "adapt",
    "load_routing",
    "load_routing_state_dict",
    "routing_state_dict",
    "save_routing",
    "soup",
    "unfold",
]


@hookimpl
def adapterkit_register_routers(registry: Registry[Router]) -> None:
    registry.add("poly", PolyRouter)
    registry.add("mhr", PolyRouter)  # the same router: per-head logits when the splitter makes heads
    registry.add("private", PrivateRouter)
    registry.add("uniform", UniformRouter)


@hookimpl
def adapterkit_register_splitters(registry: Registry[Splitter]) -> None:
    registry.add("mhr", MHRSplitter)


@hookimpl
def adapterkit_register_mergers(registry: Registry[Merger]) -> None:
    registry.add("average", Average)
    registry.add("weighted", Weighted)
    registry.add("collapse", Collapse)


@hookimpl
def adapterkit_register_adapt_modes(registry: Registry[AdaptMode]) -> None:
    for name, cls in MODE_CLASSES.items():
        registry.add(name, cls)


@hookimpl
def adapterkit_register_peft_formats(registry: Registry[PeftFormat]) -> None:
    registry.add("POLY", PolyFormat)
