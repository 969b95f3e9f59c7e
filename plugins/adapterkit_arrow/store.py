"""Prototypes stored in a library beside its experts.

Each expert's prototypes (one unit vector per site) are one small safetensors file under a
hidden folder of the library, named after the expert file's digest, so they are computed
once per expert and shared by every selection that uses it::

    <library>/.adapterkit-arrow/v1/<digest hex>.safetensors               plain experts
    <library>/.adapterkit-arrow/v1/<digest hex>.gks-<16 hex>.safetensors  after GenKnowSub
                                                                          (hash of the general digests)

The folder is hidden, so ``adapterkit ls`` and ``Library.rebuild`` never take these files for
adapters. A digest names the file's exact bytes, so a replaced expert gets a new file and
the old one is stale; :meth:`PrototypeStore.update` computes what is missing and removes
the files of experts no longer in the library. Files are written atomically and verified
on read (digests, names, shapes, finite unit vectors); a bad one is recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs
import fsspec
import torch
from torch import Tensor, nn

import adapterkit

from .prototypes import subtract_general, top_right_singular_vectors

log = logging.getLogger("adapterkit.arrow")

FOLDER = ".adapterkit-arrow/v1"
SUFFIX = ".safetensors"
_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")
_KEY = re.compile(r"([0-9a-f]{64})(\.gks-[0-9a-f]{16})?")


def digest_hex(digest: str | None) -> str | None:
    """The hex part of an adapter digest (``sha256:<64 hex>``), or ``None`` for files without one."""
    match = _DIGEST.fullmatch(digest or "")
    return match.group(1) if match else None


def key_of(digest: str | None, general: Sequence[str] = ()) -> str | None:
    """The store key of an expert's prototypes (``None``: no digest, nothing is stored)."""
    hex_ = digest_hex(digest)
    if hex_ is None:
        return None
    if not general:
        return hex_
    tag = hashlib.sha256(json.dumps(sorted(general)).encode()).hexdigest()[:16]
    return f"{hex_}.gks-{tag}"


def join(url: str, rel: str) -> str:
    """``url/rel`` on the first link of a possibly chained URL."""
    head, sep, rest = url.partition("::")
    return head.rstrip("/") + "/" + rel + sep + rest


@attrs.frozen
class UpdateReport:
    """What :meth:`PrototypeStore.update` did: experts whose prototypes it computed, those it
    found stored, and the stored files it removed (experts gone from the library)."""

    computed: tuple[str, ...]
    stored: tuple[str, ...]
    removed: tuple[str, ...]


