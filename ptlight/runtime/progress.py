"""One progress bar for the long loops outside Lightning's own (tokenization, reference
precompute, generation, evaluation): a rich bar with count, rate and ETA, on rank zero only.

Callers decide when a loop is long enough to deserve a bar (``show``); short loops, such as the
tiny runs of the tests, iterate plainly and print nothing. On a terminal that is not
interactive (a log file, a captured subprocess) rich prints the finished bar once.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from lightning.fabric.utilities.rank_zero import rank_zero_only
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task,
                           TextColumn, TimeElapsedColumn, TimeRemainingColumn)
from rich.text import Text

T = TypeVar("T")
MANY_ITEMS = 1000  # loops over more rows/examples than this show a bar (tokenizing, precompute)


class RateColumn(ProgressColumn):
    """``12.3 rows/s``, or ``4.2 s/batch`` when an item takes longer than a second."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        if not speed:
            return Text(f"? {self.unit}/s", style="progress.data.speed")
        text = f"{speed:.1f} {self.unit}/s" if speed >= 1 else f"{1 / speed:.1f} s/{self.unit}"
        return Text(text, style="progress.data.speed")


def track(items: Iterable[T], description: str, *, total: int, unit: str = "it",
          show: bool = True) -> Iterator[T]:
    """Yield ``items``; with ``show`` (and on rank zero) a bar reports count, rate and ETA."""
    if not show or getattr(rank_zero_only, "rank", 0) != 0:
        yield from items
        return
    columns = (TextColumn("[progress.description]{task.description}"), BarColumn(bar_width=20),
               MofNCompleteColumn(), RateColumn(unit), TimeElapsedColumn(), TextColumn("ETA"),
               TimeRemainingColumn())
    with Progress(*columns) as progress:
        yield from progress.track(items, total=total, description=description)
