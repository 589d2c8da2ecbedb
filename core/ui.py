"""Console output and progress bars (rich), shared by every command. Messages go to stderr, data to stdout."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from rich.console import Console

T = TypeVar("T")

# Not a terminal (a pipe, a log file, CI) and no COLUMNS: rich would wrap at 80 columns. Lines and tables keep
# their natural width instead (tables do not expand, so this only lifts the limit).
UNWRAPPED_WIDTH = 1000


def _width(stream: Any) -> int | None:
    """None (rich asks the terminal, or reads COLUMNS) on a terminal or with COLUMNS set; else no wrapping."""
    isatty = getattr(stream, "isatty", None)
    if (isatty is not None and isatty()) or os.environ.get("COLUMNS"):
        return None
    return UNWRAPPED_WIDTH


console = Console(stderr=True, highlight=False, width=_width(sys.stderr))  # progress, tables, warnings
stdout = Console(highlight=False, soft_wrap=True, width=_width(sys.stdout))  # JSON and results


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
