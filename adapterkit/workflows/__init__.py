"""Workflows: train, adapt, merge and evaluate adapters on real models and data.

Python::

    from adapterkit import workflows
    config = workflows.load_config("run.toml")
    result = workflows.train(config)             # DDP under torchrun
    workflows.merge_artifact(src_url, dst_url)
    rows = workflows.evaluate_artifact(dst_url)

What a run trains the model to do is its objective (``[model] objective``:
``classification``, ``causal-lm``, ``seq2seq``; :mod:`adapterkit.objectives`). A saved run
is an untrusted file: rebuilding it imports a ``module:factory`` backbone or opens a data
URL or model folder it names only with ``trust_file=True`` (``--trust-file``).

The CLI (``adapterkit train|adapt|merge|eval|heatmap``) wraps these.
"""

from __future__ import annotations

from .adapt import AdaptRun, adapt
from .artifacts import Artifact, UntrustedFileError, load_artifact, read_artifact, save_artifact
from .config import ConfigError, WorkflowConfig, from_dict, from_toml, with_overrides
from .config import load as load_config
from .data import Corpus, DataError
from .defaults import DEFAULT_CONFIG
from .evaluation import Row
from .manage import evaluate_artifact, merge_adapters, merge_artifact
from .outputs import OutputError
from .run import TrainResult, train

__all__ = [
    "DEFAULT_CONFIG",
    "AdaptRun",
    "Artifact",
    "ConfigError",
    "Corpus",
    "DataError",
    "OutputError",
    "Row",
    "TrainResult",
    "UntrustedFileError",
    "WorkflowConfig",
    "adapt",
    "evaluate_artifact",
    "from_dict",
    "from_toml",
    "load_artifact",
    "load_config",
    "merge_adapters",
    "merge_artifact",
    "read_artifact",
    "save_artifact",
    "train",
    "with_overrides",
]
