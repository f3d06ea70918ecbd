"""Progress and what reaches the loggers: which training steps' logged values the loggers get
(:func:`logs_this_step`), the training bar (:class:`TrainingBar`, Lightning's rich bar), and
one bar for the long loops outside Lightning's own (tokenization, reference precompute,
generation, evaluation): a rich bar with count, rate and ETA, on rank zero only.

Callers decide when a loop is long enough to deserve a bar (``show``); short loops, such as the
tiny runs of the tests, iterate plainly and print nothing. On a terminal that is not
interactive (a log file, a captured subprocess) rich prints the finished bar once.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import lightning as L
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import RichProgressBar
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task,
                           TextColumn, TimeElapsedColumn, TimeRemainingColumn)
from rich.text import Text

T = TypeVar("T")
# what the training bar shows besides the ``prog_bar`` values: logged every step, read on the
# logged steps only (TrainingBar)
BAR_VALUES = ("train/loss",)
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


def logs_this_step(module: L.LightningModule) -> bool:
    """Whether the loggers get this training step's values: Lightning writes a step's logged
    values on every ``trainer.log_every_n_steps``-th step (and when the run stops), and drops
    the others, so a value logged on any other step only costs host time (about half a
    millisecond per ``self.log`` call, its all-reduce under DDP/FSDP with ``sync_dist``). The
    run's last step counts too, so the report's final metrics are the last step's. Lightning's
    own test (its logger connector's ``should_update_logs``) decides; a Lightning without it
    logs every step."""
    trainer = module._trainer
    if trainer is None:
        return True
    should = getattr(getattr(trainer, "_logger_connector", None), "should_update_logs", None)
    if should is None or should or trainer.fast_dev_run:
        return True
    if trainer.max_steps > 0 and trainer.global_step + 1 >= trainer.max_steps:
        return True
    max_epochs = trainer.max_epochs if trainer.max_epochs is not None else -1
    return bool(trainer.is_last_batch and 0 < max_epochs <= trainer.current_epoch + 1)


class TrainingBar(RichProgressBar):
    """Lightning's rich bar (step count, rate, the logged ``prog_bar`` values and the training
    loss, kept on screen), whose values are read off the device on the training steps whose
    values the loggers get (:func:`logs_this_step`), not after every step: each read is a host
    sync, which on a GPU would wait for the step's optimizer kernels, with nothing of the next
    step queued. Between those steps the bar shows the last values read.

    The training loss (:data:`BAR_VALUES`) is logged without ``prog_bar``: Lightning reads
    every ``prog_bar`` value to the host at the end of every step (its logger connector's
    ``on_batch_end``), with or without a bar. This bar reads it from the callback metrics
    instead, on the same steps as the rest."""

    def __init__(self) -> None:
        super().__init__(leave=True)
        self._shown: dict[str, Any] = {}

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        if (trainer.training and not trainer.validating and not trainer.sanity_checking
                and self._shown and not logs_this_step(pl_module)):
            return self._shown
        shown = super().get_metrics(trainer, pl_module)
        logged = trainer.callback_metrics  # self.log's values: one-element tensors
        for key in BAR_VALUES:
            if key in logged and key not in shown:
                shown[key] = logged[key].item()
        self._shown = shown
        return shown


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
