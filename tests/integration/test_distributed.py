"""The loop under data parallelism: two CPU processes (gloo) against one process with the same global batch.

Two processes with per-device batch 2 must follow the loss curve of one process with per-device batch 4: the
same examples form each optimizer step, every micro-batch loss is divided by the target tokens of the whole
global window (counts all-reduced across ranks), and DDP averages the gradients. The 9 training rows make
each epoch's last global batch a single example, so rank 1's share is empty and it runs the loop's stand-in
micro-batch with no targets. Only rank 0 may write the run directory or print.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.state import AcceleratorState
from rich.console import Console

import tunewise.run
from tunewise.testing import tiny_chat_rows
from tunewise.training.loop import LoopState, epoch_windows, largest_micro_batch, micro_batch_tokens

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)

TOTAL_STEPS = 4  # 2 epochs x 2 windows: ceil(9 rows / 4 per global batch) = 3 batches, 2 per window


def write_config(root: Path, model_dir: Path, per_device_batch: int, name: str, **extra: dict) -> Path:
    files = {"train.jsonl": tiny_chat_rows(9, seed=1), "validation.jsonl": tiny_chat_rows(3, seed=2)}
    for file, rows in files.items():
        (root / file).write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = {
        "model": {"model_name_or_path": str(model_dir)},
        "data": {
            "dataset": str(root / "train.jsonl"),
            "validation_file": str(root / "validation.jsonl"),
            "max_seq_length": 128,
        },
        "adapter": {"method": "lora", "r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
        "training": {
            "output_dir": str(root / name),
            "num_train_epochs": 2,
            "per_device_train_batch_size": per_device_batch,
            "gradient_accumulation_steps": 2,
            "learning_rate": 1e-2,
            "warmup_steps": 1,
            "logging_steps": 1,
            "eval_steps": 3,
            # 3 validation batches: under DDP rank 0 evaluates two, rank 1 one (and one discarded rerun).
            "per_device_eval_batch_size": 1,
            "save_steps": 2,
            "save_total_limit": None,
            "precision": "fp32",
        },
        # Generation for the task metric is sharded too: rank 0 answers prompts 1 and 3, rank 1 prompt 2.
        "evaluation": {"num_sample_prompts": 3, "task_metric": "exact_match"},
        "generation": {"max_new_tokens": 8},
    }
    for section, values in extra.items():
        config[section].update(values)
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def rows(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def launch(command: list[str], logs: Path, timeout: float = 300) -> None:
    """torchrun with two local processes; each rank's output goes to its own file under `logs`."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    redirect = ["--log-dir", str(logs), "--redirects", "3"]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    done = subprocess.run(
        torchrun + redirect + command, check=False, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stderr[-4000:] + "\n".join(
        log.read_text()[-3000:] for log in sorted(logs.rglob("*.log"))
    )


def rank_output(logs: Path, rank: int) -> str:
    return "".join(log.read_text() for log in sorted(logs.rglob(f"{rank}/stdout.log")))


@pytest.fixture(scope="module")
def single_process(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], dict]:
    root = tmp_path_factory.mktemp("one-process")
    config = write_config(root, tiny_model_dir, per_device_batch=4, name="run")
    AcceleratorState._reset_state(reset_partial_state=True)
    tunewise.run.train(config, console=Console(file=io.StringIO()))
    return rows(root / "run"), json.loads((root / "run" / "summary.json").read_text())


