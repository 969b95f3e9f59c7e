"""``files``: your own labelled data, JSONL or CSV, from any fsspec URL.

Each record has a ``text`` or an ``image`` column, a ``label`` column and an optional
``task`` column (names configurable); or, for text-to-text objectives (``causal-lm``,
``seq2seq``), an ``input`` and a ``target`` column (the target is also the example's
label: give ``classes`` when targets are class words, to score accuracy and macro-F1;
without ``classes`` targets are free-form text). Images are nested lists of pixel values (JSONL;
[0, 1], or 0-255 when any value exceeds 1) or paths/URLs of image files (decoded with
Pillow) relative to the data file. Without a ``test`` URL a stratified
``test_fraction`` of ``train`` is held out.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping
from typing import Any

import attrs
import numpy as np

from adapterkit.plugin_api import AdapterkitError, Dataset, Example, Split

from .split import fraction, stratified_split

FORMATS = ("auto", "jsonl", "csv")


class DataError(AdapterkitError):
    """A data file is unreadable, empty, or lacks a column; the message names the URL."""


def _format(instance: Any, attribute: Any, value: Any) -> None:
    if value not in FORMATS:
        raise ValueError(f"{attribute.name} must be one of {', '.join(FORMATS)}, got {value!r}")


def _read_text(url: str, storage_options: Mapping[str, Any]) -> str:
    import fsspec

    try:
        with fsspec.open(url, "rb", **storage_options) as f:
            data: bytes = f.read()
    except FileNotFoundError:
        raise DataError(f"data file not found: {url}") from None
    except Exception as exc:  # any backend's failure: botocore's NoCredentialsError is not an OSError
        hint = " (storage options such as credentials or an endpoint: -o key=value)" if "://" in url else ""
        raise DataError(f"cannot read {url}: {type(exc).__name__}: {exc}{hint}") from None
    return data.decode("utf-8", errors="replace")


def read_records(url: str, fmt: str = "auto", storage_options: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """The records of a JSONL or CSV file at ``url`` (format from the extension when ``auto``)."""
    text = _read_text(url, storage_options or {})
    path = url.split("::")[-1].split("?")[0].lower()
    if fmt == "auto":
        fmt = "csv" if path.endswith((".csv", ".csv.gz")) else "jsonl"
    if fmt == "csv":
        return [dict(row) for row in csv.DictReader(io.StringIO(text))]
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{url} line {number}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{url} line {number}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records


def _decode_image(value: Any, base: str, storage_options: Mapping[str, Any], where: str) -> np.ndarray:
    if isinstance(value, str):
        try:
            from PIL import Image
        except ImportError:
            raise DataError(f"{where}: image files need Pillow: pip install pillow") from None
        import fsspec

        url = value if "://" in value or value.startswith("/") else f"{base}/{value}"
        with fsspec.open(url, "rb", **storage_options) as f:
            array = np.asarray(Image.open(io.BytesIO(f.read())).convert("RGB"), dtype=np.float32) / 255.0
        return array
    try:
        array = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        raise DataError(f"{where}: image must be a nested list of numbers or a file path") from None
    if array.ndim not in (2, 3):
        raise DataError(f"{where}: image must be [H, W] or [H, W, C], got shape {array.shape}")
    return array / 255.0 if array.size and float(array.max()) > 1.0 else array


class Files(Dataset):
    """Labelled JSONL/CSV files from fsspec URLs (``memory://``, ``s3://``, paths, ...)."""

    @attrs.frozen
    class Config:
        train: str
        test: str | None = None
        format: str = attrs.field(default="auto", validator=_format)
        text_column: str = "text"
        image_column: str = "image"
        label_column: str = "label"
        task_column: str = "task"
        input_column: str = "input"
        target_column: str = "target"
        classes: list[str] | None = None
        """Class names in order; default: the sorted labels of the training file (none for
        text-to-text files: free-form targets)."""
        test_fraction: float = attrs.field(default=0.2, validator=fraction)
        seed: int = 0
        storage_options: dict[str, Any] = attrs.field(factory=dict)

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        self._cache: dict[str, list[Example]] | None = None
        self._classes: list[str] = []
        self._tasks: list[str] = []
        self._text_to_text = False
        self.modality = "text"

    def _parse(self, url: str) -> list[Example]:
        cfg = self.config
        records = read_records(url, cfg.format, cfg.storage_options)
        if not records:
            raise DataError(f"data file {url} holds no records")
        columns = set(records[0])
        if cfg.target_column in columns:
            return self._parse_text_to_text(url, records)
        if cfg.label_column not in columns:
            raise DataError(
                f"data file {url} has no label column {cfg.label_column!r}; columns: {', '.join(sorted(columns))}"
            )
        has_text, has_image = cfg.text_column in columns, cfg.image_column in columns
        if not has_text and not has_image:
            raise DataError(
                f"data file {url} needs a {cfg.text_column!r} or {cfg.image_column!r} column; "
                f"columns: {', '.join(sorted(columns))}"
            )
        self.modality = "text" if has_text else "image"
        base = url.rsplit("/", 1)[0]
        out = []
        for number, record in enumerate(records, 1):
            where = f"{url} record {number}"
            missing = [
                c for c in (cfg.label_column, cfg.text_column if has_text else cfg.image_column) if c not in record
            ]
            if missing:
                raise DataError(f"{where} has no column {missing[0]!r}")
            task = record.get(cfg.task_column)
            if has_text:
                out.append(
                    Example(
                        label=str(record[cfg.label_column]),
                        text=str(record[cfg.text_column]),
                        task=None if task in (None, "") else str(task),
                    )
                )
            else:
                image = _decode_image(record[cfg.image_column], base, cfg.storage_options, where)
                out.append(
                    Example(
                        label=str(record[cfg.label_column]), image=image, task=None if task in (None, "") else str(task)
                    )
                )
        return out

    def _parse_text_to_text(self, url: str, records: list[dict[str, Any]]) -> list[Example]:
        cfg = self.config
        source = cfg.input_column if cfg.input_column in records[0] else cfg.text_column
        if source not in records[0]:
            raise DataError(
                f"data file {url} has a {cfg.target_column!r} column but no {cfg.input_column!r} "
                f"(or {cfg.text_column!r}); columns: {', '.join(sorted(records[0]))}"
            )
        self._text_to_text = True
        out = []
        for number, record in enumerate(records, 1):
            missing = [c for c in (source, cfg.target_column) if c not in record]
            if missing:
                raise DataError(f"{url} record {number} has no column {missing[0]!r}")
            task, target = record.get(cfg.task_column), str(record[cfg.target_column])
            out.append(Example(label=target, text=str(record[source]), target=target,
                               task=None if task in (None, "") else str(task)))
        return out

    def _load(self) -> dict[str, list[Example]]:
        if self._cache is None:
            cfg = self.config
            train = self._parse(cfg.train)
            if cfg.test is not None:
                test = self._parse(cfg.test)
            else:
                keep, held = stratified_split([(e.task, e.label) for e in train], cfg.test_fraction, cfg.seed)
                train, test = [train[i] for i in keep], [train[i] for i in held]
            if cfg.classes:
                self._classes = list(cfg.classes)
            else:  # text-to-text targets are free-form unless the classes are given
                self._classes = [] if self._text_to_text else sorted({e.label for e in train})
            known = set(self._classes)
            for split, examples in (("train", train), ("test", test)):
                for number, e in enumerate(examples, 1):
                    if known and e.label not in known:
                        raise DataError(
                            f"{split} example {number}: label {e.label!r} is not one of the classes "
                            f"({', '.join(self._classes)})"
                        )
            self._tasks = sorted({e.task for e in train + test if e.task is not None})
            if self._tasks and any(e.task is None for e in train + test):
                raise DataError(f"some records have a {cfg.task_column!r} and some do not; give every record a task")
            self._cache = {"train": train, "test": test}
        return self._cache

    def classes(self) -> list[str]:
        self._load()
        return list(self._classes)

    def tasks(self) -> list[str]:
        self._load()
        return list(self._tasks)

    def examples(self, split: Split) -> list[Example]:
        return list(self._load()[split])
