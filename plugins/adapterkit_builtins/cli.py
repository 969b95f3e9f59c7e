"""CLI commands ``adapterkit import`` / ``adapterkit export --peft``: PEFT folders <-> adapterkit
files, for every registered PEFT format (``adapterkit_register_peft_formats``).

Both work without the base model: LoRA tensors carry every shape, so a skeleton of
``nn.Linear`` stand-ins (one element of storage each) hosts the sites, and the modules to
save are rebuilt from their own tensors.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import attrs
import click
import torch
from torch import nn

import adapterkit
from adapterkit.plugin_api import PeftInteropError, from_peft, load_converted, parse_options, plural, read_peft

SAVED_PREFIX = "modules_to_save/"  # adapterkit's key namespace of modules_to_save tensors


def _child(root: nn.Module, path: str) -> nn.Module:
    """The module at dotted ``path`` under ``root``, created (empty) where missing."""
    parent = root
    for part in path.split(".") if path else ():
        child = parent._modules.get(part)
        if child is None:
            child = nn.Module()
            parent.add_module(part, child)
        parent = child
    return parent


def skeleton(shapes: Mapping[str, tuple[int, ...]], dtype: torch.dtype = torch.float32) -> nn.Module:
    """A module tree hosting an adapter whose tensors have ``shapes``: an ``nn.Linear(d_in,
    d_out)`` stand-in per LoRA site (weights one broadcast zero: no ``d_in*d_out`` memory,
    never meant to run) and, per module to save, its own tensors (zeros, to be loaded)."""
    root = nn.Module()
    dims: dict[str, list[int]] = {}
    for key, shape in shapes.items():
        if key.startswith(SAVED_PREFIX):
            module, _, tensor = key[len(SAVED_PREFIX):].rpartition("/")
            owner, _, leaf = f"{module}.{tensor}".rpartition(".")
            _child(root, owner).register_parameter(leaf, nn.Parameter(torch.zeros(shape, dtype=dtype)))
            continue
        for local, axis, slot in (("projections.A.weight", 1, 0), ("projections.B.weight", 2, 1)):
            if key.endswith("." + local):
                dims.setdefault(key[: -len(local) - 1], [0, 0])[slot] = shape[axis]
    for path, (d_in, d_out) in dims.items():
        owner, _, leaf = path.rpartition(".")
        linear = nn.Linear(1, 1, bias=False, dtype=dtype)
        linear.in_features, linear.out_features = d_in, d_out
        linear.weight = nn.Parameter(torch.zeros((), dtype=dtype).expand(d_out, d_in), requires_grad=False)
        _child(root, owner).add_module(leaf, linear)
    return root


def _exact(names: Any) -> tuple[str, ...]:
    """Exact-name patterns: the skeleton has no other modules a pattern could catch."""
    return tuple(dict.fromkeys(names))


storage_option = click.option(
    "--storage-option", "-o", "options", multiple=True, metavar="KEY=VALUE",
    help="fsspec storage option for both URLs (repeatable), e.g. -o anon=true.",
)
json_flag = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")


@click.command("import")
@click.argument("peft_url")
@click.argument("out_url")
@storage_option
@json_flag
def import_command(peft_url: str, out_url: str, options: tuple[str, ...], as_json: bool) -> None:
    """Convert the PEFT adapter folder PEFT_URL (LoRA, Poly/MHR or another registered format) into an adapterkit
    adapter file OUT_URL, with its modules_to_save.

    Refuses PEFT fields whose math adapterkit would not reproduce exactly.
    """
    storage = parse_options(options)
    config, tensors = read_peft(peft_url, storage)
    recipe, ours = from_peft(config, tensors)
    dtype = next(iter(ours.values())).dtype
    model = skeleton({k: tuple(v.shape) for k, v in ours.items()}, dtype)
    adapterkit.attach(model, recipe)  # (its targets and modules to save are the file's exact module names)
    load_converted(model, ours)
    meta = {"imported_from": f"peft {config.get('peft_type')} {config.get('peft_version', '')}".strip()}
    info = adapterkit.save(model, out_url, metadata=meta, storage_options=storage)
    if as_json:
        click.echo(json.dumps({"source": peft_url, "url": out_url, "adapter": info.to_dict()}, indent=2))
    else:
        saved = len(recipe.modules_to_save)
        saved_note = f" + {plural(saved, 'module')} to save" if saved else ""
        sites = plural(len(info.sites), "site")
        click.echo(f"imported {sites}{saved_note} ({info.method}) from {peft_url} -> {out_url}")


@click.command("export")
@click.argument("adapter_url")
@click.option("--peft", "peft_url", required=True, metavar="DIR",
              help="Write a PEFT adapter folder (adapter_config.json + adapter_model.safetensors) here.")
@click.option("--per-task", is_flag=True,
              help="A task-routed inventory (Poly, MHR): one plain LoRA folder per task, DIR/task-<t>.")
@storage_option
@json_flag
def export_command(adapter_url: str, peft_url: str, per_task: bool, options: tuple[str, ...], as_json: bool) -> None:
    """Write the adapterkit adapter file ADAPTER_URL as a PEFT folder that
    PeftModel.from_pretrained loads (LoRA with its modules_to_save, Poly/MHR).

    What PEFT cannot express is refused: cells (merge first), other routers (collapse or
    average them with ``adapterkit merge``, or --per-task).
    """
    storage = parse_options(options)
    info = adapterkit.inspect(adapter_url, storage_options=storage)
    if info.recipe is None:
        raise PeftInteropError(f"{adapter_url} holds {info.content if not info.folded else 'only folded sites'}, "
                               "not an exportable adapter")
    if info.recipe.kind != "lora":
        raise PeftInteropError(f"only LoRA-kind adapters export to PEFT; {adapter_url} is {info.recipe.kind!r}")
    dtype = info.tensors[0].torch_dtype if info.tensors else torch.float32
    model = skeleton({t.name: t.shape for t in info.tensors}, dtype)
    saved = [t.name[len(SAVED_PREFIX):].rpartition("/")[0] for t in info.tensors if t.name.startswith(SAVED_PREFIX)]
    # exact names: the skeleton has container modules a pattern could catch (overrides match
    # site names only, so they stay as they are)
    recipe = attrs.evolve(info.recipe, targets=_exact(info.sites), modules_to_save=_exact(saved))
    adapterkit.attach(model, recipe)
    adapterkit.load(adapter_url, model, storage_options=storage)
    if per_task:
        written = adapterkit.export_peft_tasks(model, peft_url, storage_options=storage)
    else:
        written = {peft_url: adapterkit.export_peft(model, peft_url, storage_options=storage)}
    if as_json:
        click.echo(json.dumps({"adapter": adapter_url, "folders": written}, indent=2))
    else:
        kinds = sorted({c["peft_type"] for c in written.values()})
        where = f"{len(written)} folders under {peft_url}" if per_task else peft_url
        click.echo(f"exported {plural(len(info.sites), 'site')} as PEFT {', '.join(kinds)} to {where}")