class PrototypeStore:
    """The Arrow prototypes of a library's experts (see the module doc)."""

    def __init__(self, library: adapterkit.Library) -> None:
        self.library = library
        self.url = join(library.url, FOLDER)

    def __repr__(self) -> str:
        return f"PrototypeStore({self.library.url!r})"

    def _fs(self) -> tuple[Any, str]:
        fs, path = fsspec.core.url_to_fs(self.url, **self.library.storage_options)
        return fs, path

    def keys(self) -> set[str]:
        """The keys stored now (one listing)."""
        fs, path = self._fs()
        try:
            fs.invalidate_cache(path)
            names = fs.ls(path, detail=False)
        except FileNotFoundError:
            return set()
        keys = set()
        for name in names:
            base = str(name).rstrip("/").rsplit("/", 1)[-1]
            if base.endswith(SUFFIX) and _KEY.fullmatch(base[: -len(SUFFIX)]):
                keys.add(base[: -len(SUFFIX)])
        return keys

    def read(self, key: str, sites: Mapping[str, int]) -> dict[str, Tensor] | None:
        """The prototypes stored under ``key`` if they fit ``sites`` ({site: d_in}); ``None``
        (and a warning) when the file is unreadable or does not fit: it will be recomputed."""
        try:
            tensors = adapterkit.load_tensors(join(self.url, key + SUFFIX),
                                              storage_options=self.library.storage_options)
        except adapterkit.AdapterkitError as exc:
            log.warning("arrow: ignoring stored prototypes %s: %s", key, exc)
            return None
        fits = set(tensors) == set(sites) and all(
            t.dim() == 1 and t.shape[0] == sites[name] and t.is_floating_point() and bool(torch.isfinite(t).all())
            and abs(float(t.double().norm()) - 1.0) < 1e-3
            for name, t in tensors.items()
        )
        if not fits:
            log.warning("arrow: stored prototypes %s do not fit the expert's sites; recomputing", key)
            return None
        return tensors

    def write(self, key: str, prototypes: Mapping[str, Tensor], *, expert: str, digest: str,
              general: Sequence[str] = ()) -> None:
        meta = {"arrow.expert": expert, "arrow.digest": digest, "arrow.general": json.dumps(list(general)),
                "arrow.method": "qr-svd-float64"}
        tensors = {name: t.detach().float().contiguous().cpu() for name, t in prototypes.items()}
        adapterkit.save_tensors(tensors, join(self.url, key + SUFFIX), metadata=meta,
                                storage_options=self.library.storage_options)

    def remove(self, keys: Iterable[str]) -> None:
        fs, path = self._fs()
        paths = [f"{path.rstrip('/')}/{key}{SUFFIX}" for key in keys]
        if paths:
            fs.rm(paths)

    def update(
        self,
        model: nn.Module,
        *,
        experts: Sequence[Any] | None = None,
        general: Sequence[Any] = (),
        prune: bool = True,
    ) -> UpdateReport:
        """Make the store current: compute the prototypes of every expert that has none (only
        those), and with ``prune`` remove the files of experts no longer in the library.

        ``experts``: entries or names (default: every LoRA adapter of the library that fits
        ``model``, a base model without adapters, onto which each missing expert is loaded in
        turn); ``general``: entries or names of the general adapters for GenKnowSub."""
        from .build import general_average, resolve

        lib = self.library
        chosen = (lib.select(kind="lora", content="adapter", model=model) if experts is None
                  else [resolve(e, lib) for e in experts])
        gen = [resolve(g, lib) for g in general]
        gen_digests = [g.digest or "" for g in gen]
        have = self.keys()
        computed, stored = [], []
        average = None
        for entry in chosen:
            key = key_of(entry.digest, gen_digests)
            if key is not None and key in have:
                stored.append(entry.name)
                continue
            if gen and average is None:
                average = general_average(gen, model, lib.storage_options)
            protos = expert_prototypes(entry.url, model, lib.storage_options, average)
            if key is not None:
                assert entry.digest is not None
                self.write(key, protos, expert=entry.name, digest=entry.digest, general=gen_digests)
                have.add(key)
            computed.append(entry.name)
        removed: list[str] = []
        if prune:
            live = {digest_hex(e.digest) for e in lib.entries()}
            removed = sorted(k for k in have if k.split(".", 1)[0] not in live)
            self.remove(removed)
        return UpdateReport(tuple(computed), tuple(stored), tuple(removed))


def expert_prototypes(
    url: str, model: nn.Module, storage_options: Mapping[str, Any] | None,
    average: Mapping[str, tuple[Tensor, Tensor]] | None = None,
) -> dict[str, Tensor]:
    """One expert file's prototypes per site, loaded onto ``model`` (a base model without
    adapters; detached again), after GenKnowSub with ``average`` ({site: (mean A, mean B)})."""
    adapterkit.load(url, model, storage_options=storage_options)
    try:
        out = {}
        for name, site in adapterkit.sites(model).items():
            if site.kind != "lora" or site.skills != 1:
                raise adapterkit.AdapterkitError(f"arrow routes single-skill LoRA experts; {url!r} holds "
                                                 f"{site.skills} {site.kind!r} skills at {name!r}")
            w = site.expected_weights()
            a, b = w["A"], w["B"]
            if average is not None:
                a, b = subtract_general(a, b, [average[name][0]], [average[name][1]])
            out[name] = top_right_singular_vectors(a, b)[0]
        return out
    finally:
        adapterkit.detach(model)


__all__ = ["FOLDER", "PrototypeStore", "UpdateReport", "digest_hex", "expert_prototypes", "key_of"]
