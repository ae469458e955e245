"""Progress bars that suit where they are written: a live tqdm bar in a terminal, a few plain lines anywhere else.

tqdm redraws its bar with carriage returns. Redirected to a file or a pipe (CI logs, `bash quickstart.sh > log`) that
becomes one line holding thousands of updates. `progress_bar` therefore returns tqdm only when the stream is a
terminal, and otherwise a `LineProgress` that prints a start line, a line about every 10 % of the total (every 30 s
while the total is unknown) and a final line with the count and elapsed time.

Both offer the subset the CLIs use: `update(n)`, `n`, a settable `total`, `close()`.
"""

from __future__ import annotations

import math
import sys
import time
from typing import TextIO


def progress_bar(total: int | None = None, desc: str = "", unit: str = "it", file: TextIO | None = None):
    """A tqdm bar when `file` (default: stderr at call time) is a terminal, else a `LineProgress`."""
    file = sys.stderr if file is None else file
    if _isatty(file):
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, file=file)
    return LineProgress(total, desc, unit, file)


def _isatty(file) -> bool:
    try:
        return bool(file.isatty())
    except (AttributeError, ValueError):  # no isatty, or already closed: certainly not a live terminal
        return False


class LineProgress:
    """Progress as whole lines (no carriage returns): start, about every 10 % (or `interval` s), and a final line."""

    def __init__(self, total: int | None, desc: str, unit: str, file: TextIO, interval: float = 30.0):
        self.desc, self.unit, self.file, self.interval = desc, unit, file, interval
        self.n = 0
        self._t0 = self._last = time.monotonic()
        self._closed = False
        self.total = total
        self._print(self._counts())

    @property
    def total(self) -> int | None:
        return self._total

    @total.setter
    def total(self, total: int | None) -> None:
        # Callers learn the total late (simulate data) or revise it; the next report is re-derived from it.
        self._total = total or None
        self._step = math.ceil(self._total / 10) if self._total else 0
        self._next = (self.n // self._step + 1) * self._step if self._step else 0

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if self._total:
            # The line at 100 % would repeat the final one that close() prints.
            due = self._next <= self.n < self._total
        else:
            due = now - self._last >= self.interval
        if due:
            self._last = now
            if self._step:
                self._next = (self.n // self._step + 1) * self._step
            self._print(f"{self._counts()}, {now - self._t0:.0f} s")

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._print(f"{self._counts()}, done in {time.monotonic() - self._t0:.1f} s")

    def _counts(self) -> str:
        if self._total:
            return f"{self.desc}: {self.n}/{self._total} {self.unit} ({100 * self.n / self._total:.0f}%)"
        return f"{self.desc}: {self.n} {self.unit}"

    def _print(self, line: str) -> None:
        print(line, file=self.file, flush=True)
