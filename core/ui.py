"""Console output and progress bars (rich), shared by every command. Messages go to stderr, data to stdout."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console

T = TypeVar("T")

console = Console(stderr=True, highlight=False)  # progress, tables for people, warnings
stdout = Console(highlight=False, soft_wrap=True)  # machine-readable output (JSON) and results


def track(items: Iterable[T], total: int | None = None, description: str = "working") -> Iterator[T]:
    """Iterate with a rich progress bar (count, rate, ETA) on stderr; silent when stderr is not a terminal."""
    if not sys.stderr.isatty():
        yield from items
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.speed:>7.1f}/s" if total else ""),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(description, total=total)
        for item in items:
            yield item
            progress.advance(task)
