"""Crash safety of a whole run: checkpoint contents, resume rules, resumed == uninterrupted, kill -9 at random
moments, disk full, SIGTERM / Ctrl-C, non-finite steps.

The checkpoint module's own guarantees (atomic folders, kill -9 inside raw saves, ENOSPC) are tested in
tests/unit/test_checkpoint.py; these tests drive real training runs of a tiny llama on CPU (fp32, one thread)
through `tunewise.run.train`, the CLI, a `python -m tunewise.cli` subprocess, or the fork server
`_train_worker.py` (one python start for many runs that the test kills with SIGKILL).
"""

from __future__ import annotations

import errno
import functools
import io
import json
import logging
import math
import os
import queue
import random
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from peft import PeftModel
from rich.console import Console
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from tunewise import run
from tunewise.cli import app
from tunewise.config import schema
from tunewise.testing import tiny_chat_rows
from tunewise.training import checkpoint, loop, memory
from tunewise.training import resume as resume_module
from tunewise.training.checkpoint import list_checkpoints, load_checkpoint, verify_checkpoint
from tunewise.training.loop import LoopState, _note_overflow
from tunewise.training.loss import CausalLMLoss
from tunewise.training.resume import ResumeError

HERE = Path(__file__).parent
WORKER = HERE / "_train_worker.py"
TOLERANCE = 1e-6  # CPU fp32: resumed runs must match the uninterrupted one to this (they match bitwise today)
STEPS_PER_EPOCH = 6  # 24 rows / (2 per micro-batch x 2 micro-batches per step)


def quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread: the host is shared, and a sum's order must not depend on the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", autouse=True)
def cached_field_docs() -> Iterator[None]:
    """Speed only: dump_config re-parses the schema's source once per key (~1.5 s a run; reported as a bug)."""
    original = getattr(schema, "_field_docs", None)
    if original is None or hasattr(original, "cache_info"):
        yield
        return
    schema._field_docs = functools.cache(original)  # type: ignore[assignment]
    yield
    schema._field_docs = original  # type: ignore[assignment]


@pytest.fixture(scope="module")
def train_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in tiny_chat_rows(24, seed=1, max_words=6)))
    return path


def make_config(model_dir: Path, train_file: Path, output_dir: Path, **training: Any) -> dict:
    """Tiny run, 2 x 2 micro-batches per step, dropout in the model and in LoRA so RNG restore matters."""
    return {
        # Llama's only dropout is attention_dropout (model.dropout would have nothing to change).
        "model": {"model_name_or_path": str(model_dir), "attention_dropout": 0.1},
        "data": {"dataset": str(train_file), "max_seq_length": 64},
        "adapter": {"method": "lora", "r": 4, "lora_alpha": 8, "lora_dropout": 0.1},
        "training": {
            "output_dir": str(output_dir),
            "max_steps": 8,
            "per_device_train_batch_size": 2,
            "gradient_accumulation_steps": 2,
            "learning_rate": 5e-3,
            "warmup_steps": 0,
            "logging_steps": 1,
            "save_steps": 2,
            "save_total_limit": None,
            "precision": "fp32",  # subprocesses resume these runs: the same precision on every CPU (conftest)
            **training,
        },
        "evaluation": {"task_metric": "none", "num_sample_prompts": 0},
    }


@pytest.fixture
def config(tiny_model_dir: Path, train_file: Path, tmp_path: Path) -> dict:
    return make_config(tiny_model_dir, train_file, tmp_path / "run")


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path, train_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted in-process run every in-process resume is compared with."""
    output_dir = tmp_path_factory.mktemp("reference") / "run"
    run.train(make_config(tiny_model_dir, train_file, output_dir), console=quiet())
    return output_dir


# ------------------------------------------------------------------------------------------- helpers


def metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def step_rows(output_dir: Path) -> dict[int, dict]:
    """The training rows by step; fails if a step was logged twice (a resume must drop what it redoes)."""
    rows = [r for r in metrics(output_dir) if "loss" in r and not r.get("skipped")]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"steps logged twice: {steps}"
    return {r["step"]: r for r in rows}


def assert_same_curve(actual_dir: Path, expected_dir: Path, steps: int) -> None:
    actual, expected = step_rows(actual_dir), step_rows(expected_dir)
    assert sorted(actual) == list(range(1, steps + 1))
    assert sorted(expected) == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        for key in ("loss", "grad_norm", "learning_rate"):
            assert actual[step][key] == pytest.approx(expected[step][key], abs=TOLERANCE), (step, key)
        assert actual[step]["tokens"] == expected[step]["tokens"], step


def assert_same_adapter(actual_dir: Path, expected_dir: Path) -> None:
    actual = load_file(actual_dir / "adapter_model.safetensors")
    expected = load_file(expected_dir / "adapter_model.safetensors")
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=TOLERANCE, msg=name)


def assert_finished_as_uninterrupted(summary: dict, actual_dir: Path, expected_dir: Path) -> None:
    """A resumed run reached the end of its 8 steps with the uninterrupted run's curve and adapter."""
    assert summary["stop_reason"] == "max_steps" and summary["total_steps"] == 8
    assert_same_curve(actual_dir, expected_dir, 8)
    assert_same_adapter(actual_dir, expected_dir)


