"""adapterkit: modular and sparse adapter tuning of frozen pretrained PyTorch models."""

from __future__ import annotations

from .attach import adapter_state_dict, attach, merge, route, sites, summary
from .errors import AdapterkitError, AttachError, RecipeError, RoutingError, UnknownNameError
from .hookspecs import hookimpl
from .plugins import PluginHost, get_host
from .recipe import Recipe, RoleSpec
from .registry import Registry
from .roles import Merger, Partition, Projection, ProjectionSpec, Router, Sampler, Splitter
from .site import AdapterSite
from .storage import AdapterInfo, StorageError, cp, inspect, load, load_tensors, ls, save, save_tensors

__version__ = "0.1.0"

__all__ = [
    "AdapterInfo",
    "AdapterSite",
    "AdapterkitError",
    "AttachError",
    "Merger",
    "Partition",
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
    "adapter_state_dict",
    "attach",
    "cp",
    "get_host",
    "hookimpl",
    "inspect",
    "load",
    "load_tensors",
    "ls",
    "merge",
    "route",
    "save",
    "save_tensors",
    "sites",
    "summary",
]
