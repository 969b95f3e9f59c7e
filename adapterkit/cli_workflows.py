"""CLI commands ``train``, ``adapt``, ``merge``, ``eval`` and ``heatmap`` (see :mod:`adapterkit.workflows`)."""

from __future__ import annotations

import json
from typing import Any

import click
import tomllib

from .cli_storage import json_flag, storage_option
from .errors import AdapterkitError
from .storage import parse_options
from .wording import plural


def _value(text: str) -> Any:
    """A ``--set`` value as TOML (numbers, booleans, lists, quoted strings), else a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _pairs(items: tuple[str, ...], what: str) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise AdapterkitError(f"{what} {item!r} must look like key=value")
        out[key.strip()] = _value(value.strip())
    return out


def _print_json(data: Any) -> None:
    """``--json``: the one machine-readable report on stdout (status lines went to stderr)."""
    click.echo(json.dumps(data, indent=2))


def _status(as_json: bool) -> Any:
    """Where a command's status lines go: stdout, or stderr when stdout carries ``--json``."""
    return (lambda message: click.echo(message, err=True)) if as_json else click.echo


def trust_file_option(function: Any) -> Any:
    """``--trust-file``: rebuild what the file names (adapter files are untrusted input)."""
    return click.option(
        "--trust-file",
        is_flag=True,
        help="Trust the adapter file: import the model factory (module:factory) and read the data URLs or paths "
        "it names. Without it such a file is refused; registered backbones and datasets need no trust.",
    )(function)


@click.command("train")
@click.argument("config", required=False)
@click.option("--default", "use_default", is_flag=True, help="Run the embedded default (also when CONFIG is omitted).")
@click.option("--show-default", is_flag=True, help="Print the embedded default config and exit.")
@click.option(
    "--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help="Override a config key (TOML value)."
)
@click.option("--resume", is_flag=True, help="Continue from the checkpoint at [checkpoint] url.")
@click.option("--checkpoint", "checkpoint_url", metavar="URL", help="Checkpoint URL (overrides [checkpoint] url).")
@click.option(
    "--stop-at", type=click.IntRange(min=1), metavar="STEP", help="Stop after this global step, checkpointed."
)
@json_flag
@click.option("--no-progress", is_flag=True, help="No progress bar (on a terminal) or progress lines (in a log).")
@storage_option
def train_command(
    config: str | None,
    use_default: bool,
    show_default: bool,
    overrides: tuple[str, ...],
    resume: bool,
    checkpoint_url: str | None,
    stop_at: int | None,
    as_json: bool,
    no_progress: bool,
    options_storage_option: tuple[str, ...],
) -> None:
    """Train a recipe on a backbone and dataset described by a config TOML (path or URL).

    Single- or multi-task; a progress bar with loss and throughput; evaluation after each
    epoch with merged weights; checkpoints every N steps; --resume. Data-parallel under
    torchrun: ``torchrun --nproc_per_node=2 -m adapterkit train run.toml``.
    """
    from . import workflows
    from .workflows.evaluation import as_json as json_rows
    from .workflows.evaluation import table

    if show_default:
        click.echo(workflows.DEFAULT_CONFIG, nl=False)
        return
    if config is not None and use_default:
        raise AdapterkitError("give a CONFIG or --default, not both")
    storage = parse_options(options_storage_option)
    cfg = (
        workflows.load_config(config, storage)
        if config is not None
        else workflows.from_toml(workflows.DEFAULT_CONFIG)
    )
    sets = _pairs(overrides, "--set")
    if checkpoint_url:
        sets["checkpoint.url"] = checkpoint_url
    if sets:
        cfg = workflows.with_overrides(cfg, sets)
    echo = _status(as_json)
    result = workflows.train(
        cfg, resume=resume, stop_at=stop_at, progress=not no_progress, echo=echo, storage_options=storage
    )
    if as_json:
        _print_json({"steps": result.steps, "stopped": result.stopped, "results": json_rows(result.results),
                     "epochs": result.history})
    elif result.results:
        click.echo("\n" + table(result.results))


