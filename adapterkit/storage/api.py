"""``save``, ``load``, ``inspect``, ``ls`` and ``cp``: adapters at any fsspec URL."""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator, Mapping
from typing import Any

import attrs
from torch import Tensor, nn

from ..errors import AdapterkitError, RecipeError
from ..recipe import Recipe
from ..wording import plural
from .errors import StorageError, printable
from .format import (
    KEY_DIGEST,
    KEY_EXTRA,
    KEY_FOLDED,
    KEY_HISTORY,
    KEY_PLUGINS,
    KEY_RECIPE,
    KEY_SITES,
    PREFIX,
    PROBE_BYTES,
    Header,
    TensorInfo,
    adapter_fields,
    verify_header,
)
from .io import abort_uploads, parse_whole, read_all, read_header, write_atomic
from .tensors import check, decode, encode, tensor_view
from .urls import Location, resolve, storage_errors

SUFFIX = ".safetensors"
MAX_LINE = 4000  # characters of one line of ``inspect``'s text (the full values are in --json)


@attrs.frozen
class AdapterInfo:
    """What a file's header says, read with ranged reads only (see :func:`inspect`)."""

    url: str
    size: int
    header_size: int
    format_version: int | None  # None: a safetensors file not written by adapterkit
    content: str  # "adapter", "tensors" or "safetensors" (foreign)
    recipe: Recipe | None
    plugins: Mapping[str, str]
    sites: tuple[str, ...]
    digest: str | None
    metadata: Mapping[str, str]  # the caller's own keys
    tensors: tuple[TensorInfo, ...]
    extra: tuple[str, ...] = ()  # tensors stored beside the adapter, not part of it (``load`` skips them)
    folded: tuple[str, ...] = ()  # sites whose updates were folded into base weights (``load`` refolds)
    folded_recipe: Recipe | None = None
    history: tuple[Mapping[str, Any], ...] = ()

    @classmethod
    def from_header(cls, url: str, header: Header) -> AdapterInfo:
        if not header.verified:  # (parsed headers passed this already)
            adapter_fields(header, url)  # every adapterkit value against its schema, one-line errors
        try:
            raw_recipe = header.json_value(KEY_RECIPE)
            recipe = Recipe.from_dict(raw_recipe) if raw_recipe is not None else None
            plugins = header.json_value(KEY_PLUGINS, {})
            sites = tuple(header.json_value(KEY_SITES, []))
            extra = tuple(header.json_value(KEY_EXTRA, []))
            raw_folded = header.json_value(KEY_FOLDED, {"sites": []})
            folded = tuple(raw_folded["sites"])
            folded_recipe = Recipe.from_dict(raw_folded["recipe"]) if folded else None
            history = tuple(dict(step) for step in header.json_value(KEY_HISTORY, []))
        except (ValueError, TypeError, KeyError, RecipeError) as exc:
            raise StorageError(f"{url!r}: corrupt adapterkit metadata ({exc})") from None
        if not set(extra) <= set(header.tensors):
            raise StorageError(f"{url!r}: corrupt adapterkit metadata (extra tensors not in the file)")
        if header.content == "adapter" and recipe is None and folded_recipe is None:
            raise StorageError(f"{url!r}: corrupt adapterkit metadata (an adapter without its recipe)")
        return cls(
            url=url, size=header.file_size, header_size=header.header_size, format_version=header.version,
            content=header.content, recipe=recipe, plugins=dict(plugins), sites=sites,
            digest=header.metadata.get(KEY_DIGEST),
            metadata={k: v for k, v in header.metadata.items() if not k.startswith(PREFIX)},
            tensors=tuple(sorted(header.tensors.values(), key=lambda t: t.offsets)), extra=extra,
            folded=folded, folded_recipe=folded_recipe, history=history,
        )

    @property
    def kind(self) -> str:
        """The adapter kind (``lora``, ...) or, for other files, the content."""
        return self.recipe.kind if self.recipe else self.content

    @property
    def method(self) -> str:
        """Kind plus every non-default role name, once each (``lora+mosa``, ``lora+mhr+average``);
        ``folded lora`` when every site is folded into base weights; ``-`` for other files."""
        from ..attach import method_name

        if self.recipe is None:
            return f"folded {method_name(self.folded_recipe)}" if self.folded_recipe is not None else "-"
        return method_name(self.recipe) + (" (+ folded sites)" if self.folded else "")

    @property
    def data_size(self) -> int:
        return self.size - self.header_size

    def to_dict(self) -> dict[str, Any]:
        return {
            "url": self.url, "size": self.size, "header_size": self.header_size,
            "format_version": self.format_version, "content": self.content, "kind": self.kind,
            "method": self.method, "recipe": self.recipe.to_dict() if self.recipe else None,
            "plugins": dict(self.plugins), "sites": list(self.sites), "digest": self.digest,
            "metadata": dict(self.metadata), "tensors": [t.to_dict() for t in self.tensors],
            "extra": list(self.extra), "folded": list(self.folded),
            "folded_recipe": self.folded_recipe.to_dict() if self.folded_recipe else None,
            "history": [dict(step) for step in self.history],
        }

    def __str__(self) -> str:
        lines = [
            f"url       {self.url}",
            f"content   {self.content} (format {self.format_version if self.format_version else 'none: foreign'})",
            f"method    {self.method}",
            f"size      {self.size:,} bytes ({self.header_size:,} header, {self.data_size:,} tensor data)",
            f"digest    {self.digest or 'none'}",
            f"plugins   {', '.join(f'{k} {v}' for k, v in sorted(self.plugins.items())) or '-'}",
            f"sites     {len(self.sites)}" + (f" (+ {len(self.folded)} folded into base weights)" * bool(self.folded)),
        ]
        for step in self.history:
            made = f" by {step['plugin']} {step.get('version', '?')}" if "plugin" in step else ""
            lines.append(f"step      {step.get('op')} {step.get('name', step.get('method', ''))}{made}".rstrip())
        if self.extra:
            lines.append(f"extra     {plural(len(self.extra), 'tensor')} beside the adapter: {_short(self.extra)}")
        lines += [f"meta      {k} = {v}" for k, v in sorted(self.metadata.items())]
        if self.recipe is not None:
            lines.append(f"recipe    {json.dumps(self.recipe.to_dict(), sort_keys=True)}")
        if self.folded_recipe is not None:
            lines.append(f"folded    {json.dumps(self.folded_recipe.to_dict(), sort_keys=True)}")
        lines.append(f"{'tensor':<56} {'dtype':<6} {'shape':<20} {'bytes':>12}")
        lines += [f"{t.name:<56} {t.dtype:<6} {str(list(t.shape)):<20} {t.nbytes:>12,}" for t in self.tensors]
        # Names and values come from the file: each line printable on its own (no newline or
        # terminal escape in a value can forge another line), long values cut.
        return "\n".join(printable(line, MAX_LINE) for line in lines)


