"""Progress on stderr: done/total, rate and ETA.

A rich bar on a terminal; otherwise (logs, CI) a plain line every few seconds.
"""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)


def _fmt_seconds(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class ProgressReporter:
    """``with ProgressReporter("aligned", total=500, done=120) as p: p.advance(8)``."""

    def __init__(self, label: str, total: int, done: int = 0, interval_s: float = 5.0) -> None:
        self.label, self.total, self.done = label, total, done
        self.start_done, self.interval_s = done, interval_s
        self.t0 = self.last = time.monotonic()
        self._bar: Progress | None = None
        self._task = None

    def __enter__(self) -> ProgressReporter:
        if sys.stderr.isatty():
            self._bar = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
                console=Console(stderr=True), transient=False,
            )  # fmt: skip
            self._bar.start()
            self._task = self._bar.add_task(
                self.label, total=self.total, completed=self.done, rate=""
            )
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()
        elif self.total or self.done:  # (a stage that only trains counts no items)
            self._line(final=True)

    @property
    def rate(self) -> float:
        elapsed = time.monotonic() - self.t0
        return (self.done - self.start_done) / elapsed if elapsed > 0 else 0.0

    def set_total(self, total: int) -> None:
        self.total = total
        if self._bar is not None:
            self._bar.update(self._task, total=total)

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, rate=f"{self.rate:.2f}/s")
        elif time.monotonic() - self.last >= self.interval_s:
            self._line()

    def _line(self, final: bool = False) -> None:
        self.last = time.monotonic()
        rate = self.rate
        left = max(self.total - self.done, 0)
        eta = _fmt_seconds(left / rate) if rate > 0 and not final else "-"
        pct = 100 * self.done / self.total if self.total else 100.0
        print(
            f"[{self.label}] {self.done}/{self.total} ({pct:.0f}%) {rate:.2f}/s ETA {eta}",
            file=sys.stderr,
            flush=True,
        )
