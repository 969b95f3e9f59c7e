"""CLI commands ``adapterkit import`` / ``adapterkit export``: PEFT folders <-> adapterkit files.

Both work without the base model: the adapter tensors carry every shape, so a skeleton
of ``nn.Linear`` stand-ins (one element of storage each) hosts the sites.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs
import click
import torch
from torch import nn

import adapterkit
from adapterkit.plugin_api import parse_options

from .peft_interop import PeftInteropError, export_peft, from_peft, load_converted, read_peft


def skeleton(dims: Mapping[str, tuple[int, int]], dtype: torch.dtype = torch.float32) -> nn.Module:
    """A module tree with an ``nn.Linear(d_in, d_out)`` stand-in at each dotted path.

    The weights are one broadcast zero (no ``d_in*d_out`` memory): enough for adapters
    to read the shapes, never meant to run.
    """
    root = nn.Module()
    for path, (d_in, d_out) in dims.items():
        parent = root
        *parents, leaf = path.split(".")
        for part in parents:
            child = parent._modules.get(part)
            if child is None:
                child = nn.Module()
                parent.add_module(part, child)
            parent = child
        linear = nn.Linear(1, 1, bias=False, dtype=dtype)
        linear.in_features, linear.out_features = d_in, d_out
        linear.weight = nn.Parameter(torch.zeros((), dtype=dtype).expand(d_out, d_in), requires_grad=False)
        parent.add_module(leaf, linear)
    return root


def _dims(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, int]]:
    """``{site: (d_in, d_out)}`` from LoRA ``A [K, d_in, r]`` / ``B [K, r, d_out]`` tensor shapes."""
    dims: dict[str, list[int]] = {}
    for key, shape in shapes.items():
        for local, axis, slot in (("projections.A.weight", 1, 0), ("projections.B.weight", 2, 1)):
            if key.endswith("." + local):
                dims.setdefault(key[: -len(local) - 1], [0, 0])[slot] = shape[axis]
    return {k: (v[0], v[1]) for k, v in dims.items()}


storage_option = click.option(
    "--storage-option", "-o", "options", multiple=True, metavar="KEY=VALUE",
    help="fsspec storage option for both URLs (repeatable), e.g. -o anon=true.",
)


@click.command("import")
@click.argument("peft_url")
@click.argument("out_url")
@storage_option
def import_command(peft_url: str, out_url: str, options: tuple[str, ...]) -> None:
    """Convert the PEFT Poly/MHR or LoRA folder PEFT_URL into an adapterkit adapter file OUT_URL.

    Refuses PEFT fields whose math adapterkit would not reproduce exactly.
    """
    storage = parse_options(options)
    config, tensors = read_peft(peft_url, storage)
    recipe, ours = from_peft(config, tensors)
    dtype = next(iter(ours.values())).dtype
    model = skeleton(_dims({k: tuple(v.shape) for k, v in ours.items()}), dtype)
    adapterkit.attach(model, recipe)
    load_converted(model, ours)
    meta = {"imported_from": f"peft {config.get('peft_type')} {config.get('peft_version', '')}".strip()}
    info = adapterkit.save(model, out_url, metadata=meta, storage_options=storage)
    click.echo(f"imported {len(info.sites)} sites ({info.method}) from {peft_url} -> {out_url}")


@click.command("export")
@click.argument("adapter_url")
@click.argument("peft_url")
@storage_option
def export_command(adapter_url: str, peft_url: str, options: tuple[str, ...]) -> None:
    """Write the adapterkit adapter file ADAPTER_URL as a PEFT folder PEFT_URL (Poly/MHR or LoRA).

    Multi-skill adapters that PEFT cannot express (another router, cells) are refused:
    collapse or average them first with ``adapterkit merge``.
    """
    storage = parse_options(options)
    info = adapterkit.inspect(adapter_url, storage_options=storage)
    if info.recipe is None:
        raise PeftInteropError(f"{adapter_url} holds {info.content}, not an adapter")
    if info.recipe.kind != "lora":
        raise PeftInteropError(f"only LoRA-kind adapters export to PEFT; {adapter_url} is {info.recipe.kind!r}")
    shapes = {t.name: t.shape for t in info.tensors}
    dtype = info.tensors[0].torch_dtype if info.tensors else torch.float32
    model = skeleton(_dims(shapes), dtype)
    # exact site names as targets: the skeleton has no other modules a pattern could catch
    adapterkit.attach(model, attrs.evolve(info.recipe, targets=tuple(info.sites)))
    adapterkit.load(adapter_url, model, storage_options=storage)
    config = export_peft(model, peft_url, storage)
    click.echo(f"exported {len(info.sites)} sites as PEFT {config['peft_type']} to {peft_url}")