@attrs.frozen
class ListEntry:
    """One file of a library listing: its info, or the one-line reason it could not be read."""

    name: str
    url: str
    size: int
    info: AdapterInfo | None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "url": self.url, "size": self.size, "error": self.error}
        if self.info is not None:
            out.update(kind=self.info.kind, method=self.info.method, content=self.info.content,
                       sites=len(self.info.sites), tensors=len(self.info.tensors), digest=self.info.digest,
                       metadata=dict(self.info.metadata))
        return out


# --- save / load ------------------------------------------------------------------------


def save(
    model_or_tensors: nn.Module | Mapping[str, Tensor],
    url: str,
    *,
    metadata: Mapping[str, str] | None = None,
    extra_tensors: Mapping[str, Tensor] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    name: str | None = None,
) -> AdapterInfo:
    """Write the adapter of an attached model (or named tensors) as one safetensors file
    (with ``name``: that named adapter of the model, not the active one).

    The file carries the recipe, the plugin versions, the sites and digests, so
    ``adapterkit.load(url, fresh_model)`` can rebuild the adapter. The write is atomic.
    ``extra_tensors`` (with a model only) are stored beside the adapter under their own
    names, e.g. a classifier head: ``load`` skips them, ``load_tensors(url, info.extra)``
    reads them.
    """
    from ..attach import adapter_state_dict, describe, editable_state, providers, sites, unwrap

    meta = dict(metadata or {})
    reserved = [k for k in meta if isinstance(k, str) and k.startswith(PREFIX)]
    if reserved:
        raise StorageError(f"metadata key {reserved[0]!r} is reserved: keys starting with {PREFIX!r} "
                           "belong to adapterkit")
    if name is not None:
        from ..named import using

        if not isinstance(model_or_tensors, nn.Module):
            raise StorageError("name= picks a named adapter of a model; a mapping of tensors has none")
        with using(model_or_tensors, name):
            return save(model_or_tensors, url, metadata=metadata, extra_tensors=extra_tensors,
                        storage_options=storage_options)
    loc = resolve(url, storage_options, write=True)
    if isinstance(model_or_tensors, nn.Module):
        model_or_tensors = unwrap(model_or_tensors)
        state = editable_state(model_or_tensors)
        tensors = adapter_state_dict(model_or_tensors)
        plugins: dict[str, str] = {}
        if state.recipe is not None:
            meta[KEY_RECIPE] = json.dumps(state.recipe.to_dict(), sort_keys=True)
            plugins.update(providers(state.recipe))
        meta[KEY_SITES] = json.dumps(list(sites(model_or_tensors)))
        if state.folded:  # the folded sites' own (small) factors; load refolds them
            folded = describe(state.folded, state.origin, attached=list(state.originals))
            meta[KEY_FOLDED] = json.dumps({"recipe": folded.to_dict(), "sites": list(state.folded)}, sort_keys=True)
            plugins.update(providers(folded))
            for name, site in state.folded.items():
                tensors.update({f"{name}.{k}": v for k, v in site.state_dict().items() if not k.startswith("base.")})
        meta[KEY_PLUGINS] = json.dumps(plugins, sort_keys=True)
        meta[KEY_HISTORY] = json.dumps(state.history, sort_keys=True)
        extra = dict(extra_tensors or {})
        clash = sorted(set(extra) & set(tensors))
        if clash:
            raise StorageError(f"extra tensor {clash[0]!r} has the name of an adapter tensor; rename it")
        if extra:
            meta[KEY_EXTRA] = json.dumps(sorted(extra))
        header, parts = encode({**tensors, **extra}, meta, "adapter")
    elif isinstance(model_or_tensors, Mapping):
        if extra_tensors:
            raise StorageError("extra_tensors go beside an attached model's adapter; "
                               "with a mapping of tensors, put them in the mapping")
        header, parts = encode(model_or_tensors, meta, "tensors")
    else:
        kind = type(model_or_tensors).__name__
        raise StorageError(f"save takes an attached nn.Module or a mapping of tensors, got {kind}")
    write_atomic(loc, parts)
    return AdapterInfo.from_header(url, header)