def all_finite(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return not value.is_floating_point() or bool(torch.isfinite(value).all())
    if isinstance(value, dict):
        return all(all_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(all_finite(v) for v in value)
    return not isinstance(value, float) or math.isfinite(value)


def says(output: str, phrase: str) -> bool:
    """Whether console output holds `phrase`, wherever Rich wrapped or folded its lines."""
    return "".join(phrase.split()) in "".join(output.split())


def write_yaml(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def interrupt_at(monkeypatch: pytest.MonkeyPatch, step: int, signum: int = signal.SIGTERM) -> None:
    """Signal this process once the metrics row of `step` is written, as a user (Ctrl-C: SIGINT) or a job
    scheduler (SIGTERM) would."""
    original = run.RunWriter.metrics

    def metrics_then_signal(self: run.RunWriter, row: dict) -> None:
        original(self, row)
        if row.get("step") == step and "loss" in row:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(run.RunWriter, "metrics", metrics_then_signal)


# ---------------------------------------------------------------------------------- checkpoint contents


def test_checkpoints_hold_everything_exact_resume_needs(config: dict, tiny_model_dir: Path) -> None:
    config["training"]["max_steps"] = 4
    run.train(config, console=quiet())
    out = Path(config["training"]["output_dir"])

    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    for path in list_checkpoints(out):
        assert verify_checkpoint(path) == []
        manifest = json.loads((path / "manifest.json").read_text())
        on_disk = {p.name for p in path.iterdir()} - {"manifest.json"}
        assert set(manifest["files"]) == on_disk
        assert on_disk == {
            "adapter_model.safetensors",
            "adapter_config.json",
            "optimizer.json",
            "optimizer.safetensors",
            "scheduler.json",
            "rng.json",
            "rng.safetensors",
            "trainer_state.json",
            "config.yaml",
        }  # no scaler.json: fp32 has no loss scaler
        assert {"torch", "transformers", "peft", "accelerate", "tunewise"} <= manifest["versions"].keys()
        assert (path / "config.yaml").read_text() == (out / "config.yaml").read_text()

    ck = load_checkpoint(out / "checkpoint-2")
    assert ck.step == 2
    state = ck.trainer_state
    assert (state["step"], state["epoch"], state["window"]) == (2, 0, 2)  # next: window 2 of epoch 0
    assert state["tokens"] == step_rows(out)[2]["tokens"] and state["target_tokens"] > 0
    for key in (
        "best_metric",
        "best_step",
        "evals_without_improvement",
        "consecutive_nonfinite",
        "rollbacks",
    ):
        assert key in state
    assert ck.scheduler_state is not None and ck.scheduler_state["last_epoch"] == 2
    assert ck.optimizer_state is not None
    lora = [k for k in ck.model_tensors if "lora_" in k]
    assert lora and set(ck.model_tensors) == set(lora), "adapter checkpoints hold only adapter tensors"
    moments = ck.optimizer_state["state"]
    assert len(moments) == len(lora) and all(int(s["step"]) == 2 for s in moments.values())
    assert {"python", "numpy", "torch_cpu"} <= ck.rng_state.keys()
    assert ck.config_yaml == (out / "config.yaml").read_text()

    # PEFT loads a checkpoint folder as an adapter; the last one is the final adapter.
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = PeftModel.from_pretrained(base, out / "checkpoint-4")
    loaded = {k: v for k, v in peft_model.state_dict().items() if "lora_" in k}
    final = load_file(out / "adapter_model.safetensors")
    assert len(loaded) == len(final)
    for name, tensor in final.items():
        match = [v for k, v in loaded.items() if k.replace(".default", "") == name]
        assert len(match) == 1 and torch.equal(match[0], tensor), name


# ------------------------------------------------------------------------- resumed == uninterrupted


@pytest.mark.parametrize(
    ("k", "signum"),
    [(3, signal.SIGINT), (STEPS_PER_EPOCH, signal.SIGTERM)],
    ids=["mid-epoch-ctrl-c", "epoch-end-sigterm"],
)
def test_resumed_equals_uninterrupted(
    k: int, signum: int, config: dict, reference: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopped by a signal after step k (the step finishes and is saved), resumed: the same run."""
    out = Path(config["training"]["output_dir"])
    interrupt_at(monkeypatch, k, signum)
    console = quiet()
    stopped = run.train(config, console=console)
    assert stopped["stop_reason"] == "interrupted" and stopped["total_steps"] == k
    assert list_checkpoints(out)[-1].name == f"checkpoint-{k}"
    assert says(console.file.getvalue(), "Resume with: tunewise train CONFIG --resume")  # type: ignore[attr-defined]
    monkeypatch.undo()

    console = quiet()
    summary = run.train(config, console=console, resume=True)
    assert says(console.file.getvalue(), f"checkpoint-{k} (step {k}")  # type: ignore[attr-defined]
    assert_finished_as_uninterrupted(summary, out, reference)


def test_resume_without_the_rng_would_differ(
    config: dict, reference: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Negative control: dropout is on, so a resume that did not restore the RNG would not match."""
    out = Path(config["training"]["output_dir"])
    interrupt_at(monkeypatch, 3)
    run.train(config, console=quiet())
    monkeypatch.undo()
    monkeypatch.setattr(resume_module, "restore_rng_state", lambda state: None)
    run.train(config, console=quiet(), resume=True)
    resumed, uninterrupted = step_rows(out), step_rows(reference)
    assert max(abs(resumed[s]["loss"] - uninterrupted[s]["loss"]) for s in range(4, 9)) > 1e-4


def test_a_fresh_run_sets_an_earlier_runs_files_aside_instead_of_mixing_with_them(
    config: dict, reference: Path
) -> None:
    """Run twice into one output_dir: the second run's log and checkpoints are its own, the first's are kept."""
    out = Path(config["training"]["output_dir"])
    short = {**config, "training": {**config["training"], "max_steps": 4}}
    run.train(config, console=quiet())  # 8 steps: checkpoints 2, 4, 6, 8
    written = {p.name for p in out.iterdir()}
    (out / "notes.txt").write_text("the user's own file")
    # As a save that crashed while replacing checkpoint-8 leaves it (our own pid counts as gone).
    (out / "checkpoint-8").rename(out / f".tmp-replaced-8-{os.getpid()}")
    console = quiet()
    run.train(short, console=console)  # 4 steps
    earlier = list((out / "earlier-runs").iterdir())
    assert len(earlier) == 1
    assert says(console.file.getvalue(), f"held an earlier run: its files were moved to {earlier[0]}")  # type: ignore[attr-defined]
    assert sorted(step_rows(out)) == [1, 2, 3, 4]  # only the new run's steps, each once
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert sorted(step_rows(earlier[0])) == list(range(1, 9))
    first, uninterrupted = step_rows(earlier[0]), step_rows(reference)
    assert [first[k]["loss"] for k in first] == pytest.approx(
        [uninterrupted[k]["loss"] for k in first], abs=TOLERANCE
    )
    assert sorted(p.name for p in earlier[0].glob("checkpoint-*")) == [f"checkpoint-{s}" for s in (2, 4, 6)]
    assert (
        earlier[0] / f".tmp-replaced-8-{os.getpid()}" / "manifest.json"
    ).is_file()  # a resume here won't put it back
    assert json.loads((earlier[0] / "summary.json").read_text())["total_steps"] == 8
    assert json.loads((out / "summary.json").read_text())["total_steps"] == 4
    assert (out / "notes.txt").read_text() == "the user's own file"  # not a run file: stays
    assert run.find_resume_checkpoint(out, True).name == "checkpoint-4"  # not the earlier run's checkpoint-8
    # Everything the first run wrote went aside, its model card too (the second run overwrote it).
    assert written - {"checkpoint-8"} <= {p.name for p in earlier[0].iterdir()}
    assert {"README.md", "adapter_model.safetensors", "tokenizer.json"} <= written
    assert "8 optimizer steps" in (earlier[0] / "README.md").read_text()
    assert "4 optimizer steps" in (out / "README.md").read_text()


def test_an_earlier_full_fine_tune_moves_aside_whole_and_still_loads(config: dict, tmp_path: Path) -> None:
    """A full fine-tune, then a LoRA run in the same output_dir: the earlier model keeps its config.json,
    generation config and tokenizer (it loaded nowhere without them), and none stays beside the new adapter."""
    out = Path(config["training"]["output_dir"])
    full = {**config, "adapter": {"method": "full"}, "training": {**config["training"], "max_steps": 2}}
    run.train(full, console=quiet())
    written = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer_config.json"} <= set(
        written
    )
    run.train({**config, "training": {**config["training"], "max_steps": 2}}, console=quiet())
    (earlier,) = (out / "earlier-runs").iterdir()
    assert {p.name: p.read_bytes() for p in earlier.iterdir() if p.is_file()} == written
    assert [p.name for p in earlier.glob("checkpoint-*")] == ["checkpoint-2"]
    model = AutoModelForCausalLM.from_pretrained(earlier)
    torch.testing.assert_close(
        model.state_dict()["lm_head.weight"], load_file(earlier / "model.safetensors")["lm_head.weight"]
    )
    answered = CliRunner().invoke(
        app, ["generate", "reverse: red cat", "--model", str(earlier), "--set", "max_new_tokens=4"]
    )
    assert answered.exit_code == 0, answered.output
    left = {p.name for p in out.iterdir()}
    assert not left & {"config.json", "generation_config.json", "model.safetensors"}, left
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "README.md"} <= left
    assert isinstance(load_run_adapter(out), PeftModel)


def load_run_adapter(output_dir: Path) -> PeftModel:
    base = yaml.safe_load((output_dir / "config.yaml").read_text())["model"]["model_name_or_path"]
    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), output_dir)


# ------------------------------------------------------------------------------- resume rules (CLI)


