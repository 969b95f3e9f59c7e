"""The plugin-author surface: everything a plugin (built-in or third-party) may import.

Plugins import only this module and the public ``adapterkit`` package; an import
contract (``lint-imports``, run by ``nox -s lint`` and the tests) keeps it so. What is
here, by job:

- **Registration**: :data:`hookimpl`, :class:`Registry` (see :mod:`adapterkit.hookspecs`).
- **Roles and kinds**: :class:`AdapterSite` (subclass for a kind), :class:`Splitter`,
  :class:`Sampler`, :class:`Router`, :class:`Merger`, :class:`AdaptMode`,
  :class:`LossTerm`, with their data (:class:`ProjectionSpec`, :class:`Partition`,
  :class:`Projection`) and :class:`Folded` (a merger's "fold this site into its base").
- **Routing on the layer input** (Arrow): a router with ``needs_inputs = True`` implements
  ``token_weights(x) -> [..., K]`` (and ``setup_inputs(features)``); the site then keeps its
  weights ``[K, *shape]`` and a kind with ``input_features()`` (LoRA) mixes outputs per token.
- **Site attributes**: ``site.site_name``, ``site.base``, ``site.skills``,
  ``site.splitter``/``sampler``/``router``, ``site.projections``, ``site.partition(name)``.
- **Eval-mode weights of a site**: ``site.expected_weights()`` (``[K, *shape]``, the
  expectation over cells) and ``site.mixed_weights(routing)`` (``[*shape]``, skills mixed).
- **Rebuilding a site with new weights**: ``site.rebuild(weights, config=..., router=...)``.
- **Folding LoRA into a base layer**: return ``Folded(site)`` from a merger; the core adds
  ``site.delta_weight()`` (kinds that are linear in their input implement it).
- **Model helpers**: :func:`sites`, :func:`replace_sites` (adaptation modes),
  :func:`mix_skills`, :func:`batched_linear`, :func:`factory_kwargs`.
- **Adapter precision**: a kind whose ``Config`` has ``dtype`` (one of :data:`ADAPTER_DTYPES`:
  ``"float32"``, ``"base"``) gets float32 adapters over a float16/bfloat16 base by default.
- **Low-rank factors** (mergers): :func:`concat_factors` (a weighted sum of LoRA updates,
  exactly), :func:`truncate` and :func:`factorize` (best rank-n by SVD), :func:`effective_rank`.
- **Config validators** (attrs, one-line messages): :func:`positive`, :func:`probability`,
  :func:`one_of`; errors :class:`AdapterkitError`, :class:`RecipeError`.
- **PEFT formats** (``adapterkit_register_peft_formats``): :class:`PeftFormat` by
  ``peft_type``, :class:`PeftInteropError`, :func:`empty` (a PEFT "unused" value); the
  folder helpers :func:`read_peft`, :func:`from_peft`, :func:`load_converted`.
- **Workflow extension points**: :class:`Backbone`, :class:`Dataset` (streamed:
  :class:`RecordStream`), :class:`Example`, :class:`Split`, :class:`WorkflowModel`; objectives
  :class:`Objective` (with :class:`Encoded`, :class:`Decoding`,
  :class:`Predictions`, the built-in :class:`Classification` and the helpers
  :func:`device_of`, :func:`routing`, :func:`task_indices`); storage helpers :func:`save_tensors`, :func:`load_tensors`,
  :func:`parse_options`.

A worked merger example is in ``docs/plugins.md``.
"""

from __future__ import annotations

from .attach import attach, replace_sites, sites
from .errors import AdapterkitError, RecipeError
from .hookspecs import hookimpl
from .lowrank import concat_factors, effective_rank, factorize, truncate
from .objectives import (
    BodyKind,
    Classification,
    Decoding,
    Encoded,
    Objective,
    Predictions,
    device_of,
    eval_outputs,
    routing,
    task_indices,
)
from .peft_format import PeftFormat, PeftInteropError, empty
from .peft_interop import from_peft, load_converted, read_peft
from .recipe import Recipe, RoleSpec
from .registry import Registry
from .roles import (
    AdaptMode,
    Configurable,
    Folded,
    LossTerm,
    Merger,
    Partition,
    Projection,
    ProjectionSpec,
    Router,
    Sampler,
    SingleSkill,
    Splitter,
)
from .site import ADAPTER_DTYPES, AdapterSite, batched_linear, factory_kwargs, mix_skills
from .storage import load_tensors, parse_options, save_tensors
from .validators import (
    at_most,
    non_negative,
    non_negative_number,
    one_of,
    optional,
    positive,
    positive_number,
    probability,
)
from .wording import plural
from .zoo import Backbone, Dataset, Example, RecordStream, Split, WorkflowModel

__all__ = [
    "ADAPTER_DTYPES",
    "AdaptMode",
    "AdapterSite",
    "AdapterkitError",
    "Backbone",
    "BodyKind",
    "Classification",
    "Configurable",
    "Dataset",
    "Decoding",
    "Encoded",
    "Example",
    "Folded",
    "LossTerm",
    "Merger",
    "Objective",
    "Partition",
    "PeftFormat",
    "PeftInteropError",
    "Predictions",
    "Projection",
    "ProjectionSpec",
    "Recipe",
    "RecipeError",
    "RecordStream",
    "Registry",
    "RoleSpec",
    "Router",
    "Sampler",
    "SingleSkill",
    "Split",
    "Splitter",
    "attach",
    "batched_linear",
    "concat_factors",
    "device_of",
    "eval_outputs",
    "effective_rank",
    "empty",
    "factorize",
    "factory_kwargs",
    "from_peft",
    "hookimpl",
    "load_converted",
    "load_tensors",
    "mix_skills",
    "at_most",
    "non_negative",
    "non_negative_number",
    "one_of",
    "optional",
    "parse_options",
    "plural",
    "positive",
    "positive_number",
    "probability",
    "read_peft",
    "replace_sites",
    "routing",
    "save_tensors",
    "sites",
    "task_indices",
    "truncate",
    "WorkflowModel",
]
