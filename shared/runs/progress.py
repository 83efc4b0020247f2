"""Progress display for long steps (rich), quiet when not on a terminal unless asked."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

T = TypeVar("T")


def progress_bar(items: Iterable[T], description: str, disable: bool = False) -> Iterator[T]:
    """Iterate ``items`` with a progress bar on stderr."""
    if disable:
        yield from items
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
        total = len(items) if hasattr(items, "__len__") else None
        yield from progress.track(items, total=total, description=description)