def load(
    url: str, model: nn.Module, *, name: str | None = None, strict: bool = True,
    storage_options: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Load an adapter file into ``model`` (attaching its stored recipe first if the model
    has no adapters), after verifying every digest; returns the model.

    ``strict`` (default) requires the file and the model to hold the same adapter tensors;
    otherwise tensors on only one side are skipped. Shapes must always match. With
    ``name`` the file is the named adapter ``name`` (added, or loaded into it) and becomes
    the active one (see :mod:`adapterkit.named`).
    """
    from ..attach import NAMED_ATTR, STATE_ATTR, editable_state, unwrap

    model = unwrap(model)
    if name is not None:
        from ..named import load_named

        return load_named(model, name, lambda: load_one(url, model, strict=strict, storage_options=storage_options))
    if hasattr(model, STATE_ATTR):
        editable_state(model)
    elif hasattr(model, NAMED_ATTR):
        from ..named import adapters

        raise StorageError(f"the model holds named adapters {adapters(model)} and none is active; "
                           "load with name=... (a new name adds one)")
    return load_one(url, model, strict=strict, storage_options=storage_options)


def load_one(
    url: str, model: nn.Module, *, strict: bool = True, storage_options: Mapping[str, Any] | None = None
) -> nn.Module:
    """``load`` into the active adapter, or as the model's one adapter when none is active."""
    from ..attach import adapter_state_dict, fold_sites, sites

    loc = resolve(url, storage_options)
    data = read_all(loc, writable=False)
    header = parse_whole(data, url)
    check(header, url, verify=True)
    info = AdapterInfo.from_header(url, header)
    if info.content != "adapter" or (info.recipe is None and info.folded_recipe is None):
        raise StorageError(f"{url!r} holds {info.content}, not an adapter; read it with adapterkit.load_tensors")
    if not info.sites and not info.folded:
        raise StorageError(f"{url!r} holds no adapter sites; read its tensors with adapterkit.load_tensors")
    _check_allocation(model, info, url)
    everything = list(header.tensors.values())
    tensors = decode(header, everything, [(data, header.header_size)] * len(everything), url, verify=True)
    with _attached(model, info, url):  # a refused load leaves the model as it was
        targets = adapter_state_dict(model)
        wanted = _match(info, header, targets, list(sites(model)), url, strict)
        _copy_into(model, targets, {i.name: tensors[i.name] for i in wanted})
        if info.folded:
            fold_sites(model, info.folded)
    return model


def _copy_into(model: nn.Module, targets: Mapping[str, Tensor], tensors: Mapping[str, Tensor]) -> None:
    """Copy verified tensors into the model.

    ``load_state_dict`` is the contract, but its ``copy_`` runs torch's intra-op thread
    pool, which on busy cores costs up to 60x a plain memcpy (measured here: 20 ms
    against 0.3 ms for 8 MiB on 2 shared cores). When no module customises loading and
    every target is a contiguous CPU tensor of the same dtype, a direct memcpy into the
    parameter's storage (``targets`` alias it) is the same operation.
    """
    plain = all(
        type(m)._load_from_state_dict is nn.Module._load_from_state_dict
        and not m._load_state_dict_pre_hooks and not m._load_state_dict_post_hooks
        for m in model.modules()
    )
    fast = plain and all(
        targets[n].device.type == "cpu" and targets[n].dtype == t.dtype and targets[n].is_contiguous()
        for n, t in tensors.items()
    )
    if not fast:
        from ..attach import saved_module_key

        def model_key(key: str) -> str:  # modules_to_save/<module>/<tensor> -> <module>.<tensor>
            saved = saved_module_key(key)
            return f"{saved[0]}.{saved[1]}" if saved else key

        model.load_state_dict({model_key(k): v for k, v in tensors.items()}, strict=False)
        return
    for name, source in tensors.items():
        if source.numel():
            tensor_view(targets[name])[:] = tensor_view(source)


ALLOCATION_FACTOR = 4  # a split projection holds W0 and a delta (2x), cell ids, and the file may be half-precision


def _check_allocation(model: nn.Module, info: AdapterInfo, url: str) -> None:
    """Refuse a recipe that would allocate far more adapter elements than the file holds."""
    from ..attach import STATE_ATTR, planned_elements

    if hasattr(model, STATE_ATTR):
        return  # loading into existing sites allocates nothing
    stored = sum(math.prod(t.shape) for t in info.tensors if t.name not in set(info.extra))
    planned = 0
    try:
        for recipe in (info.recipe, info.folded_recipe):
            if recipe is not None:
                planned += planned_elements(model, recipe)
    except AdapterkitError as exc:
        made_by = ", ".join(f"{k} {v}" for k, v in sorted(info.plugins.items())) or "unknown plugins"
        raise StorageError(f"cannot load {url!r}: {exc} (the adapter was made with: {made_by})") from None
    if planned > ALLOCATION_FACTOR * stored + 1024:
        raise StorageError(f"cannot load {url!r}: its recipe would allocate {planned:,} adapter elements on this "
                           f"model but the file holds {stored:,}; the file is corrupt or crafted")


@contextlib.contextmanager
def _attached(model: nn.Module, info: AdapterInfo, url: str) -> Iterator[None]:
    """Attach the stored state if the model has no adapters (the recipe of the sites left,
    and the folded sites, to be refolded once loaded); detach again if loading fails."""
    from ..attach import STATE_ATTR, add_sites, attach_one, remove_state, state_of

    if hasattr(model, STATE_ATTR):
        if info.folded:
            raise StorageError(f"cannot load {url!r} into a model with adapters: it holds updates folded into "
                               "base weights; load it onto a fresh base model")
        yield
        return
    first = info.recipe if info.recipe is not None else info.folded_recipe
    assert first is not None
    try:
        attach_one(model, first)
        if info.recipe is not None and info.folded_recipe is not None:
            add_sites(model, info.folded_recipe, info.folded)
    except AdapterkitError as exc:
        if hasattr(model, STATE_ATTR):
            remove_state(model)
        made_by = ", ".join(f"{k} {v}" for k, v in sorted(info.plugins.items())) or "unknown plugins"
        raise StorageError(f"cannot load {url!r}: {exc} (the adapter was made with: {made_by})") from None
    try:
        yield
    except BaseException:
        remove_state(model)
        raise
    state_of(model).history = [*(dict(step) for step in info.history), {"op": "load"}]


def _match(
    info: AdapterInfo, header: Header, ours: Mapping[str, Tensor], model_sites: list[str], url: str, strict: bool
) -> list[TensorInfo]:
    """The file's tensors to load; one-line errors naming the site for mismatches."""
    site_names = sorted({*info.sites, *info.folded, *model_sites}, key=len, reverse=True)

    def site(key: str) -> str:
        return _site_of(key, site_names)

    wanted = []
    adapter = {name: entry for name, entry in header.tensors.items() if name not in set(info.extra)}
    for name, entry in adapter.items():
        target = ours.get(name)
        if target is None:
            if strict:
                where = site(name)
                raise StorageError(f"cannot load {url!r}: {_what(where)} of the adapter is not in the model "
                                   f"(tensor {name!r}); model sites: {_short(model_sites)}")
            continue
        if tuple(target.shape) != entry.shape:
            where = site(name)
            raise StorageError(
                f"cannot load {url!r}: {_what(where)}: {name[len(where) + 1:]} has shape {list(entry.shape)} "
                f"in the file but {list(target.shape)} in the model"
            )
        wanted.append(entry)
    missing = [k for k in ours if k not in adapter]
    if strict and missing:
        raise StorageError(f"cannot load {url!r}: {_what(site(missing[0]))} of the model has no tensors in the file "
                           f"(missing {missing[0]!r}); file sites: {_short(info.sites)}")
    return wanted


def _what(where: str) -> str:
    """``site 'x'``, or ``module to save 'x'`` for the modules_to_save namespace."""
    prefix = "modules_to_save/"
    return f"module to save {where[len(prefix):]!r}" if where.startswith(prefix) else f"site {where!r}"


def _site_of(key: str, site_names: list[str]) -> str:
    """The longest site name that prefixes ``key`` (sites are dotted module paths)."""
    for name in site_names:
        if key.startswith(name + "."):
            return name
    if key.startswith("modules_to_save/"):  # modules_to_save/<module>/<tensor>
        return key.rpartition("/")[0]
    return key.rpartition(".")[0]


def _short(items: Any, limit: int = 5) -> str:
    items = list(items)
    return ", ".join(items[:limit]) + (f", ... ({len(items)} in all)" if len(items) > limit else "") or "none"


# --- inspect / ls / cp ------------------------------------------------------------------


def inspect(url: str, *, storage_options: Mapping[str, Any] | None = None) -> AdapterInfo:
    """The header of an adapter file (recipe, format version, plugins, tensors, sizes),
    read with ranged reads only: a size query, at most 64 KiB, and the rest of the
    header if it is larger. Checks the header digest; tensor data is checked by ``load``."""
    loc = resolve(url, storage_options)
    header = read_header(loc)
    verify_header(header, url)
    return AdapterInfo.from_header(url, header)


def ls(url: str, *, storage_options: Mapping[str, Any] | None = None, clean: bool = False) -> list[ListEntry]:
    """Every ``*.safetensors`` file under a URL prefix (hidden names skipped), each
    described from its header only; a broken file becomes an entry with its error. A
    prefix that does not exist is an error. ``clean`` first aborts the unfinished S3
    multipart uploads under the prefix (left by killed saves; see ``io.abort_uploads``)."""
    loc = resolve(url, storage_options)
    fs = loc.fs
    if clean:
        with storage_errors("clean", url):
            abort_uploads(loc, under=True)
    with storage_errors("list", url):
        if loc.path.endswith(SUFFIX) and fs.isfile(loc.path):  # (HTTP calls any 200 URL a file)
            found = {loc.path: fs.info(loc.path)}
            root = loc.path.rpartition("/")[0]
        else:
            found = fs.find(loc.path, detail=True)
            root = loc.path.rstrip("/")
            if not found and not fs.exists(loc.path):
                raise StorageError(f"cannot list {url!r}: no such folder or prefix")
    files = []
    for path, detail in sorted(found.items()):
        rel = path[len(root):].lstrip("/") if root and path.startswith(root) else path
        if detail.get("type", "file") != "file" or not path.endswith(SUFFIX):
            continue
        if any(part.startswith(".") for part in rel.split("/")):
            continue  # temp files of writes in progress, and other hidden names
        files.append((rel, path, detail.get("size")))
    probes = _probe(loc, [(p, s) for _, p, s in files])
    entries = []
    for (rel, path, _), (real_size, probe) in zip(files, probes, strict=True):
        child = loc.child(path)
        try:
            if isinstance(probe, BaseException):
                raise probe
            info = AdapterInfo.from_header(child.url, _checked_header(child, real_size, probe))
            entries.append(ListEntry(rel, child.url, real_size, info))
        except StorageError as exc:
            entries.append(ListEntry(rel, child.url, real_size or 0, None, str(exc)))
    return entries


def _join(folder: str, name: str) -> str:
    """``folder/name`` on the first link of a possibly chained URL (``a/::b`` -> ``a/name::b``)."""
    head, sep, rest = folder.partition("::")
    return head.rstrip("/") + "/" + name + sep + rest


def _probe(loc: Location, files: list[tuple[str, int | None]]) -> list[tuple[int, bytes | BaseException]]:
    """First bytes of many files in one batch (async backends fetch them concurrently)."""
    sizes = []
    for path, size in files:
        if size is None:
            try:
                size = int(loc.fs.size(path))
            except Exception:
                size = 0
        sizes.append(size)
    if not files:
        return []
    ends = [min(PROBE_BYTES, s) for s in sizes]
    with storage_errors("list", loc.url):
        got = loc.fs.cat_ranges([p for p, _ in files], [0] * len(files), ends)
    out: list[tuple[int, bytes | BaseException]] = []
    for size, item in zip(sizes, got, strict=True):
        if isinstance(item, BaseException) and not isinstance(item, StorageError):
            with_error: BaseException = StorageError(f"cannot read: {type(item).__name__}: {item}")
            out.append((size, with_error))
        else:
            out.append((size, item))
    return out


def _checked_header(loc: Location, size: int, probe: bytes) -> Header:
    header = read_header(loc, size=size, probe=probe)
    verify_header(header, loc.url)
    return header


def cp(
    src: str,
    dst: str,
    *,
    storage_options: Mapping[str, Any] | None = None,
    dst_storage_options: Mapping[str, Any] | None = None,
) -> AdapterInfo:
    """Copy one adapter file between any two URLs, verifying it on the way, writing
    atomically. A ``dst`` ending in ``/`` (or an existing directory) gets the source's name."""
    src_loc = resolve(src, storage_options)
    data = read_all(src_loc, writable=False)
    header = parse_whole(data, src)
    verify_header(header, src)
    if header.version is not None:
        wanted = list(header.tensors.values())
        decode(header, wanted, [(data, header.header_size)] * len(wanted), src, verify=True)
    options = storage_options if dst_storage_options is None else dst_storage_options
    name = src.split("::")[0].rstrip("/").rpartition("/")[2]
    if dst.split("::")[0].endswith("/"):
        dst = _join(dst, name)
    dst_loc = resolve(dst, options, write=True)
    with storage_errors("write", dst):
        is_dir = dst_loc.fs.isdir(dst_loc.path)
    if is_dir:
        dst = _join(dst, name)
        dst_loc = resolve(dst, options, write=True)
    write_atomic(dst_loc, [data])
    return AdapterInfo.from_header(dst, header)
