"""adapterkit: modular and sparse adapter tuning of frozen pretrained PyTorch models."""

from __future__ import annotations

from .attach import (
    adapt,
    adapter_state_dict,
    attach,
    detach,
    disabled,
    folded_sites,
    history,
    is_attached,
    merge,
    recipe_of,
    sites,
    summary,
    unmerge,
)
from .errors import AdapterkitError, AttachError, RecipeError, RoutingError, UnknownNameError
from .hookspecs import hookimpl
from .library import Library
from .named import activate, active_adapter, adapters, deactivate, delete, using
from .peft_interop import PeftInteropError, export_peft, export_peft_tasks, import_peft
from .plugins import PluginHost, get_host
from .recipe import Recipe, RoleSpec
from .registry import Registry
from .roles import AdaptMode, Folded, LossTerm, Merger, Partition, Projection, ProjectionSpec, Router, Sampler, Splitter
from .serving import adapter_ids, serve, served
from .site import AdapterSite
from .stack import stack
from .storage import AdapterInfo, StorageError, cp, inspect, load, load_tensors, ls, save, save_tensors
from .task_ids import route
from .training import set_progress

__version__ = "0.1.0"

__all__ = [
    "AdaptMode",
    "AdapterInfo",
    "AdapterSite",
    "AdapterkitError",
    "AttachError",
    "Folded",
    "Library",
    "LossTerm",
    "Merger",
    "Partition",
    "PeftInteropError",
    "PluginHost",
    "Projection",
    "ProjectionSpec",
    "Recipe",
    "RecipeError",
    "Registry",
    "RoleSpec",
    "Router",
    "RoutingError",
    "Sampler",
    "Splitter",
    "StorageError",
    "UnknownNameError",
    "activate",
    "active_adapter",
    "adapt",
    "adapter_ids",
    "adapter_state_dict",
    "adapters",
    "attach",
    "cp",
    "deactivate",
    "delete",
    "detach",
    "disabled",
    "export_peft",
    "export_peft_tasks",
    "folded_sites",
    "get_host",
    "history",
    "hookimpl",
    "import_peft",
    "inspect",
    "is_attached",
    "load",
    "load_tensors",
    "ls",
    "merge",
    "recipe_of",
    "route",
    "save",
    "save_tensors",
    "serve",
    "served",
    "set_progress",
    "sites",
    "stack",
    "summary",
    "unmerge",
    "using",
]