def test_cli_resume_latest_or_path_and_config_changes(config: dict, tmp_path: Path) -> None:
    runner = CliRunner()
    out = Path(config["training"]["output_dir"])
    config["training"]["max_steps"] = 4
    first = runner.invoke(app, ["train", str(write_yaml(tmp_path / "run.yaml", config))])
    assert first.exit_code == 0, first.output
    before = (out / "metrics.jsonl").read_text()

    changed = json.loads(json.dumps(config))
    changed["training"] |= {"learning_rate": 1e-3, "gradient_accumulation_steps": 1}
    refused = runner.invoke(app, ["train", str(write_yaml(tmp_path / "changed.yaml", changed)), "--resume"])
    assert refused.exit_code == 2
    message = refused.output
    assert says(message, "training.learning_rate: 0.005 -> 0.001")
    assert says(message, "training.gradient_accumulation_steps: 2 -> 1")
    assert says(message, "--force-resume") and "max_steps" not in message
    assert (out / "metrics.jsonl").read_text() == before, "a refused resume must not touch the run"

    # Keys that change how long or how often, never what a step computes, may change without --force-resume.
    # Resuming a finished run with a larger max_steps continues it.
    config["training"] |= {"max_steps": 6, "save_steps": 1, "save_total_limit": 10, "logging_steps": 1}
    longer = write_yaml(tmp_path / "longer.yaml", config)
    latest = runner.invoke(app, ["train", str(longer), "--resume"])
    assert latest.exit_code == 0, latest.output
    assert says(latest.output, "checkpoint-4 (step 4")
    assert sorted(step_rows(out)) == [1, 2, 3, 4, 5, 6]
    assert json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())["step"] == 6

    # --resume PATH picks that checkpoint; the rows logged after it are dropped and logged again.
    chosen = runner.invoke(app, ["train", str(longer), "--resume", str(out / "checkpoint-2")])
    assert chosen.exit_code == 0, chosen.output
    assert says(chosen.output, "checkpoint-2 (step 2")
    rows = step_rows(out)
    assert sorted(rows) == [1, 2, 3, 4, 5, 6]
    first_rows = [json.loads(line) for line in before.splitlines()]
    assert [rows[s] for s in (1, 2)] == [r for r in first_rows if r.get("step") in (1, 2) and "loss" in r]

    # Forced, the changed values apply: the rate (on the schedule of the new max_steps) and weight decay.
    changed["training"] |= {"max_steps": 8, "save_steps": 1, "save_total_limit": 10, "weight_decay": 0.1}
    forced = runner.invoke(
        app, ["train", str(write_yaml(tmp_path / "forced.yaml", changed)), "--force-resume", "--resume"]
    )
    assert forced.exit_code == 0, forced.output
    assert says(forced.output, "checkpoint-6 (step 6")
    assert sorted(step_rows(out)) == list(range(1, 9))
    assert rows_lr(out, 7) == pytest.approx(1e-3 * (8 - 6) / 8)
    assert rows_lr(out, 8) == pytest.approx(1e-3 * (8 - 7) / 8)
    optimizer_state = load_checkpoint(out / "checkpoint-8").optimizer_state
    assert optimizer_state is not None
    assert 0.1 in [g["weight_decay"] for g in optimizer_state["param_groups"]]  # the weight matrices' group


