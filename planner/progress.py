"""Progress bars on stderr (rich); a no-op when disabled so library code stays quiet in tests."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

Advance = Callable[[int], None]
_console = Console(stderr=True)
_enabled = True


def set_enabled(flag: bool) -> None:
    global _enabled
    _enabled = flag


def console() -> Console:
    return _console


def stdout_console() -> Console:
    """Console for tables on stdout. Piped or logged output gets 160 columns instead of rich's 80,
    at which the per-block plan table collapses to ellipses; ``COLUMNS`` still wins."""
    import os
    import sys

    wide = not sys.stdout.isatty() and "COLUMNS" not in os.environ
    return Console(width=160) if wide else Console()


@contextlib.contextmanager
def task(description: str, total: int, enabled: bool = True) -> Iterator[Advance]:
    """``with task("residual tables", n) as advance: ... advance(1)`` shows a bar with ETA
    (``enabled`` False: this one stays quiet)."""
    if not (_enabled and enabled):
        yield lambda n=1: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("eta"), TimeRemainingColumn())
    with Progress(*columns, console=_console, transient=False) as bar:
        tid = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(tid, n)
