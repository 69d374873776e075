"""Progress bars: an evaluation's phases show on their own, or join the train bar and leave it as it was."""

from __future__ import annotations

import io

from rich.console import Console

from tunewise.training.progress import EvalBars, TrainProgress


def terminal() -> Console:
    return Console(file=io.StringIO(), force_terminal=True, width=140, color_system=None)


def test_an_evaluation_phase_shows_its_count_and_name() -> None:
    console = terminal()
    with EvalBars(console).phase("eval loss", "batches") as report:
        for done in range(1, 4):
            report(done, 3)
    shown = console.file.getvalue()  # type: ignore[attr-defined]  # the bar as last drawn, before it cleared
    assert "eval loss" in shown and "3/3" in shown and "batches" in shown


def test_phases_during_training_join_the_train_bar_and_leave() -> None:
    console = terminal()
    with TrainProgress(10, console) as train:
        train.update(4, {"loss": 1.25, "learning_rate": 1e-4, "tokens_per_second": 321.0})
        progress = train._progress
        with train.eval_bars().phase("answers", "prompts for exact_match") as report:
            report(2, 6)
            rows = {t.description: (t.completed, t.total, t.fields["detail"]) for t in progress.tasks}
            assert rows == {
                "train": (4, 10, "loss 1.2500  lr 1.00e-04  321 tok/s"),
                "answers": (2, 6, "prompts for exact_match"),
            }
        assert [t.description for t in progress.tasks] == ["train"]
