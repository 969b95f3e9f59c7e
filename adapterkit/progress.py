"""Progress on stderr: a tqdm bar on a terminal, plain lines in logs.

A bar redraws itself with carriage returns, which turn a log file (CI, ``nohup``,
``> run.log 2>&1``) into one unreadable line. When stderr is not a terminal, progress
is written as whole lines instead, about every tenth of the work and at the end.
"""

from __future__ import annotations

import sys
from typing import Any, Protocol, TextIO

from tqdm import tqdm


class Progress(Protocol):
    def update(self, n: int = 1) -> Any: ...
    def set_postfix(self, refresh: bool = True, **values: Any) -> None: ...
    def clear(self) -> None: ...
    def close(self) -> None: ...


class LineProgress:
    """The tqdm calls the workflows use, written as plain lines (``train: 30/300 step, loss=0.41``)."""

    def __init__(self, total: int, initial: int = 0, desc: str = "", unit: str = "it", *,
                 stream: TextIO | None = None, lines: int = 10) -> None:
        self.total, self.n, self.desc, self.unit = total, initial, desc, unit
        self.stream = stream or sys.stderr
        self.every = max(1, total // lines)
        self.postfix: dict[str, Any] = {}

    def update(self, n: int = 1) -> None:
        before, self.n = self.n, self.n + n
        if self.n // self.every > before // self.every or self.n == self.total:
            values = "".join(f", {k}={v}" for k, v in self.postfix.items())
            self.stream.write(f"{self.desc}: {self.n}/{self.total} {self.unit}{values}\n")
            self.stream.flush()

    def set_postfix(self, refresh: bool = True, **values: Any) -> None:
        self.postfix = values

    def clear(self) -> None:
        pass

    def close(self) -> None:
        pass


def progress(total: int, *, initial: int = 0, desc: str = "", unit: str = "it", enabled: bool = True) -> Progress:
    """A bar when stderr is a terminal, plain lines when it is not, nothing when not ``enabled``."""
    if enabled and not sys.stderr.isatty():
        return LineProgress(total, initial, desc, unit)
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, mininterval=0.5, disable=not enabled,
                dynamic_ncols=True)