def test_two_gloo_processes_follow_one_process(
    single_process: tuple[list[dict], dict], tiny_model_dir: Path, tmp_path: Path
) -> None:
    single_rows, single_summary = single_process
    config = write_config(tmp_path, tiny_model_dir, per_device_batch=2, name="run")
    launch(["-m", "tunewise.cli", "train", str(config)], tmp_path / "logs")
    out = tmp_path / "run"
    ddp = rows(out)

    # One writer: exactly the rows of the one-process run, once each, and one run directory.
    assert len(ddp) == len(single_rows), "\n".join(map(json.dumps, ddp))
    train_rows = [r for r in ddp if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, TOTAL_STEPS + 1))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["total_steps"] == TOTAL_STEPS and summary["stop_reason"] == "epochs"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert rank_output(tmp_path / "logs", 0).count("Run written to") == 1
    assert "plan" not in rank_output(tmp_path / "logs", 1)

    # The same training: loss, gradient norm, learning rate and token counts step by step.
    for mine, reference in zip(ddp, single_rows, strict=True):
        assert mine.keys() == reference.keys() and mine["step"] == reference["step"]
        for key in ("loss", "eval_loss"):
            if key in reference:
                assert mine[key] == pytest.approx(reference[key], abs=1e-5), (key, mine["step"])
        if "grad_norm" in reference:
            assert mine["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-5)
            for key in ("learning_rate", "tokens", "epoch"):
                assert mine[key] == reference[key], (key, mine["step"])

    # Greedy answers before training (identical weights), each prompt answered on one rank, gathered.
    samples = summary["samples"]
    assert [x["before"] for x in samples] == [x["before"] for x in single_summary["samples"]]
    assert len({x["before"] for x in samples}) == 3 and summary["task_metric"] == "exact_match"
    assert summary["eval_before"]["exact_match"] == single_summary["eval_before"]["exact_match"]


def test_two_processes_with_a_token_budget_follow_one_process(
    single_process: tuple[list[dict], dict], tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Packed rows of at most 128 tokens: each rank re-cuts its share of a step, so the ranks run different
    numbers of micro-batches (DDP syncs each once, at its last), and the loss curve is still the one process's
    padded one. With the memory check on: after step 1 each rank runs its own largest micro-batch unsynced (or
    skips it) and the ranks agree on the outcome in a collective, which changes nothing in the run."""
    # save_minutes so small that every step is due: the ranks agree on it in a collective every step.
    training = {"max_tokens_per_micro_batch": 128, "memory_check": True, "save_minutes": 1e-9}
    budget = {"data": {"packing": True}, "training": training}
    config = write_config(tmp_path, tiny_model_dir, per_device_batch=2, name="run", **budget)
    prep = tunewise.run.prepare(config)
    lengths, settings = list(prep.data.train["length"]), tunewise.run.loop_settings(prep)
    cuts = [[len(w) for e in (0, 1) for w in epoch_windows(settings, lengths, e, rank, 2)] for rank in (0, 1)]
    assert cuts[0] != cuts[1] and max(cuts[0]) > 2, cuts  # unequal, and more than accumulation's 2
    after_step_1 = LoopState(step=1, window=1)
    checked = [
        largest_micro_batch(settings, lengths, after_step_1, rank, 2).tokens  # type: ignore[union-attr]
        > max(
            micro_batch_tokens(settings, lengths, ids)
            for ids in epoch_windows(settings, lengths, 0, rank, 2)[0]
        )
        for rank in (0, 1)
    ]
    assert any(checked), "some rank's memory check runs a micro-batch"
    launch(["-m", "tunewise.cli", "train", str(config)], tmp_path / "logs")
    ddp = [r for r in rows(tmp_path / "run") if "grad_norm" in r]
    reference = [r for r in single_process[0] if "grad_norm" in r]
    assert [r["step"] for r in ddp] == [r["step"] for r in reference] == list(range(1, TOTAL_STEPS + 1))
    assert [r["loss"] for r in ddp] == pytest.approx([r["loss"] for r in reference], abs=1e-5)
    assert [r["grad_norm"] for r in ddp] == pytest.approx([r["grad_norm"] for r in reference], rel=1e-5)
    assert [r["tokens"] for r in ddp] == [r["tokens"] for r in reference]
    check = json.loads((tmp_path / "run" / "summary.json").read_text())["memory_check"]
    assert check["largest_micro_batch_tokens"] <= 128 and 1 <= check["step"] <= TOTAL_STEPS
    saved = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "run").glob("checkpoint-*"))
    assert saved == list(range(1, TOTAL_STEPS + 1))


def test_plan_under_torchrun_resolves_what_train_runs_there(tiny_model_dir: Path, tmp_path: Path) -> None:
    """`tunewise plan` launched as `train` is reads the launcher's process count (rank 0 prints): auto batch keys
    and steps as `train` resolves them under those 2 processes, not for one."""
    auto = {
        "per_device_train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "effective_batch_size": 8,
    }
    config = write_config(tmp_path, tiny_model_dir, per_device_batch=2, name="run", training=auto)
    launch(["-m", "tunewise.cli", "plan", str(config), "--json"], tmp_path / "logs")
    plan = json.loads(rank_output(tmp_path / "logs", 0))
    assert rank_output(tmp_path / "logs", 1) == ""
    trained = tunewise.run.prepare(config, world_size=2)  # as train, with PartialState's 2 processes
    keys = ("per_device_train_batch_size", "gradient_accumulation_steps", "total_steps", "warmup_steps")
    assert {k: plan["choices"][f"training.{k}"]["value"] for k in keys} == {
        k: trained.resolution.choices[f"training.{k}"].value for k in keys
    }
    assert plan["world_size"] == 2 and plan["total_steps"] == TOTAL_STEPS
    assert plan["choices"]["training.gradient_accumulation_steps"]["value"] == 1  # 8 = 4 x 1 x 2 processes


def _agree_on_flags(rank: int, port: int, out: str) -> None:
    """One of two gloo processes: each raises other flags; both must read the same answers."""
    AcceleratorState._reset_state(reset_partial_state=True)  # forked from a process that may hold one
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    from accelerate import Accelerator

    from tunewise.training.loop import any_process

    accelerator = Accelerator(cpu=True)
    stop_on_rank_0 = any_process(accelerator, rank == 0, False)  # Ctrl-C reached rank 0 first
    due_on_rank_1 = any_process(accelerator, False, rank == 1)  # rank 1's clock passed save_minutes first
    Path(out, f"{rank}.json").write_text(json.dumps([stop_on_rank_0, due_on_rank_1]))
    torch.distributed.destroy_process_group()


def test_a_stop_or_a_due_save_on_one_process_applies_to_all(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.start_processes(
        _agree_on_flags, args=(port, str(tmp_path)), nprocs=2, start_method="fork"
    )
    answers = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1)]
    assert answers == [[[True, False], [False, True]]] * 2
