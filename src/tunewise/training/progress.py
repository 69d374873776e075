"""A rich progress bar showing loss, learning rate, tokens/s and ETA."""

from __future__ import annotations

from typing import Self

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class TrainProgress:
    def __init__(self, total_steps: int, console: Console | None = None, start: int = 0) -> None:
        self._progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[tps]} tok/s"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self._task = self._progress.add_task(
            "train", total=total_steps, completed=start, loss="-", lr="-", tps="-"
        )

    def update(self, step: int, row: dict) -> None:
        self._progress.update(
            self._task,
            completed=step,
            loss=f"{row['loss']:.4f}",
            lr=f"{row['learning_rate']:.2e}",
            tps=f"{row['tokens_per_second']:.0f}",
        )

    def note(self, text: str) -> None:
        """A line above the bar."""
        self._progress.console.print(text)

    def __enter__(self) -> Self:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()
