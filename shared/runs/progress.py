"""Progress display for long steps: a rich bar on a terminal, plain lines in a log."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

T = TypeVar("T")

LOG_EVERY_S = 30.0  # off a terminal: one progress line at most this often, and one at the end


def progress_bar(items: Iterable[T], description: str, disable: bool = False) -> Iterator[T]:
    """Iterate ``items`` with a progress bar on stderr (plain lines when it is not a terminal)."""
    if disable:
        yield from items
        return
    console = Console(stderr=True)
    total = len(items) if hasattr(items, "__len__") else None
    if not console.is_terminal:
        yield from logged_progress(items, description, total)
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        yield from progress.track(items, total=total, description=description)


def logged_progress(items: Iterable[T], description: str, total: int | None) -> Iterator[T]:
    """Iterate ``items``, printing ``description: done of total, seconds`` every
    ``LOG_EVERY_S`` seconds and once at the end (a log shows a long step moving)."""
    start = last = time.monotonic()
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= LOG_EVERY_S:
            last = now
            print(progress_line(description, done, total, now - start), file=sys.stderr, flush=True)
    seconds = time.monotonic() - start
    print(progress_line(description, done, total, seconds) + ", done", file=sys.stderr, flush=True)


def progress_line(description: str, done: int, total: int | None, seconds: float) -> str:
    """``encoding item text: 12 of 57, 31 s``."""
    of_total = f" of {total:,}" if total is not None else ""
    return f"{description}: {done:,}{of_total}, {seconds:.0f} s"
