"""``files``: your own labelled data, JSONL, CSV or Parquet, from any fsspec URL.

Each record has a ``text`` or an ``image`` column, a ``label`` column and an optional
``task`` column (names configurable); or, for text-to-text objectives (``causal-lm``,
``seq2seq``), an ``input`` and a ``target`` column (the target is also the example's
label: give ``classes`` when targets are class words, to score accuracy and macro-F1;
without ``classes`` targets are free-form text). Images are nested lists of pixel values (JSONL;
[0, 1], or 0-255 when any value exceeds 1) or paths/URLs of image files (decoded with
Pillow) relative to the data file. Without a ``test`` URL a stratified
``test_fraction`` of ``train`` is held out.

Files are read whole, or with ``[data] stream = true`` the train file streams
(:meth:`Files.stream`: a :class:`FileStream` of its raw records, each parsed only when
the pipeline takes it; a ``test`` URL is then required). Parquet is read with pyarrow,
one row group at a time.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
from collections.abc import Iterator, Mapping
from typing import IO, Any

import attrs
import numpy as np

from adapterkit.plugin_api import AdapterkitError, Dataset, Example, RecordStream, Split

from .split import fraction, stratified_split

FORMATS = ("auto", "jsonl", "csv", "parquet")


class DataError(AdapterkitError):
    """A data file is unreadable, empty, or lacks a column; the message names the URL."""


def _format(instance: Any, attribute: Any, value: Any) -> None:
    if value not in FORMATS:
        raise ValueError(f"{attribute.name} must be one of {', '.join(FORMATS)}, got {value!r}")


@contextlib.contextmanager
def _opened(url: str, storage_options: Mapping[str, Any]) -> Iterator[IO[bytes]]:
    """The file at ``url``, binary (compression from the extension); read failures become
    one-line :class:`DataError` s naming the URL."""
    import fsspec

    try:
        with fsspec.open(url, "rb", compression="infer", **storage_options) as f:
            yield f
    except FileNotFoundError:
        raise DataError(f"data file not found: {url}") from None
    except DataError:
        raise
    except Exception as exc:  # any backend's failure: botocore's NoCredentialsError is not an OSError
        hint = " (storage options such as credentials or an endpoint: -o key=value)" if "://" in url else ""
        raise DataError(f"cannot read {url}: {type(exc).__name__}: {exc}{hint}") from None


def file_format(url: str, fmt: str = "auto") -> str:
    """``jsonl``, ``csv`` or ``parquet``: ``fmt`` unless ``auto``, else from the extension."""
    if fmt != "auto":
        return fmt
    path = url.split("::")[-1].split("?")[0].lower()
    for suffix in (".gz", ".bz2", ".xz", ".zst"):
        path = path.removesuffix(suffix)
    if path.endswith(".csv"):
        return "csv"
    return "parquet" if path.endswith((".parquet", ".pq")) else "jsonl"


def iter_raw(
    url: str, fmt: str = "auto", storage_options: Mapping[str, Any] | None = None
) -> Iterator[tuple[int, Any]]:
    """``(number, raw record)`` of a JSONL, CSV or Parquet file, read lazily in file order:
    JSONL lines stay undecoded bytes (:func:`to_record` parses them), so a pass that keeps
    only some records pays for those alone; CSV and Parquet rows are dicts. ``number``:
    the JSONL line, the CSV/Parquet row (1-based)."""
    fmt = file_format(url, fmt)
    with _opened(url, storage_options or {}) as f:
        if fmt == "jsonl":
            for number, line in enumerate(f, 1):
                if line.strip():
                    yield number, line
        elif fmt == "csv":
            reader = csv.reader(io.TextIOWrapper(f, encoding="utf-8", errors="replace", newline=""))
            header = next(reader, None)
            for number, row in enumerate(reader, 1):
                if header is not None and row:
                    yield number, dict(zip(header, row, strict=False))
        else:
            number = 0
            for batch in _parquet(url, f).iter_batches(batch_size=1024):
                for row in batch.to_pylist():
                    number += 1
                    yield number, row


def _parquet(url: str, f: IO[bytes]) -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{url}: Parquet files need pyarrow: pip install 'adapterkit[parquet]'") from None
    try:
        return pq.ParquetFile(f)
    except Exception as exc:  # pyarrow's ArrowInvalid for a file that is not Parquet
        raise DataError(f"cannot read {url} as Parquet: {exc}") from None


def to_record(url: str, number: int, raw: Any) -> dict[str, Any]:
    """A raw record of :func:`iter_raw` as a dict (JSONL lines parsed here)."""
    if not isinstance(raw, bytes):
        return raw  # type: ignore[no-any-return]
    try:
        record = json.loads(raw.decode("utf-8", errors="replace"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{url} line {number}: not valid JSON ({exc.msg})") from None
    if not isinstance(record, dict):
        raise DataError(f"{url} line {number}: expected a JSON object, got {type(record).__name__}")
    return record


def read_records(url: str, fmt: str = "auto", storage_options: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """The records of a JSONL, CSV or Parquet file at ``url`` (format from the extension when ``auto``)."""
    return [to_record(url, number, raw) for number, raw in iter_raw(url, fmt, storage_options)]


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


@attrs.frozen
class Parser:
    """How one file's records become examples, decided from its first record's columns
    (``kind``: ``text``, ``image`` or ``text-to-text``); plain data, so a DataLoader worker
    process gets a copy."""

    url: str
    kind: str
    source: str  # the text, image or input column
    label: str  # the label column, or the target column of text-to-text records
    task: str
    storage_options: dict[str, Any] = attrs.field(factory=dict)

    def __call__(self, number: int, record: dict[str, Any]) -> Example:
        missing = [c for c in (self.label, self.source) if c not in record]
        if missing:
            raise DataError(f"{self.url} record {number} has no column {missing[0]!r}")
        task = record.get(self.task)
        task = None if task in (None, "") else str(task)
        label = str(record[self.label])
        if self.kind == "text-to-text":
            return Example(label=label, text=str(record[self.source]), target=label, task=task)
        if self.kind == "text":
            return Example(label=label, text=str(record[self.source]), task=task)
        where = f"{self.url} record {number}"
        image = _decode_image(record[self.source], self.url.rsplit("/", 1)[0], self.storage_options, where)
        return Example(label=label, image=image, task=task)


class FileStream(RecordStream):
    """One data file as a stream (``[data] stream = true``): raw records read lazily, each
    parsed into an example only when the pipeline takes it."""

    def __init__(self, url: str, fmt: str, storage_options: Mapping[str, Any], parser: Parser, count: int) -> None:
        self.url, self.fmt, self.storage_options = url, fmt, dict(storage_options)
        self.parser, self._count = parser, count

    def records(self) -> Iterator[tuple[int, Any]]:
        return iter_raw(self.url, self.fmt, self.storage_options)

    def example(self, number: int, record: Any) -> Example:
        return self.parser(number, to_record(self.url, number, record))

    def count(self) -> int:
        return self._count


class Files(Dataset):
    """Labelled JSONL/CSV/Parquet files from fsspec URLs (``memory://``, ``s3://``, paths, ...)."""

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
        self._stream_mode = False  # train is streamed (``stream``), not read into memory
        self._streaming: FileStream | None = None
        self.modality = "text"

    def _parser(self, url: str, columns: set[str]) -> Parser:
        """The parser of a file whose first record has ``columns`` (one-line errors for missing ones)."""
        cfg = self.config
        listed = ", ".join(sorted(columns))
        if cfg.target_column in columns:
            source = cfg.input_column if cfg.input_column in columns else cfg.text_column
            if source not in columns:
                raise DataError(
                    f"data file {url} has a {cfg.target_column!r} column but no {cfg.input_column!r} "
                    f"(or {cfg.text_column!r}); columns: {listed}"
                )
            self._text_to_text = True
            return Parser(url, "text-to-text", source, cfg.target_column, cfg.task_column)
        if cfg.label_column not in columns:
            raise DataError(f"data file {url} has no label column {cfg.label_column!r}; columns: {listed}")
        if cfg.text_column not in columns and cfg.image_column not in columns:
            raise DataError(
                f"data file {url} needs a {cfg.text_column!r} or {cfg.image_column!r} column; columns: {listed}"
            )
        self.modality = "text" if cfg.text_column in columns else "image"
        if self.modality == "text":
            return Parser(url, "text", cfg.text_column, cfg.label_column, cfg.task_column)
        return Parser(url, "image", cfg.image_column, cfg.label_column, cfg.task_column, dict(cfg.storage_options))

    def _parse(self, url: str) -> list[Example]:
        cfg = self.config
        records = read_records(url, cfg.format, cfg.storage_options)
        if not records:
            raise DataError(f"data file {url} holds no records")
        parse = self._parser(url, set(records[0]))
        return [parse(number, record) for number, record in enumerate(records, 1)]

    def _scan(self, url: str) -> tuple[FileStream, dict[str, int], set[str | None]]:
        """The train file as a stream, read once through without keeping it: every record
        parsed (errors now, not mid-run), its count, each label's first record, the tasks."""
        cfg = self.config
        labels: dict[str, int] = {}
        tasks: set[str | None] = set()
        parse: Parser | None = None
        count = 0
        for number, raw in iter_raw(url, cfg.format, cfg.storage_options):
            record = to_record(url, number, raw)
            parse = parse or self._parser(url, set(record))
            example = parse(number, record)
            labels.setdefault(example.label, number)
            tasks.add(example.task)
            count += 1
        if parse is None:
            raise DataError(f"data file {url} holds no records")
        return FileStream(url, cfg.format, cfg.storage_options, parse, count), labels, tasks

    def _load(self) -> dict[str, list[Example]]:
        if self._cache is not None:
            return self._cache
        cfg = self.config
        if self._stream_mode:
            if cfg.test is None:
                raise DataError(
                    "[data] stream = true needs a test file ([data] test = URL): holding out a fraction "
                    "of train would read the whole file into memory"
                )
            self._streaming, first, train_tasks = self._scan(cfg.train)
            train: list[Example] = []
            test = self._parse(cfg.test)
        else:
            train = self._parse(cfg.train)
            if cfg.test is not None:
                test = self._parse(cfg.test)
            else:
                keep, held = stratified_split([(e.task, e.label) for e in train], cfg.test_fraction, cfg.seed)
                train, test = [train[i] for i in keep], [train[i] for i in held]
            first = {}
            for number, e in enumerate(train, 1):
                first.setdefault(e.label, number)
            train_tasks = {e.task for e in train}
        if cfg.classes:
            self._classes = list(cfg.classes)
        else:  # text-to-text targets are free-form unless the classes are given
            self._classes = [] if self._text_to_text else sorted(first)
        known = set(self._classes)
        train_labels = sorted(first.items(), key=lambda item: item[1])
        for split, labelled in (("train", train_labels), ("test", [(e.label, n) for n, e in enumerate(test, 1)])):
            for label, number in labelled:
                if known and label not in known:
                    raise DataError(
                        f"{split} example {number}: label {label!r} is not one of the classes "
                        f"({', '.join(self._classes)})"
                    )
        all_tasks = train_tasks | {e.task for e in test}
        self._tasks = sorted(t for t in all_tasks if t is not None)
        if self._tasks and None in all_tasks:
            raise DataError(f"some records have a {cfg.task_column!r} and some do not; give every record a task")
        self._cache = {"train": train, "test": test}
        return self._cache

    def stream(self, split: Split) -> FileStream:
        """The ``train`` file as a :class:`FileStream` (``[data] stream = true``): from then
        on this dataset keeps only the test split in memory (``examples("train")`` is empty)."""
        if split != "train":
            raise DataError("only the train split streams; the test split is read into memory")
        if not self._stream_mode:
            self._stream_mode, self._cache = True, None
        self._load()
        assert self._streaming is not None
        return self._streaming

    def classes(self) -> list[str]:
        self._load()
        return list(self._classes)

    def tasks(self) -> list[str]:
        self._load()
        return list(self._tasks)

    def examples(self, split: Split) -> list[Example]:
        return list(self._load()[split])