@pytest.mark.parametrize(
    ("args", "resume", "force"),
    [
        (["--resume"], "newest", False),
        (["--resume", "ckpt-dir"], "ckpt-dir", False),
        (["--resume", "--force-resume"], "newest", True),
        (["--force-resume", "--resume", "ckpt-dir"], "ckpt-dir", True),
    ],
)
def test_cli_resume_takes_an_optional_path(
    args: list[str], resume: str, force: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--resume` alone means the newest valid checkpoint; `--resume PATH` that one (parsing only)."""
    calls: list[dict] = []
    monkeypatch.setattr(run, "train", lambda *a, **kw: calls.append(kw))
    result = CliRunner().invoke(app, ["train", str(tmp_path / "cfg.yaml"), *args])
    assert result.exit_code == 0, result.output
    (call,) = calls
    assert call["force_resume"] is force
    if resume == "newest":
        assert call["resume"] in (True, "latest")  # what run.train reads as "the newest valid checkpoint"
    else:
        assert str(call["resume"]) == resume


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--force-resume"], "--force-resume continues a run despite a changed config: it needs --resume"),
        (["ckpt-dir"], "ckpt-dir: a checkpoint argument needs --resume"),
    ],
)
def test_cli_resume_options_without_resume_are_errors(
    args: list[str], error: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--force-resume alone started afresh, moving aside the run it was meant to continue."""
    calls: list[dict] = []
    monkeypatch.setattr(run, "train", lambda *a, **kw: calls.append(kw))
    result = CliRunner().invoke(app, ["train", str(tmp_path / "cfg.yaml"), *args])
    assert result.exit_code == 2 and calls == []
    assert " ".join(result.output.split()) == f"error: {error}"


def test_resume_given_a_run_directory_or_a_checkpoint_as_the_config_says_what_to_give(
    config: dict, tmp_path: Path
) -> None:
    """`--resume RUN_DIR` was called a damaged checkpoint, with the advice to delete it (the whole run), and
    `train --resume CHECKPOINT` without a config read the checkpoint as the config ("Is a directory")."""
    runner = CliRunner()
    out = Path(config["training"]["output_dir"])
    config["training"]["max_steps"] = 4
    path = write_yaml(tmp_path / "run.yaml", config)
    assert runner.invoke(app, ["train", str(path)]).exit_code == 0
    before = (out / "metrics.jsonl").read_text()

    run_dir = runner.invoke(app, ["train", str(path), "--resume", str(out)])
    assert run_dir.exit_code == 2
    assert says(run_dir.output, f"{out} is a run directory, not a checkpoint: use --resume alone")
    assert says(run_dir.output, f"--resume {out / 'checkpoint-4'}. It holds checkpoint-2, checkpoint-4")
    assert "delete" not in run_dir.output and "damaged" not in run_dir.output
    empty = tmp_path / "empty"
    empty.mkdir()
    neither = runner.invoke(app, ["train", str(path), "--resume", str(empty)])
    assert neither.exit_code == 2 and says(neither.output, f"{empty} is not a checkpoint")
    assert "delete" not in neither.output
    assert (out / "metrics.jsonl").read_text() == before, "a refused resume must not touch the run"

    checkpoint_as_config = runner.invoke(app, ["train", "--resume", str(out / "checkpoint-2")])
    assert checkpoint_as_config.exit_code == 2
    assert "Is a directory" not in checkpoint_as_config.output
    command = f"tunewise train {out / 'checkpoint-2' / 'config.yaml'} --resume {out / 'checkpoint-2'}"
    assert says(checkpoint_as_config.output, f"{out / 'checkpoint-2'}: is a checkpoint, not a config file")
    assert says(checkpoint_as_config.output, command)
    run_as_config = runner.invoke(app, ["train", "--resume", str(out)])
    assert run_as_config.exit_code == 2
    assert says(run_as_config.output, f"tunewise train {out / 'config.yaml'} --resume continues that run")

    # The suggested command resumes from that checkpoint.
    suggested = runner.invoke(app, shlex.split(command)[1:])
    assert suggested.exit_code == 0, suggested.output
    assert says(suggested.output, "checkpoint-2 (step 2")
    assert sorted(step_rows(out)) == [1, 2, 3, 4]


def rows_lr(output_dir: Path, step: int) -> float:
    return float(step_rows(output_dir)[step]["learning_rate"])


def test_api_resume_errors_and_a_moved_run_directory(config: dict, tmp_path: Path) -> None:
    out = Path(config["training"]["output_dir"])
    with pytest.raises(ResumeError, match="no valid checkpoint"):
        run.train(config, console=quiet(), resume=True)

    config["training"]["max_steps"] = 4
    run.train(config, console=quiet())
    changed = json.loads(json.dumps(config))
    changed["adapter"]["r"] = 8
    with pytest.raises(ResumeError, match=r"adapter\.r: 4 -> 8") as refused:
        run.train(changed, console=quiet(), resume=str(out / "checkpoint-2"))
    assert "--force-resume" in str(refused.value)

    # A run directory copied elsewhere (another disk, another machine) resumes there: output_dir may change.
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    config["training"] |= {"output_dir": str(moved), "max_steps": 6}
    summary = run.train(config, console=quiet(), resume=str(moved / "checkpoint-4"))
    assert summary["total_steps"] == 6 and sorted(step_rows(moved)) == [1, 2, 3, 4, 5, 6]


# ---------------------------------------------------------------------------------------- disk full


def test_disk_full_during_a_run_checkpoint(
    config: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = Path(config["training"]["output_dir"])
    write_file = checkpoint._write_file

    def full_from_checkpoint_4(path: Path, data: bytes) -> None:
        if path.parent.name.startswith(".tmp-checkpoint-4-"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        write_file(path, data)

    monkeypatch.setattr(checkpoint, "_write_file", full_from_checkpoint_4)
    cfg_path = write_yaml(tmp_path / "run.yaml", config)
    result = CliRunner().invoke(app, ["train", str(cfg_path)])
    assert result.exit_code == 2
    message = result.output
    assert says(message, "The disk is full") and says(message, "saving checkpoint-4")
    assert says(message, "earlier checkpoints are intact")
    assert says(
        message, "Free some space, lower save_total_limit, or point output_dir at a disk with more room"
    )
    assert "Traceback" not in result.output

    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2"]
    assert verify_checkpoint(out / "checkpoint-2") == []
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")], "no half-written leftovers"

    monkeypatch.undo()  # space freed: the run resumes from what survived and finishes
    resumed = CliRunner().invoke(app, ["train", str(cfg_path), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert sorted(step_rows(out)) == list(range(1, 9))


# ----------------------------------------------------------------------------------- non-finite steps


def inject_nan(monkeypatch: pytest.MonkeyPatch, attempts: set[int], accumulation: int = 2) -> list[list[int]]:
    """NaN loss on the given optimizer-step attempts (1-based, skipped ones included); returns the example ids
    of every window the loop drew, in order, to compare with what the loop logged."""
    forward, windows_from = CausalLMLoss.forward, loop.windows_from
    calls = 0
    drawn: list[list[int]] = []

    def nan_forward(self: CausalLMLoss, *args: Any, **kwargs: Any) -> torch.Tensor:
        nonlocal calls
        loss = forward(self, *args, **kwargs)
        if not self.training:
            return loss
        calls += 1
        return loss * float("nan") if (calls - 1) // accumulation + 1 in attempts else loss

    def recorded(*args: Any, **kwargs: Any) -> Iterator[Any]:
        for item in windows_from(*args, **kwargs):
            drawn.append(sorted(i for ids in item[2] for i in ids))
            yield item

    monkeypatch.setattr(CausalLMLoss, "forward", nan_forward)
    monkeypatch.setattr(loop, "windows_from", recorded)
    return drawn


def assert_checkpoints_finite(output_dir: Path) -> None:
    for path in list_checkpoints(output_dir):
        ck = load_checkpoint(path)
        assert all_finite(ck.model_tensors) and all_finite(ck.optimizer_state), path


def test_nonfinite_steps_are_skipped_then_the_run_stops(
    config: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = Path(config["training"]["output_dir"])
    config["training"] |= {"nonfinite_patience": 3, "nonfinite_policy": "stop"}
    drawn = inject_nan(monkeypatch, {3, 6, 7, 8})
    result = CliRunner().invoke(app, ["train", str(write_yaml(tmp_path / "run.yaml", config))])

    assert result.exit_code == 2
    message = result.output
    assert says(
        message, "3 consecutive steps had a non-finite loss or gradient norm (skipped steps [5, 5, 5]"
    )
    assert says(message, "set training.nonfinite_policy: rollback")
    assert "Traceback" not in result.output
    skipped = [r for r in metrics(out) if r.get("skipped")]
    # attempt 3 is step 3's first try; attempts 6-8 are three tries at step 5 (attempts 4, 5 made steps 3, 4)
    assert [r["step"] for r in skipped] == [3, 5, 5, 5]
    assert [r["example_ids"] for r in skipped] == [drawn[2], drawn[5], drawn[6], drawn[7]]
    assert all(len(r["example_ids"]) == 4 and r["loss"] == "nan" for r in skipped)
    assert sorted(step_rows(out)) == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) for r in step_rows(out).values())
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    assert_checkpoints_finite(out)
    assert load_checkpoint(out / "checkpoint-4").trainer_state["skipped_steps"] == [3]


def test_nonfinite_rollback_lowers_the_learning_rate(config: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    out = Path(config["training"]["output_dir"])
    config["training"] |= {"nonfinite_patience": 2, "nonfinite_policy": "rollback"}
    # Attempt 5 makes step 5; 6, 7 fail (step 6 twice): back to checkpoint-4 at half the rate, step 5
    # trained again. Attempts 8, 9 make steps 5, 6 (checkpoint-6 holds the halved rate); 10, 11 fail:
    # back to checkpoint-6, a quarter of the rate; 12, 13 make steps 7, 8.
    inject_nan(monkeypatch, {6, 7, 10, 11})
    console = quiet()
    summary = run.train(config, console=console)

    assert summary["stop_reason"] == "max_steps" and summary["total_steps"] == 8
    assert summary["skipped_steps"] == [6, 6, 7, 7]
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert says(text, "rolled back to checkpoint-4; learning rate x0.5")
    assert says(text, "rolled back to checkpoint-6; learning rate x0.25")
    rows = [r for r in metrics(out) if "loss" in r]
    logged_steps = [r["step"] for r in rows]
    # Skipped tries stay as rows (their example ids); step 5's first, rolled-back row is gone.
    assert logged_steps == [1, 2, 3, 4, 6, 6, 5, 6, 7, 7, 7, 8]
    assert [r["step"] for r in rows if r.get("skipped")] == [6, 6, 7, 7]

    def scheduled(step: int) -> float:  # linear decay over 8 steps, no warmup: the configured schedule
        return 5e-3 * (8 - step + 1) / 8

    trained = step_rows(out)  # one row per step
    for step, factor in [(1, 1), (4, 1), (5, 0.5), (6, 0.5), (7, 0.25), (8, 0.25)]:
        assert trained[step]["learning_rate"] == pytest.approx(scheduled(step) * factor), step
    assert load_checkpoint(out / "checkpoint-8").trainer_state["rollbacks"] == 2
    assert_checkpoints_finite(out)


def test_repeated_fp16_overflows_suggest_bf16(caplog: pytest.LogCaptureFixture) -> None:
    state = LoopState()
    with caplog.at_level(logging.WARNING, logger="tunewise"):
        for _ in range(100):
            _note_overflow(state)
    assert state.fp16_overflows == 100
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2  # at 10 and 100 overflows, not once per overflow
    assert "skipped 10 updates" in warnings[0] and "skipped 100 updates" in warnings[1]
    assert all("bf16" in w and "precision: bf16" in w for w in warnings)


# ------------------------------------------------------------------------------------------ out of memory


def record_forwards(monkeypatch: pytest.MonkeyPatch, fail_when: Any = None) -> list[int]:
    """Tokens in the input of every training forward, in order; `fail_when(call, tokens)` true makes that
    forward raise torch's out-of-memory error, as the CUDA caching allocator raises it."""
    forward = CausalLMLoss.forward
    sizes: list[int] = []

    def recorded(self: CausalLMLoss, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.training:
            sizes.append(int(kwargs["input_ids"].numel()))
            if fail_when is not None and fail_when(len(sizes), sizes[-1]):
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(CausalLMLoss, "forward", recorded)
    return sizes


def train_until_it_fails(config: dict, tmp_path: Path) -> tuple[Path, str]:
    """`tunewise train` on `config` written to a file: it must stop with exit status 2 and a message, no
    traceback. Returns the config's path and the output."""
    config_path = write_yaml(tmp_path / "run.yaml", config)
    result = CliRunner().invoke(app, ["train", str(config_path)], env={"COLUMNS": "400"})
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    return config_path, result.output


def packed_rows_of_varied_length(config: dict, output_dir: Path, **training: Any) -> dict:
    """The run with packed micro-batches of 2 examples of 44-94 tokens: their sizes vary (padded ones of
    max_seq_length 64 are nearly all 128 tokens)."""
    data = {**config["data"], "packing": True, "max_seq_length": 128}
    return {
        **config,
        "data": data,
        "training": {**config["training"], "output_dir": str(output_dir), **training},
    }


def test_the_memory_check_runs_the_largest_micro_batch_after_step_1_and_changes_nothing(
    config: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """training.memory_check: after step 1, one more forward and backward, of the run's largest micro-batch
    (over both epochs of the 8 steps), then the same run as without it: dropout is on, so the random state
    must be put back, and the discarded gradient must not reach the update."""
    without = packed_rows_of_varied_length(config, tmp_path / "without")
    run.train(without, console=quiet())
    checked = packed_rows_of_varied_length(config, tmp_path / "checked", memory_check=True)
    sizes = record_forwards(monkeypatch)
    console = quiet()
    summary = run.train(checked, console=console)

    assert len(sizes) == 8 * 2 + 1  # 8 steps of 2 micro-batches, and the check
    steps = [sizes[:2]] + [sizes[3 + 2 * i : 5 + 2 * i] for i in range(7)]
    largest = max(max(step) for step in steps)
    assert largest > max(steps[0]), "this data's largest micro-batch is not in step 1 (else nothing to check)"
    assert sizes[2] == largest
    step = 1 + next(i for i, s in enumerate(steps) if largest in s)
    check = summary["memory_check"]
    assert {k: check[k] for k in ("largest_micro_batch_tokens", "step", "ran")} == {
        "largest_micro_batch_tokens": largest,
        "step": step,
        "ran": True,
    }
    assert 0 < check["peak_memory_bytes"] <= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    shown = f"memory check: the run's largest micro-batch ({largest:,} tokens, step {step}) fits; peak"
    assert says(console.file.getvalue(), shown)  # type: ignore[attr-defined]
    assert_same_curve(tmp_path / "checked", tmp_path / "without", 8)
    assert_same_adapter(tmp_path / "checked", tmp_path / "without")

    # Negative control: without putting the random state back, the check's dropout draws change the run.
    monkeypatch.setattr(loop, "restore_rng_state", lambda state: None)
    run.train(
        packed_rows_of_varied_length(config, tmp_path / "unrestored", memory_check=True), console=quiet()
    )
    moved, kept = step_rows(tmp_path / "unrestored"), step_rows(tmp_path / "without")
    assert max(abs(moved[s]["loss"] - kept[s]["loss"]) for s in range(2, 9)) > 1e-4


def test_the_memory_check_is_skipped_when_step_1_held_the_largest_micro_batch(
    config: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Padded micro-batches of max_seq_length 64 here are nearly all 2 x 64 tokens: step 1 already ran one."""
    config["training"]["memory_check"] = True
    sizes = record_forwards(monkeypatch)
    summary = run.train(config, console=quiet())
    assert len(sizes) == 16 and max(sizes[:2]) == max(sizes)
    check = summary["memory_check"]
    assert (check["largest_micro_batch_tokens"], check["step"], check["ran"]) == (max(sizes), 1, False)


def test_out_of_memory_in_a_step_saves_the_last_one_and_the_printed_resume_finishes_the_run(
    config: dict, reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Step 5's first micro-batch runs out of memory (no periodic checkpoint since step 0): step 4 is saved with
    the random state step 5 began from, the message says so and what to change, exit 2. The printed command
    (gradient checkpointing on, which a resume accepts) then trains steps 5-8 exactly as the uninterrupted run."""
    out = Path(config["training"]["output_dir"])
    config["training"]["save_steps"] = 100
    record_forwards(monkeypatch, fail_when=lambda call, tokens: call == 9)
    config_path, message = train_until_it_fails(config, tmp_path)
    assert says(message, "Out of memory on cpu in step 5, at a micro-batch of")
    assert says(message, "CUDA out of memory. Tried to allocate 2.00 GiB.")
    assert says(message, "Step 4 is saved in checkpoint-4: no finished step is lost.")
    assert says(message, "training.gradient_checkpointing: true")
    assert says(message, "data.packing: true with training.max_tokens_per_micro_batch")
    command = f"tunewise train {config_path} --set training.gradient_checkpointing=true --resume"
    assert says(message, command)
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-4"]
    assert load_checkpoint(out / "checkpoint-4").trainer_state["stop_reason"] == "out_of_memory"
    assert sorted(step_rows(out)) == [1, 2, 3, 4]
    monkeypatch.undo()

    summary = run.train(str(config_path), ["training.gradient_checkpointing=true"], quiet(), resume=True)
    assert_finished_as_uninterrupted(summary, out, reference)


def test_an_unexpected_error_in_a_step_saves_the_last_finished_one_before_it_goes_on(
    config: dict, reference: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug in a forward (a custom model's, say) at step 5 with no periodic checkpoint: the error reaches the
    caller as it was, after step 4 is saved with the random state step 5 began from; fixed, the run resumes
    there and finishes as the uninterrupted one."""
    out = Path(config["training"]["output_dir"])
    config["training"]["save_steps"] = 100
    forward = CausalLMLoss.forward
    calls: list[int] = []

    def buggy(self: CausalLMLoss, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.training:
            calls.append(1)
            if len(calls) == 9:  # step 5's first micro-batch
                raise RuntimeError("index 4096 is out of bounds for dimension 0 with size 4096")
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(CausalLMLoss, "forward", buggy)
    with (
        caplog.at_level(logging.ERROR, logger="tunewise"),
        pytest.raises(RuntimeError, match="out of bounds"),
    ):
        run.train(config, console=quiet())
    assert "step 4 is saved in checkpoint-4: after this error, `--resume` continues there" in caplog.text
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-4"]
    assert load_checkpoint(out / "checkpoint-4").trainer_state["stop_reason"] == "error"
    monkeypatch.undo()

    summary = run.train(config, console=quiet(), resume=True)
    assert_finished_as_uninterrupted(summary, out, reference)


def test_out_of_memory_in_an_evaluation_saves_that_step_and_suggests_a_smaller_eval_batch(
    config: dict, reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The evaluation after step 4 runs out of memory: step 4, finished, is saved with the random state it ended
    with; the fix (a smaller per_device_eval_batch_size) is one a resume accepts, and the resumed run trains
    as the uninterrupted one (evaluation draws no random numbers here)."""
    out = Path(config["training"]["output_dir"])
    validation = tmp_path / "validation.jsonl"
    validation.write_text("".join(json.dumps(r) + "\n" for r in tiny_chat_rows(6, seed=2, max_words=6)))
    config["data"]["validation_file"] = str(validation)
    config["training"] |= {"save_steps": 100, "eval_steps": 4}
    trained = record_forwards(monkeypatch)
    forward = CausalLMLoss.forward

    def evaluation_too_large(self: CausalLMLoss, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not self.training and len(trained) >= 8:  # after step 4's two micro-batches
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB.")
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(CausalLMLoss, "forward", evaluation_too_large)
    config_path, message = train_until_it_fails(config, tmp_path)
    assert says(message, "Out of memory on cpu in the evaluation after step 4: CUDA out of memory.")
    assert says(message, "Step 4 is saved in checkpoint-4")
    assert says(message, "training.per_device_eval_batch_size: 8 (now 16;")
    assert says(message, f"tunewise train {config_path} --set training.per_device_eval_batch_size=8 --resume")
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-4"]
    assert load_checkpoint(out / "checkpoint-4").trainer_state["evaluation_due"] is True
    assert not [r for r in metrics(out) if "eval_loss" in r and r["step"] == 4]
    monkeypatch.undo()

    summary = run.train(str(config_path), ["training.per_device_eval_batch_size=8"], quiet(), resume=True)
    assert_finished_as_uninterrupted(summary, out, reference)
    # The evaluation that ran out of memory ran first on resume and counted, as in a run without the failure.
    evaluated = [r["step"] for r in metrics(out) if "eval_loss" in r and r["step"] > 0]  # not the one before
    assert evaluated[:2] == [4, 8]
    ck = load_checkpoint(out / "checkpoint-4").trainer_state
    assert ck["evaluation_due"] is False and ck["best_step"] == 4


def test_out_of_memory_in_the_evaluation_after_training_resumes_to_evaluate_and_write_the_run(
    config: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last evaluation runs out of memory after all 8 steps: the final checkpoint is there, the error says so
    with a smaller evaluation batch, and the printed resume evaluates and writes the run without training."""
    out = Path(config["training"]["output_dir"])
    validation = tmp_path / "validation.jsonl"
    validation.write_text("".join(json.dumps(r) + "\n" for r in tiny_chat_rows(6, seed=2, max_words=6)))
    config["data"]["validation_file"] = str(validation)
    trained = record_forwards(monkeypatch)
    forward = CausalLMLoss.forward

    def evaluation_too_large(self: CausalLMLoss, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not self.training and len(trained) >= 16:  # after the last step's two micro-batches
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB.")
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(CausalLMLoss, "forward", evaluation_too_large)
    config_path, message = train_until_it_fails(config, tmp_path)
    assert says(
        message, "Out of memory on cpu in the evaluation after training (step 8): CUDA out of memory."
    )
    assert says(message, "Step 8 is saved in checkpoint-8")
    assert says(message, f"tunewise train {config_path} --set training.per_device_eval_batch_size=8 --resume")
    assert not (out / "adapter_model.safetensors").exists() and not (out / "summary.json").exists()
    monkeypatch.undo()

    sizes = record_forwards(monkeypatch)
    summary = run.train(str(config_path), ["training.per_device_eval_batch_size=8"], quiet(), resume=True)
    assert sizes == []  # no step trained again
    assert summary["total_steps"] == 8 and summary["eval_after"]["eval_loss"] > 0
    assert (out / "adapter_model.safetensors").exists() and (out / "summary.json").exists()
    # Resumed again, it evaluates again: one evaluation after training stays logged, not one per resume.
    run.train(str(config_path), ["training.per_device_eval_batch_size=8"], quiet(), resume=True)
    assert [r["step"] for r in metrics(out) if r.get("after_training")] == [8]


def test_an_early_stopped_run_whose_evaluation_after_training_runs_out_of_memory_resumes_without_training(
    config: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Early stopping ends the run before max_steps, then the evaluation after it runs out of memory: the printed
    resume evaluates and writes the run without training again, and the run stays early-stopped (the resume
    trained on to max_steps). A larger max_steps does not restart it; a larger patience does, counting on
    from the evaluations without improvement already made."""
    out = Path(config["training"]["output_dir"])
    validation = tmp_path / "validation.jsonl"
    validation.write_text("".join(json.dumps(r) + "\n" for r in tiny_chat_rows(6, seed=2, max_words=6)))
    config["data"]["validation_file"] = str(validation)
    config["adapter"] = {"method": "full"}
    # A learning rate far too high: eval_loss falls, then rises, and early stopping ends the run.
    config["training"] |= {
        "max_steps": 16,
        "learning_rate": 0.2,
        "lr_scheduler_type": "constant",
        "eval_steps": 1,
        "early_stopping_patience": 2,
    }
    stopped: list[int] = []
    fit, forward = run.fit, CausalLMLoss.forward

    def fit_and_note_its_end(*args: Any, **kwargs: Any) -> LoopState:
        state = fit(*args, **kwargs)
        stopped.append(state.step)
        return state

    def evaluation_after_training_too_large(self: CausalLMLoss, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not self.training and stopped:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB.")
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(run, "fit", fit_and_note_its_end)
    monkeypatch.setattr(CausalLMLoss, "forward", evaluation_after_training_too_large)
    config_path, message = train_until_it_fails(config, tmp_path)
    [stop] = stopped
    assert stop < 16, "early stopping never ended the run"
    assert says(message, f"the evaluation after training (step {stop}): CUDA out of memory.")
    assert says(message, f"Step {stop} is saved in checkpoint-{stop}")
    assert load_checkpoint(out / f"checkpoint-{stop}").trainer_state["stop_reason"] == "early_stopping"
    monkeypatch.undo()

    fix = ["training.per_device_eval_batch_size=8"]
    console = Console(file=io.StringIO(), width=400)
    sizes = record_forwards(monkeypatch)
    summary = run.train(str(config_path), fix, console, resume=True)
    assert sizes == []  # no step trained again
    assert summary["stop_reason"] == "early_stopping" and summary["total_steps"] == stop
    assert json.loads((out / "summary.json").read_text())["stop_reason"] == "early_stopping"
    assert summary["eval_after"]["eval_loss"] > 0 and (out / "model.safetensors").exists()
    assert says(
        console.file.getvalue(), f"the run stopped early at step {stop} (2 evaluations without improvement"
    )
    assert sorted(step_rows(out)) == list(range(1, stop + 1))

    summary = run.train(str(config_path), [*fix, "training.max_steps=20"], quiet(), resume=True)
    assert sizes == [] and summary["stop_reason"] == "early_stopping" and summary["total_steps"] == stop

    # Patience 4 with 2 evaluations without improvement restored: 2 more end it (a reset count would need 4).
    summary = run.train(str(config_path), [*fix, "training.early_stopping_patience=4"], quiet(), resume=True)
    assert summary["stop_reason"] == "early_stopping" and summary["total_steps"] == stop + 2
    assert sizes and sorted(step_rows(out)) == list(range(1, stop + 3))
    resumed = [r["eval_loss"] for r in metrics(out) if "eval_loss" in r and stop < r["step"]][:2]
    assert len(resumed) == 2 and min(resumed) > summary["best_metric"]


def test_the_memory_check_fails_after_step_1_when_the_largest_micro_batch_does_not_fit(
    config: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A device that holds step 1's micro-batches but not the run's largest: the check fails right after step 1
    (which it saves), naming the step the large micro-batch would have come in, and suggests a token budget."""
    sizes = record_forwards(monkeypatch)
    run.train(packed_rows_of_varied_length(config, tmp_path / "sizes"), console=quiet())
    limit = max(sizes[:2])  # what step 1 needed
    largest = max(sizes)
    step = 1 + next(i for i in range(8) if max(sizes[2 * i : 2 * i + 2]) == largest)
    assert largest > limit
    monkeypatch.undo()

    checked = packed_rows_of_varied_length(config, tmp_path / "run", memory_check=True, save_steps=100)
    record_forwards(monkeypatch, fail_when=lambda call, tokens: tokens > limit)
    _, message = train_until_it_fails(checked, tmp_path)

    assert says(message, f"in the memory check after step 1 (that micro-batch comes in step {step})")
    assert says(message, f"at a micro-batch of {largest:,} tokens")
    budget = max(128, largest // 2)  # never below max_seq_length
    assert says(message, f"--set training.max_tokens_per_micro_batch={budget} --resume")
    out = tmp_path / "run"
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1"]
    assert sorted(step_rows(out)) == [1]


def test_out_of_memory_advice_for_packed_rows() -> None:
    """With packing the first fix is a token budget of half the failed micro-batch, on the pad multiple and
    never below max_seq_length; a micro-batch no longer than one example gets no budget advice."""
    cfg = schema.TunewiseConfig.model_validate(
        {"data": {"packing": True, "max_seq_length": 512, "pad_to_multiple_of": 64}}
    )
    advice, sets = memory.out_of_memory_advice(cfg, 3000)
    assert sets == ["training.max_tokens_per_micro_batch=1472"]  # 1500 down to a multiple of 64
    assert advice[0].startswith("training.max_tokens_per_micro_batch: 1472")
    assert any("gradient_checkpointing: true" in line for line in advice)
    assert memory.out_of_memory_advice(cfg, 700)[1] == ["training.max_tokens_per_micro_batch=512"]
    advice, sets = memory.out_of_memory_advice(cfg, 512)
    assert sets == ["training.gradient_checkpointing=true"]
    assert not any("max_tokens_per_micro_batch" in line for line in advice)
    # Nothing left that a resume accepts: no resume command, and the message says what instead.
    padded = schema.TunewiseConfig.model_validate({"training": {"gradient_checkpointing": True}})
    advice, sets = memory.out_of_memory_advice(padded, 4096)
    assert sets == [] and advice[0].startswith("data.packing: true")
    error = memory.TrainingOutOfMemory("CUDA out of memory.", "step 9", 4096, 8, "cuda:0")
    error.advice = advice
    assert says(str(error), "Step 8 is saved in checkpoint-8")
    assert says(str(error), "`--resume --force-resume` continues approximately")


def test_out_of_memory_is_recognised_by_type_or_by_the_cpu_allocators_message() -> None:
    with pytest.raises(RuntimeError) as failed:
        torch.empty(2**50, dtype=torch.uint8)  # a real failed CPU allocation: a plain RuntimeError
    assert memory.is_out_of_memory(failed.value)
    assert memory.is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory."))
    assert not memory.is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not memory.is_out_of_memory(ValueError("out of memory"))


def test_truncating_metrics_survives_a_torn_last_line(tmp_path: Path) -> None:
    writer = run.RunWriter(tmp_path, enabled=True)
    for step in range(1, 5):
        writer.metrics({"step": step, "loss": 1.0 / step})
    with open(tmp_path / "metrics.jsonl", "a") as file:
        file.write('{"step": 5, "lo')  # kill -9 in the middle of a write
    writer.truncate_metrics(after_step=2)
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2]
    assert not list(tmp_path.glob("*.tmp*")), "the rewrite leaves no temporary file"


# --------------------------------------------------------------------------- SIGTERM / Ctrl-C (CLI)


def cli_env() -> dict[str, str]:
    # COLUMNS: Rich must not wrap the printed resume command; one thread: the host is shared. Without the huge
    # pages setting importing tunewise.cli put into this process: the command must set it itself.
    inherited = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    return {**inherited, "COLUMNS": "400", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def wait_for(condition: Any, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def logged_steps(output_dir: Path) -> bool:
    path = output_dir / "metrics.jsonl"
    return path.is_file() and '"loss"' in path.read_text()


def stepped_or_exited(run_info: dict) -> bool:
    return logged_steps(run_info["out"]) or run_info["process"].poll() is not None


@pytest.fixture(scope="module")
def signalled_runs(
    tiny_model_dir: Path, train_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, dict]:
    """Three `python -m tunewise.cli train` processes, started together to share the import time, each
    signalled once it logged a training step: SIGTERM; SIGINT; SIGINT and, once handled, a second SIGINT."""
    root = tmp_path_factory.mktemp("signals")
    runs: dict[str, dict] = {}
    for name in ("sigterm", "sigint", "sigint-twice"):
        folder = root / name
        folder.mkdir()
        cfg = make_config(tiny_model_dir, train_file, folder / "run", max_steps=500, save_steps=None)
        if name == "sigint-twice":  # long steps (16 micro-batches of 6): the second Ctrl-C lands mid-step
            cfg["training"] |= {"per_device_train_batch_size": 6, "gradient_accumulation_steps": 16}
        cfg_path = write_yaml(folder / "cfg.yaml", cfg)
        with open(folder / "stdout", "w") as stdout, open(folder / "stderr", "w") as stderr:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tunewise.cli",
                    "train",
                    str(cfg_path),
                    "--set",
                    "learning_rate=0.004",
                ],
                stdout=stdout,
                stderr=stderr,
                env=cli_env(),
                cwd=folder,
            )
        runs[name] = {
            "process": process,
            "folder": folder,
            "cfg": cfg,
            "cfg_path": cfg_path,
            "out": folder / "run",
        }
    try:
        for name, info in runs.items():
            wait_for(functools.partial(stepped_or_exited, info), f"{name} step")
            assert info["process"].poll() is None, (info["folder"] / "stderr").read_text()
            info["process"].send_signal(signal.SIGTERM if name == "sigterm" else signal.SIGINT)
        twice = runs["sigint-twice"]
        wait_for(lambda: "SIGINT received" in (twice["folder"] / "stderr").read_text(), "the first SIGINT")
        twice["process"].send_signal(signal.SIGINT)
        twice["second_signal_at"] = time.monotonic()
        for info in runs.values():
            info["returncode"] = info["process"].wait(timeout=120)
            info["ended_at"] = time.monotonic()
            info["stdout"] = (info["folder"] / "stdout").read_text()
            info["stderr"] = (info["folder"] / "stderr").read_text()
    finally:
        for info in runs.values():
            if info["process"].poll() is None:
                info["process"].kill()
                info["process"].wait()
    return runs


def test_the_command_sets_host_memory_before_torch_allocates(signalled_runs: dict[str, dict]) -> None:
    printed = " ".join(signalled_runs["sigterm"]["stdout"].split())
    assert "host memory: glibc malloc keeps freed blocks for reuse" in printed
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp.exists() and "[never]" not in thp.read_text():  # else the command leaves huge pages alone
        assert "host memory: tensors of 2 MiB and more on transparent huge pages" in printed


@pytest.mark.parametrize("name", ["sigterm", "sigint"])
def test_a_signal_finishes_the_step_saves_and_prints_how_to_resume(
    name: str, signalled_runs: dict[str, dict]
) -> None:
    info = signalled_runs[name]
    assert info["returncode"] == 0, info["stderr"][-3000:]
    # The --set overrides are part of the command: without them the resumed config would differ.
    command = f"tunewise train {shlex.quote(str(info['cfg_path']))} --set learning_rate=0.004 --resume"
    assert command in info["stdout"]
    out = info["out"]
    last = max(step_rows(out))
    # The step in flight finished, was logged, and is the one saved.
    assert [p.name for p in list_checkpoints(out)] == [f"checkpoint-{last}"]
    assert verify_checkpoint(out / f"checkpoint-{last}") == []
    state = json.loads((out / f"checkpoint-{last}" / "trainer_state.json").read_text())
    assert state["step"] == last and state["stop_reason"] == "interrupted"


def test_the_printed_command_resumes(signalled_runs: dict[str, dict]) -> None:
    """Run as printed after SIGTERM (max_steps may change on resume): the run goes on from its checkpoint."""
    info = signalled_runs["sigterm"]
    out = info["out"]
    last = max(step_rows(out))
    info["cfg"]["training"]["max_steps"] = last + 2
    write_yaml(info["cfg_path"], info["cfg"])
    command = f"tunewise train {shlex.quote(str(info['cfg_path']))} --set learning_rate=0.004 --resume"
    resumed = CliRunner().invoke(app, shlex.split(command)[1:])
    assert resumed.exit_code == 0, resumed.output
    assert says(resumed.output, f"checkpoint-{last} (step {last}")
    assert sorted(step_rows(out)) == list(range(1, last + 3))


def test_a_second_ctrl_c_exits_at_once(signalled_runs: dict[str, dict]) -> None:
    info = signalled_runs["sigint-twice"]
    assert "SIGINT received: finishing this step, saving, then exiting" in info["stderr"]
    assert info["returncode"] != 0
    assert info["ended_at"] - info["second_signal_at"] < 15  # not after finishing a step and saving
    assert "Resume with" not in info["stdout"]
    assert not list_checkpoints(info["out"])
    assert not [p for p in info["out"].iterdir() if p.name.startswith(".tmp-")]


# ---------------------------------------------------------------------------------- kill -9 (worker)


class TrainWorker:
    """Client of _train_worker.py: forks training runs, kills them, collects their events."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.log = folder, folder / "worker.log"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        with open(self.log, "w") as log:  # the worker keeps its own copy of the descriptor
            self.process = subprocess.Popen(
                [sys.executable, str(WORKER)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                env=env,
            )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.events: dict[int, list[tuple[str, int]]] = {}
        self.jobs = 0
        self._expect("ready")

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.strip())
        self.lines.put("eof")

    def _next(self, timeout: float) -> str:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"worker silent for {timeout} s; see {self.log}") from None
        assert line != "eof", f"worker died; see {self.log}"
        if line.startswith("event "):
            _, pid, what, step = line.split()
            self.events.setdefault(int(pid), []).append((what, int(step)))
        return line

    def _expect(self, prefix: str, timeout: float = 120.0) -> str:
        while not (line := self._next(timeout)).startswith(prefix):
            pass
        return line

    def _send(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def start(self, config: dict, resume: bool, **options: Any) -> int:
        self.jobs += 1
        job = self.folder / f"job-{self.jobs}.json"
        job.write_text(json.dumps({"config": config, "resume": resume, **options}))
        self._send(f"run {job}")
        pid = int(self._expect("started ").split()[1])
        self.events.setdefault(pid, [])
        return pid

    def wait_event(self, pid: int, what: str, min_step: int = 0, timeout: float = 60.0) -> bool:
        """Wait until `pid` reports `what` at a step >= min_step; False if it ends (or finishes) first."""
        deadline = time.monotonic() + timeout
        while True:
            if any(w == what and s >= min_step for w, s in self.events[pid]):
                return True
            if any(w == "done" for w, _ in self.events[pid]):
                return False
            self._next(max(0.01, deadline - time.monotonic()))

    def kill(self, pid: int) -> int:
        os.kill(pid, signal.SIGKILL)
        return self.reap(pid)

    def reap(self, pid: int) -> int:
        self._send(f"reap {pid}")
        return int(self._expect(f"reaped {pid} ", timeout=300).split()[2])

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrainWorker]:
    client = TrainWorker(tmp_path_factory.mktemp("worker"))
    yield client
    client.close()


def run_to_end(worker: TrainWorker, config: dict, resume: bool) -> list[tuple[str, int]]:
    pid = worker.start(config, resume)
    status = worker.reap(pid)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"run failed; see {worker.log}"
    return worker.events[pid]


def test_sigkill_between_micro_batches_of_a_window(
    worker: TrainWorker, tiny_model_dir: Path, train_file: Path, tmp_path: Path
) -> None:
    reference = tmp_path / "reference"
    run_to_end(worker, make_config(tiny_model_dir, train_file, reference), resume=False)

    config = make_config(tiny_model_dir, train_file, tmp_path / "run")
    out = Path(config["training"]["output_dir"])
    # Micro-batch 10 is the second of step 5's window: killed after micro-batch 9's backward pass,
    # with half of the step's gradient accumulated, after checkpoint-4.
    pid = worker.start(config, resume=False, kill_at_micro_batch=10)
    status = worker.reap(pid)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert [s for w, s in worker.events[pid] if w == "saved"] == [2, 4]
    assert sorted(step_rows(out)) == [1, 2, 3, 4]

    events = run_to_end(worker, config, resume=True)
    assert ("resumed", 4) in events
    assert_same_curve(out, reference, 8)
    assert_same_adapter(out, reference)


def kill_at_random_moments(worker: TrainWorker, config: dict, kills: int, rng: random.Random) -> int:
    """SIGKILL a run `kills` times, resuming after each; returns how many kills landed inside a save.

    Kills alternate: at a random moment of training once the child resumed (stepping, logging, saving,
    rotating; every third of these at a random moment from its start instead: loading, verifying, resuming),
    and at a random moment into a save, which is slowed down (10 ms per file) to make room.
    """
    out = Path(config["training"]["output_dir"])
    pid = worker.start(config, resume=False, slow_write_s=0.01)
    assert worker.wait_event(pid, "saved", 1), "the first run never saved"
    newest, inside_save = 0, 0
    for kill in range(kills):
        if kill > 0:
            pid = worker.start(config, resume=True, slow_write_s=0.01)
        if kill % 6 == 0:
            time.sleep(rng.uniform(0.0, 0.8))
        elif kill % 2 == 0:
            if worker.wait_event(pid, "resumed"):
                time.sleep(rng.uniform(0.0, 0.6))
        elif worker.wait_event(pid, "save-start", newest + rng.randint(1, 2)):
            time.sleep(rng.uniform(0.0, 0.03))
        status = worker.kill(pid)
        events = worker.events[pid]
        assert not any(w == "done" for w, _ in events), "the run finished before all kills: raise max_steps"
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"child failed: {worker.log}"
        # Each resume, when the child got that far before its kill, is from the newest complete checkpoint.
        assert all(s == newest for w, s in events if w == "resumed"), f"kill {kill}: {events}"
        inside_save += int(bool(events) and events[-1][0] == "save-start")

        # What a crash may leave: every checkpoint folder complete, none lost that a save reported done.
        checkpoints = list_checkpoints(out)
        for path in checkpoints:
            assert verify_checkpoint(path) == [], f"kill {kill}: {path} is damaged"
        saved = [s for w, s in events if w == "saved"]
        previous, newest = newest, int(checkpoints[-1].name.split("-")[1])
        assert newest >= max(saved + [previous]), f"kill {kill}: a finished save is gone"
    # Finish without periodic saves (save_steps may change on resume), which is quicker.
    pid = worker.start({**config, "training": {**config["training"], "save_steps": None}}, resume=True)
    status = worker.reap(pid)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"final run failed: {worker.log}"
    assert ("resumed", newest) in worker.events[pid]
    return inside_save


@pytest.mark.parametrize(
    "kills", [20, pytest.param(100, marks=pytest.mark.slow)], ids=lambda kills: f"{kills}-kills"
)
def test_kill_9_at_random_moments(
    kills: int, worker: TrainWorker, tiny_model_dir: Path, train_file: Path, tmp_path: Path
) -> None:
    steps = 2 * kills + 10  # progress per kill is ~0-2 steps: enough that the run is never finished early
    reference = make_config(tiny_model_dir, train_file, tmp_path / "reference", max_steps=steps)
    reference["training"]["save_steps"] = None  # saving must not change what a step computes
    run_to_end(worker, reference, resume=False)

    config = make_config(
        tiny_model_dir, train_file, tmp_path / "run", max_steps=steps, save_steps=1, save_total_limit=2
    )
    inside_save = kill_at_random_moments(worker, config, kills, random.Random(kills))
    assert inside_save >= kills // 4, f"only {inside_save} of {kills} kills landed inside a save"
    out = Path(config["training"]["output_dir"])
    assert_same_curve(out, tmp_path / "reference", steps)
    assert_same_adapter(out, tmp_path / "reference")
