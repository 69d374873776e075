"""Rich progress bars: training's (loss, learning rate, tokens/s, ETA) and an evaluation's phases."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
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

Report = Callable[[int, int], None]
"""Called after each unit of work with (done, total)."""


def _progress(console: Console | None, transient: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=transient,
    )


class TrainProgress:
    def __init__(self, total_steps: int, console: Console | None = None, start: int = 0) -> None:
        self._progress = _progress(console, transient=False)
        self._task = self._progress.add_task("train", total=total_steps, completed=start, detail="loss -")

    def update(self, step: int, row: dict) -> None:
        detail = (
            f"loss {row['loss']:.4f}  lr {row['learning_rate']:.2e}  {row['tokens_per_second']:.0f} tok/s"
        )
        self._progress.update(self._task, completed=step, detail=detail)

    def note(self, text: str) -> None:
        """A line above the bar."""
        self._progress.console.print(text)

    def eval_bars(self) -> EvalBars:
        """Bars for an evaluation during training, under the train bar while it runs."""
        return EvalBars(self._progress.console, self._progress)

    def __enter__(self) -> Self:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()


class EvalBars:
    """One bar per phase of an evaluation (its loss batches, then the answers it generates), gone when the
    phase ends. Given a running Progress (the train bar's) they join it; else each shows on its own."""

    def __init__(self, console: Console, shared: Progress | None = None) -> None:
        self.console, self.shared = console, shared

    @contextmanager
    def phase(self, name: str, unit: str) -> Iterator[Report]:
        progress = self.shared or _progress(self.console, transient=True)
        task = progress.add_task(name, total=None, detail=unit)

        def report(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        if self.shared is None:
            progress.start()
        try:
            yield report
        finally:
            if self.shared is None:
                progress.stop()
            else:
                progress.remove_task(task)
