"""ScanProgress: a rich bar on a terminal, plain periodic lines elsewhere (cron logs), nothing when quiet."""

from __future__ import annotations

import io

from rich.console import Console

from scanner.scan.progress import ScanProgress


def test_plain_lines_off_a_terminal_with_eta():
    buf = io.StringIO()
    progress = ScanProgress(Console(file=buf, force_terminal=False, width=200), total=10, plain_interval=0.0)
    progress.advance(4, errors=1)
    progress.advance(1)
    progress.close()
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[-1].startswith("scanning: 5/10 files") and "1 errors" in lines[-1] and "ETA" in lines[-1]


def test_plain_lines_are_rate_limited_and_unknown_total_has_no_eta():
    buf = io.StringIO()
    progress = ScanProgress(Console(file=buf, force_terminal=False), total=None, plain_interval=3600)
    for _ in range(100):
        progress.advance(1)
    progress.close()
    assert buf.getvalue() == ""  # under the interval: nothing yet
    assert "ETA" not in progress.line() and progress.line().startswith("scanning: 100 files")


def test_terminal_bar_and_quiet():
    buf = io.StringIO()
    progress = ScanProgress(Console(file=buf, force_terminal=True, width=160), total=None)
    progress.advance(3, errors=2)
    progress.close()
    assert "3/?" in buf.getvalue() and "2 errors" in buf.getvalue()
    quiet = ScanProgress(None, total=5)
    quiet.advance(5)
    quiet.close()
    assert quiet.done == 5