class AdaptModeChoice(click.ParamType):
    """``--mode``: a name in the ``adapt_mode`` registry, read when the command runs (so a
    blocked plugin's modes are gone, and a third-party plugin's modes appear)."""

    name = "mode"

    def _names(self) -> list[str]:
        from .plugins import get_host

        return sorted(get_host().adapt_modes)

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return "[" + "|".join(self._names()) + "]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        from .plugins import get_host

        names = self._names()
        if value not in names:
            registry = get_host().adapt_modes
            if names or registry.unavailable and registry.unavailable():
                hint = f"{', '.join(names) or 'none'} {registry.missing_hint()}"  # names a plugin that did not load
            else:
                hint = "none: install a plugin that provides adaptation modes (e.g. adapterkit's poly)"
            self.fail(f"unknown adaptation mode {value!r}; available: {hint}", param, ctx)
        return str(value)


@click.command("adapt")
@click.argument("inventory")
@click.option("--task", required=True, help="The new task (a task of the inventory's dataset).")
@click.option("--mode", required=True, type=AdaptModeChoice(), help="Adaptation mode (adapterkit plugins: adapt_mode).")
@click.option("-k", "--k", "k", default=8, show_default=True, type=click.IntRange(min=1), help="Examples per class.")
@click.option("--seeds", default="0", show_default=True, help="Comma-separated seeds (one few-shot set each).")
@click.option("--steps", default=50, show_default=True, type=click.IntRange(min=1))
@click.option("--lr", default=5e-3, show_default=True, type=float)
@click.option(
    "--router-lr",
    type=float,
    help="Learning rate of routing parameters (default: the inventory's router_lr, else 0.1).",
)
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--init", default="uniform", show_default=True, help="New routing row: uniform, mean or random.")
@click.option("--train-head/--freeze-head", default=None, help="Default: frozen for mhr-z, trained otherwise.")
@click.option(
    "--output",
    metavar="URL",
    help="Save each adapted model under this URL prefix (mhr-z: also its routing rows alone, *.routing.safetensors).",
)
@json_flag
@click.option("--no-progress", is_flag=True, help="No progress bar (on a terminal) or progress lines (in a log).")
@trust_file_option
@storage_option
def adapt_command(
    inventory: str,
    task: str,
    mode: str,
    k: int,
    seeds: str,
    steps: int,
    lr: float,
    router_lr: float | None,
    batch_size: int,
    init: str,
    train_head: bool | None,
    output: str | None,
    as_json: bool,
    no_progress: bool,
    trust_file: bool,
    options_storage_option: tuple[str, ...],
) -> None:
    """Adapt a trained skill inventory (INVENTORY, a train output URL) to a new task from a few examples."""
    from .workflows.adapt import adapt, summary
    from .workflows.evaluation import as_json as json_rows
    from .workflows.evaluation import table

    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise AdapterkitError(f"--seeds must be comma-separated integers, got {seeds!r}") from None
    storage = parse_options(options_storage_option)
    echo = _status(as_json)
    runs = adapt(
        inventory,
        task,
        mode,
        k=k,
        seeds=seed_list,
        steps=steps,
        lr=lr,
        router_lr=router_lr,
        batch_size=batch_size,
        init=init,
        train_head=train_head,
        output=output,
        progress=not no_progress,
        echo=echo,
        storage_options=storage,
        trust_file=trust_file,
    )
    stats = summary(runs)
    if as_json:
        _print_json(
            {
                "task": task,
                "mode": mode,
                "k": k,
                "summary": stats,
                "runs": [
                    {
                        "seed": r.seed,
                        "trainable": r.trainable,
                        "url": r.url,
                        "routing_url": r.routing_url,
                        "routing_bytes": r.routing_bytes,
                        "rows": json_rows({"x": r.rows})["x"],
                    }
                    for r in runs
                ],
            }
        )
        return
    click.echo("\n" + table({f"{mode} seed {r.seed}": r.rows for r in runs}))
    from .workflows.evaluation import LABELS

    means = [f"{LABELS[name]} {value:.4f} ± {stats[name + '_std']:.4f}"
             for name, value in stats.items() if not name.endswith("_std")]
    click.echo(f"{mode}, k={k}, {plural(len(runs), 'seed')}: {', '.join(means)}")


def _config_fields(cls: type) -> str:
    """``density=0.5, seed=0`` for a plugin class's attrs ``Config`` (``-``: no arguments)."""
    import attrs

    config = getattr(cls, "Config", None)
    if config is None or not attrs.has(config):
        return "-"
    fields = []
    for field in attrs.fields(config):
        default = field.default
        if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
            default = default.factory()  # type: ignore[union-attr]
        fields.append(field.name if default is attrs.NOTHING else f"{field.name}={default!r}")
    return ", ".join(fields) or "-"


class MergeCommand(click.Command):
    """``merge --help`` ends with the installed mergers and their arguments (read at run time,
    so a third-party plugin's mergers appear)."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        from .plugins import get_host

        mergers = get_host().mergers
        with formatter.section("Installed mergers (--merger NAME, --arg KEY=VALUE)"):
            formatter.write_dl([(name, _config_fields(mergers[name])) for name in sorted(mergers)])


@click.command("merge", cls=MergeCommand)
@click.argument("paths", nargs=-1, required=True, metavar="[SRC...] DST")
@click.option("--library", "library_url", metavar="URL", help="Merge a selection of this library (with --select).")
@click.option("--select", "criteria", multiple=True, metavar="KEY=VALUE",
              help="Library selection: task, tags, kind, method, base or name (a glob); repeatable, all must match.")
@click.option("--merger", help="Merger name (default: the recipe's; with several sources: required, e.g. ties).")
@click.option("--arg", "args", multiple=True, metavar="KEY=VALUE", help="Merger argument (TOML value).")
@click.option("--model", "model_name", metavar="BACKBONE", help="Base model for several sources (registered name or "
              "module:factory); default: the one the first source's workflow metadata names.")
@click.option("--model-arg", "model_args", multiple=True, metavar="KEY=VALUE", help="Argument of --model.")
@json_flag
@trust_file_option
@storage_option
def merge_command(
    paths: tuple[str, ...],
    library_url: str | None,
    criteria: tuple[str, ...],
    merger: str | None,
    args: tuple[str, ...],
    model_name: str | None,
    model_args: tuple[str, ...],
    as_json: bool,
    trust_file: bool,
    options_storage_option: tuple[str, ...],
) -> None:
    """Merge a trained adapter (SRC) into a deployable one (DST), or several compatible adapters into one.

    Several adapters are experts given as SRC SRC ... or a library selection (--library URL
    --select task=x), merged by a merger named with --merger and its --arg KEY=VALUE
    arguments (--merger ties --arg density=0.5); a routed inventory's task may be given by
    name (--merger collapse --arg task=apple). Installed mergers: adapterkit plugins."""
    from .workflows import merge_adapters, merge_artifact

    *sources, dst = paths
    storage = parse_options(options_storage_option)
    if library_url is not None:
        from .library import Library

        selection: dict[str, Any] = {key: str(value) for key, value in _pairs(criteria, "--select").items()}
        try:
            chosen = Library(library_url, storage_options=storage).select(**selection)
        except TypeError:
            raise click.UsageError("--select takes task, tags, kind, method, base or name") from None
        if not chosen:
            raise AdapterkitError(f"no adapter of library {library_url!r} matches {selection}")
        sources += [entry.url for entry in chosen]
    elif criteria:
        raise click.UsageError("--select needs --library URL")
    if not sources:
        raise click.UsageError("give SRC... DST (or --library URL --select ... DST)")
    if len(sources) == 1:
        merged = merge_artifact(sources[0], dst, merger, _pairs(args, "--arg"), storage_options=storage,
                                trust_file=trust_file)
        assert merged.merger is not None
        if as_json:
            _print_json({"sources": sources, "url": dst, "merger": merged.merger})
        else:
            click.echo(f"merged {sources[0]} with {merged.merger['name']!r} -> {dst}")
        return
    if merger is None:
        raise click.UsageError("merging several adapters needs --merger (e.g. ties, task-arithmetic)")
    from .workflows.config import ModelConfig

    model = ModelConfig(model_name, _pairs(model_args, "--model-arg")) if model_name else None
    info = merge_adapters(sources, dst, merger, _pairs(args, "--arg"), model=model, storage_options=storage,
                          trust_file=trust_file)
    if as_json:
        _print_json({"sources": sources, "url": dst, "merger": {"name": merger, "args": _pairs(args, "--arg")},
                     "adapter": info.to_dict()})
    else:
        click.echo(f"merged {len(sources)} adapters with {merger!r} -> {dst} "
                   f"({info.method}, {plural(len(info.sites), 'site')})")


@click.command("eval")
@click.argument("url")
@click.option("--split", default="test", show_default=True, type=click.Choice(["test", "train"]))
@click.option("--task", "tasks", multiple=True, help="Only these tasks (repeatable).")
@click.option("--batch-size", default=128, show_default=True, type=click.IntRange(min=1))
@click.option("--data", "data_url", metavar="URL",
              help="Evaluate on this JSONL/CSV file instead of the run's own data (columns as the files dataset).")
@click.option("--num-beams", type=click.IntRange(min=1),
              help="Generative objectives: beams to decode with (1: greedy; default: the run's [eval] num_beams).")
@json_flag
@trust_file_option
@storage_option
def eval_command(
    url: str,
    split: str,
    tasks: tuple[str, ...],
    batch_size: int,
    data_url: str | None,
    num_beams: int | None,
    as_json: bool,
    trust_file: bool,
    options_storage_option: tuple[str, ...],
) -> None:
    """Report the metrics (per task and overall) of a saved adapter on its data.

    Classification: accuracy and macro-F1; causal-lm and seq2seq: perplexity on the targets,
    exact match of the generated text, and accuracy and macro-F1 when targets are class words."""
    from .workflows import evaluate_artifact
    from .workflows.evaluation import as_json as json_rows
    from .workflows.evaluation import table

    storage = parse_options(options_storage_option)
    rows = evaluate_artifact(
        url, split=split, tasks=tasks, batch_size=batch_size, storage_options=storage, trust_file=trust_file,
        data=data_url, num_beams=num_beams,
    )
    if as_json:
        _print_json({"url": url, "split": split, "data": data_url, "rows": json_rows({"x": rows})["x"]})
    else:
        click.echo(table({url.rsplit("/", 1)[-1][:20]: rows}))


@click.command("heatmap")
@click.argument("url")
@click.argument("png")
@click.option("--site", metavar="PATTERN", help="Only sites matching this target pattern (default: mean of all).")
@trust_file_option
@storage_option
def heatmap_command(
    url: str, png: str, site: str | None, trust_file: bool, options_storage_option: tuple[str, ...]
) -> None:
    """Save the task x skill routing weights (one panel per head) of a routed adapter as PNG."""
    from .workflows import load_artifact, read_artifact
    from .workflows.heatmap import plot, routing_table
    from .workflows.outputs import check_writable

    storage = parse_options(options_storage_option)
    check_writable(png, "PNG", storage)
    artifact, _ = read_artifact(url, storage_options=storage)  # the metadata alone: no model built yet
    tasks = [str(artifact.extra["task"])] if artifact.extra.get("task") else artifact.tasks
    if not tasks:
        raise AdapterkitError(f"{url!r} was trained on single-task data: no task routing to plot")
    classifier, artifact = load_artifact(url, storage_options=storage, trust_file=trust_file)
    weights = routing_table(classifier, len(tasks), site)
    title = f"routing ({artifact.config.recipe.router.name}), {site or 'mean over sites'}"
    plot(weights, tasks, png, title=title, storage_options=storage)
    click.echo(f"wrote {png}: {plural(weights.shape[0], 'task')} x {plural(weights.shape[2], 'skill')}, "
               f"{plural(weights.shape[1], 'head')}")


COMMANDS = [train_command, adapt_command, merge_command, eval_command, heatmap_command]
