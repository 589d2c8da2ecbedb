"""Console output and progress bars (rich), shared by every command. Messages go to stderr, data to stdout."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

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

    class RateColumn(TextColumn):
        """Items per second; blank until rich has measured a rate (task.speed is None at first)."""

        def __init__(self) -> None:
            super().__init__("")

        def render(self, task: Any) -> Any:
            from rich.text import Text

            return Text(f"{task.speed:>7.1f}/s" if task.speed else "")

    columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(description, total=total)
        for item in items:
            yield item
            progress.advance(task)
