"""Progress of a scan on stderr: a rich bar on a terminal, a plain line a minute elsewhere (cron logs).

Thread-safe: the writer thread advances it as records land on disk.
"""

from __future__ import annotations

import threading
import time

PLAIN_INTERVAL_S = 60.0


class ScanProgress:
    """`advance(done, errors)` after each write; `close()` at the end. A None console draws nothing."""

    def __init__(self, console=None, total: int | None = None, plain_interval: float = PLAIN_INTERVAL_S):
        self.console = console
        self.total = total
        self.done = 0
        self.errors = 0
        self._start = time.monotonic()
        self._last_line = self._start
        self._plain_interval = plain_interval
        self._lock = threading.Lock()
        self._bar = None
        if console is not None and console.is_terminal:
            self._bar = _rich_bar(console)
            self._task = self._bar.add_task("scan", total=total, errors=0)
            self._bar.start()

    def advance(self, done: int = 0, errors: int = 0) -> None:
        with self._lock:
            self.done += done
            self.errors += errors
            if self._bar is not None:
                self._bar.update(self._task, completed=self.done, errors=self.errors)
            elif self.console is not None and time.monotonic() - self._last_line >= self._plain_interval:
                self._last_line = time.monotonic()
                self.console.print(self.line(), highlight=False, soft_wrap=True)

    def line(self) -> str:
        elapsed = time.monotonic() - self._start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        of = f"/{self.total}" if self.total is not None else ""
        eta = ""
        if self.total is not None and rate > 0:
            eta = f", ETA {_clock((self.total - self.done) / rate)}"
        return f"scanning: {self.done}{of} files, {rate:.1f} files/s, {self.errors} errors, {_clock(elapsed)}{eta}"

    def close(self) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.update(self._task, completed=self.done, errors=self.errors)
                self._bar.stop()
                self._bar = None


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _rich_bar(console):
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, SpinnerColumn, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)
    from rich.text import Text

    class RateColumn(ProgressColumn):
        def render(self, task) -> Text:
            return Text(f"{task.speed:.1f} files/s" if task.speed else "- files/s", style="progress.data.speed")

    return Progress(
        SpinnerColumn(),
        TextColumn("[bold]scanning[/bold]"),
        BarColumn(),
        MofNCompleteColumn(),  # "n/?" while the total is unknown (directories, buckets)
        RateColumn(),
        TextColumn("[red]{task.fields[errors]} errors[/red]"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )
