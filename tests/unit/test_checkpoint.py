"""Checkpoints: exact resume, manifest verification, rotation, disk-full and kill -9 during saves."""

from __future__ import annotations

import copy
import errno
import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import get_scheduler

from tunewise.training import checkpoint
from tunewise.training.checkpoint import (
    CheckpointError,
    capture_rng_state,
    checkpoint_step,
    find_latest_valid,
    list_checkpoints,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    verify_checkpoint,
)

ADAPTER_CONFIG = b'{"r": 8}'


def _save(output_dir: Path, step: int, **overrides: Any) -> Path:
    arguments: dict[str, Any] = {
        "model_tensors": {"w": torch.full((4, 4), float(step))},
        "optimizer_state": {
            "state": {0: {"step": torch.tensor(float(step)), "exp_avg": torch.full((4, 4), 0.5)}},
            "param_groups": [{"lr": 0.1, "betas": (0.9, 0.999), "params": [0]}],
        },
        "scheduler_state": {"last_epoch": step, "lr_lambdas": [{}]},
        "trainer_state": {"step": step},
        "config_yaml": "learning_rate: 0.1\n",
        "extra_files": {"adapter_config.json": ADAPTER_CONFIG},
    }
    return save_checkpoint(output_dir, step, **(arguments | overrides))


def _assert_same(actual: Any, expected: Any, where: str = "state") -> None:
    """Equal values of the same types all the way down; tensors bitwise equal with the same dtype."""
    assert type(actual) is type(expected), f"{where}: {type(actual)} != {type(expected)}"
    if isinstance(expected, torch.Tensor):
        assert actual.dtype == expected.dtype and torch.equal(actual, expected), where
    elif isinstance(expected, dict):
        assert list(actual) == list(expected), where
        assert [type(k) for k in actual] == [type(k) for k in expected], f"{where}: key types changed"
        for key in expected:
            _assert_same(actual[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for index, (a, e) in enumerate(zip(actual, expected)):
            _assert_same(a, e, f"{where}[{index}]")
    else:
        assert actual == expected, where


# ------------------------------------------------------------------------------------------ round trip


def _build_training(
    seed: int,
) -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=1, num_training_steps=10)
    return model, optimizer, scheduler


def _train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler
) -> None:
    batch = torch.randn(5, 8)  # from the global RNG, so resuming must restore it
    model(batch).pow(2).mean().backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def test_resumed_training_continues_bitwise(tmp_path: Path) -> None:
    model, optimizer, scheduler = _build_training(seed=0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for _ in range(2):
        _train_step(model, optimizer, scheduler)
    optimizer_state = copy.deepcopy(optimizer.state_dict())  # the live state changes at the next step
    path = save_checkpoint(
        tmp_path,
        2,
        model_tensors=model.state_dict(),
        optimizer_state=optimizer_state,
        scheduler_state=scheduler.state_dict(),
        scaler_state=scaler.state_dict(),
        trainer_state={"step": 2, "epoch": 0, "batches_seen": 2, "best_loss": None},
        config_yaml="learning_rate: 0.01\n",
    )
    _train_step(model, optimizer, scheduler)

    loaded = load_checkpoint(path)
    assert loaded.optimizer_state is not None and loaded.scheduler_state is not None
    _assert_same(loaded.optimizer_state, optimizer_state, "optimizer")
    _assert_same(loaded.scaler_state, scaler.state_dict(), "scaler")
    resumed_model, resumed_optimizer, resumed_scheduler = _build_training(seed=1)
    assert not torch.equal(next(resumed_model.parameters()), next(model.parameters()))
    resumed_model.load_state_dict(loaded.model_tensors)
    resumed_optimizer.load_state_dict(loaded.optimizer_state)
    resumed_scheduler.load_state_dict(loaded.scheduler_state)
    restore_rng_state(loaded.rng_state)
    _train_step(resumed_model, resumed_optimizer, resumed_scheduler)

    for original, resumed in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(original, resumed)
    _assert_same(resumed_optimizer.state_dict(), optimizer.state_dict(), "optimizer")
    _assert_same(resumed_scheduler.state_dict(), scheduler.state_dict(), "scheduler")
    assert resumed_optimizer.state_dict()["state"][0]["step"].dtype == torch.float32
    assert loaded.step == 2 and loaded.trainer_state["batches_seen"] == 2
    assert loaded.config_yaml == "learning_rate: 0.01\n"


def test_nested_state_round_trips_with_types_and_flat_tensor_keys(tmp_path: Path) -> None:
    state = {
        "state": {
            3: {
                "step": torch.tensor(7.0),
                "exp_avg": torch.randn(2, 3).to(torch.bfloat16),
                "counts": torch.tensor([1, 2], dtype=torch.int64),
                "mask": torch.tensor([True, False]),
            }
        },
        "param_groups": [{"lr": 0.1, "betas": (0.9, 0.999), "foreach": None, "fused": False, "params": [3]}],
        "mixed_keys": {1: "int", "1": "str", None: 2.5, 0.5: [1, (2, [3.5, "x"])]},
        "looks_like_a_marker": {"__tensor__": "not a tensor"},
        "a.b": torch.ones(1),
        "a": {"b": torch.zeros(1)},  # same dotted key as "a.b"
        "empty": {},
    }
    path = _save(tmp_path, 1, optimizer_state=state)

    _assert_same(load_checkpoint(path).optimizer_state, state)
    with safe_open(path / "optimizer.safetensors", "pt") as tensors:
        assert "state.3.exp_avg" in set(tensors.keys())


def test_tied_and_viewed_tensors_are_saved_as_separate_copies(tmp_path: Path) -> None:
    embedding = torch.randn(6, 4)
    rows = torch.arange(12.0)
    model_tensors = {
        "embed.weight": embedding,
        "lm_head.weight": embedding,  # tied, as in many small LLMs
        "first": rows[:6],
        "second": rows[6:],  # two views of one storage
        "transposed": embedding.t(),  # not contiguous
    }

    loaded = load_checkpoint(_save(tmp_path, 1, model_tensors=model_tensors)).model_tensors

    _assert_same(dict(sorted(loaded.items())), dict(sorted(model_tensors.items())), "model")


def test_value_neither_tensor_nor_json_is_refused_and_nothing_is_left(tmp_path: Path) -> None:
    scheduler_state = {"lr_lambdas": [{"fn": lambda step: 1.0}]}

    with pytest.raises(CheckpointError, match=r"scheduler.*'lr_lambdas\.0\.fn' is a function"):
        _save(tmp_path, 1, scheduler_state=scheduler_state)
    assert list(tmp_path.iterdir()) == []


def _draw_random_numbers() -> list[float]:
    return [random.random(), *np.random.rand(2), float(np.random.standard_normal()), *torch.rand(2).tolist()]


def test_rng_state_restores_python_numpy_and_torch() -> None:
    np.random.standard_normal()  # leave a cached gaussian in numpy's state
    state = capture_rng_state()
    expected = _draw_random_numbers()
    _draw_random_numbers()

    restore_rng_state(state)

    assert _draw_random_numbers() == expected


def test_checkpoint_carries_rng_state_captured_at_save(tmp_path: Path) -> None:
    path = _save(tmp_path, 1)
    expected = _draw_random_numbers()

    restore_rng_state(load_checkpoint(path).rng_state)

    assert _draw_random_numbers() == expected


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensors_and_rng_state_round_trip(tmp_path: Path) -> None:
    weights = torch.randn(3, 3, device="cuda")
    path = _save(tmp_path, 1, model_tensors={"w": weights})
    expected = torch.rand(4, device="cuda").tolist()

    loaded = load_checkpoint(path)
    restore_rng_state(loaded.rng_state)

    assert torch.rand(4, device="cuda").tolist() == expected
    assert torch.equal(loaded.model_tensors["w"], weights.cpu())


def test_manifest_lists_every_file_and_library_versions(tmp_path: Path) -> None:
    path = _save(tmp_path, 7)
    manifest = json.loads((path / "manifest.json").read_text())

    on_disk = {p.name: p.stat().st_size for p in path.iterdir() if p.name != "manifest.json"}
    assert {name: entry["size"] for name, entry in manifest["files"].items()} == on_disk
    assert "adapter_config.json" in on_disk and (path / "adapter_config.json").read_bytes() == ADAPTER_CONFIG
    assert manifest["step"] == 7 and manifest["format_version"] == checkpoint.FORMAT_VERSION
    assert manifest["versions"]["torch"] == torch.__version__
    assert {"python", "transformers", "peft"} <= set(manifest["versions"])
    assert "scaler.json" not in on_disk and "scheduler.safetensors" not in on_disk
    loaded = load_checkpoint(path)
    assert loaded.versions == manifest["versions"] and loaded.scaler_state is None


def test_adapter_checkpoint_is_a_peft_adapter_folder(tmp_path: Path) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict

    def build_base() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))

    config = LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False)
    model = get_peft_model(build_base(), config)
    adapter_config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}
    path = _save(
        tmp_path,
        5,
        model_tensors=get_peft_model_state_dict(model),
        weights_name="adapter_model.safetensors",
        extra_files={"adapter_config.json": json.dumps(adapter_config).encode()},
    )

    reloaded = PeftModel.from_pretrained(build_base(), path)
    inputs = torch.randn(3, 8)
    assert torch.equal(reloaded(inputs), model(inputs))
    assert not torch.equal(build_base()(inputs), model(inputs))


# --------------------------------------------------------------------------------------- verification


def _damage(path: Path, how: str) -> None:
    if how == "delete":
        path.unlink()
    elif how == "truncate":
        path.write_bytes(path.read_bytes()[:-3])
    else:
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("file_name", "how"),
    [
        ("model.safetensors", "flip a byte"),
        ("optimizer.safetensors", "delete"),
        ("trainer_state.json", "truncate"),
        ("adapter_config.json", "flip a byte"),
        ("manifest.json", "delete"),
        ("manifest.json", "truncate"),
    ],
)
def test_damaged_checkpoint_is_reported_skipped_and_never_loaded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, file_name: str, how: str
) -> None:
    older = _save(tmp_path, 10)
    newer = _save(tmp_path, 20)
    _damage(newer / file_name, how)

    problems = verify_checkpoint(newer)
    with caplog.at_level(logging.WARNING, logger="tunewise"):
        latest = find_latest_valid(tmp_path)

    assert problems and all(problem.startswith(file_name) for problem in problems)
    assert latest.path == older and latest.skipped == {newer: problems}
    assert str(newer) in caplog.text and file_name in caplog.text
    with pytest.raises(CheckpointError, match=re.escape(file_name)):
        load_checkpoint(newer)
    assert load_checkpoint(older).step == 10


def test_no_valid_checkpoint_gives_none(tmp_path: Path) -> None:
    only = _save(tmp_path, 10)
    (only / "manifest.json").unlink()

    assert find_latest_valid(tmp_path).path is None
    assert find_latest_valid(tmp_path / "never-created").path is None


# ------------------------------------------------------------------------------- rotation, replacement


def _steps(output_dir: Path) -> list[int]:
    return [checkpoint_step(path) for path in list_checkpoints(output_dir)]


def test_rotation_keeps_the_newest(tmp_path: Path) -> None:
    for step in (10, 20, 30):
        _save(tmp_path, step, save_total_limit=2)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-20", "checkpoint-30"]


def test_rotation_never_deletes_a_kept_checkpoint(tmp_path: Path) -> None:
    best = _save(tmp_path, 10, save_total_limit=2)
    for step in (20, 30, 40):
        _save(tmp_path, step, save_total_limit=2, keep={best})

    assert _steps(tmp_path) == [10, 40]


def test_saving_an_existing_step_replaces_it(tmp_path: Path) -> None:
    _save(tmp_path, 10)
    path = _save(tmp_path, 10, trainer_state={"step": 10, "resumed": True})

    assert load_checkpoint(path).trainer_state == {"step": 10, "resumed": True}
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-10"]


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", ""])
    process.wait()
    return process.pid


def test_leftovers_of_crashed_saves_are_cleaned_up_or_put_back(tmp_path: Path) -> None:
    dead = _dead_pid()
    _save(tmp_path, 10).rename(tmp_path / f".tmp-replaced-10-{dead}")  # crashed between the two renames
    crashed = tmp_path / f".tmp-checkpoint-20-{dead}"
    ours = tmp_path / f".tmp-deleted-5-{os.getpid()}"  # our pid: a leftover of an earlier run
    live = tmp_path / f".tmp-checkpoint-20-{os.getppid()}"  # a save still running in another process
    unrelated = tmp_path / ".tmp-notes"
    for folder in (crashed, ours, live, unrelated):
        folder.mkdir()

    assert find_latest_valid(tmp_path).path == tmp_path / "checkpoint-10"
    _save(tmp_path, 30)

    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["checkpoint-10", "checkpoint-30", live.name, unrelated.name]
    )


# ------------------------------------------------------------------------------------------ disk full


def _write_failing_at(call: int, error_number: int) -> tuple[Callable[[Path, bytes], None], list[int]]:
    real_write = checkpoint._write_file
    calls = [0]

    def write(path: Path, data: bytes) -> None:
        calls[0] += 1
        if calls[0] == call:
            raise OSError(error_number, os.strerror(error_number), str(path))
        real_write(path, data)

    return write, calls


@pytest.mark.parametrize("error_number", [errno.ENOSPC, errno.EDQUOT])
def test_disk_full_at_any_write_fails_cleanly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error_number: int
) -> None:
    previous = _save(tmp_path, 10)
    writes_per_save = len(json.loads((previous / "manifest.json").read_text())["files"]) + 1

    for failing_call in range(1, writes_per_save + 1):
        write, calls = _write_failing_at(failing_call, error_number)
        monkeypatch.setattr(checkpoint, "_write_file", write)
        with pytest.raises(CheckpointError, match="disk is full") as raised:
            _save(tmp_path, 20, save_total_limit=1)

        message = str(raised.value)
        assert calls[0] == failing_call and isinstance(raised.value.__cause__, OSError)
        assert str(tmp_path) in message and re.search(r"free space left: \d+ bytes", message)
        assert "save_total_limit" in message and "output_dir" in message
        assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-10"]
        assert load_checkpoint(previous).step == 10


def test_other_write_errors_propagate_and_leave_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write, _ = _write_failing_at(2, errno.EIO)
    monkeypatch.setattr(checkpoint, "_write_file", write)

    with pytest.raises(OSError, match="Input/output error"):
        _save(tmp_path, 10)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------ names and inputs


def test_list_checkpoints_sorts_by_step_and_ignores_other_entries(tmp_path: Path) -> None:
    for name in ("checkpoint-100", "checkpoint-9", "checkpoint-10", ".tmp-checkpoint-7-1", "checkpoint-best"):
        (tmp_path / name).mkdir()
    (tmp_path / "checkpoint-5").write_text("a file, not a folder")

    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-9", "checkpoint-10", "checkpoint-100"]
    assert list_checkpoints(tmp_path / "missing") == []


def test_checkpoint_step_reads_the_folder_name() -> None:
    assert checkpoint_step(Path("/runs/a/checkpoint-42")) == 42
    with pytest.raises(ValueError, match="checkpoint-<step>"):
        checkpoint_step(Path("/runs/a/checkpoint-best"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"extra_files": {"manifest.json": b"{}"}}, "extra_files name 'manifest.json'"),
        ({"extra_files": {"sub/file.json": b"{}"}}, "plain file name"),
        ({"save_total_limit": 0}, "save_total_limit must be at least 1"),
        ({"weights_name": "model.bin"}, "ending in .safetensors"),
    ],
)
def test_bad_arguments_are_refused_before_writing(
    tmp_path: Path, overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        _save(tmp_path / "out", 1, **overrides)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------- kill -9

WORKER = Path(__file__).with_name("_checkpoint_worker.py")
KILL_DELAY_S = 0.4  # a save of the worker's ~3 MiB takes 50-100 ms here; kills spread over a few saves


@pytest.fixture(scope="module")
def fork_server() -> Iterator[subprocess.Popen[str]]:
    source_root = Path(checkpoint.__file__).parents[2]  # the tunewise this test imported
    python_path = os.pathsep.join(filter(None, [str(source_root), os.environ.get("PYTHONPATH")]))
    server = subprocess.Popen(
        [sys.executable, str(WORKER)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        # No GPU for the savers: each forked child would otherwise start a CUDA context to read its RNG.
        env={**os.environ, "PYTHONPATH": python_path, "CUDA_VISIBLE_DEVICES": ""},
    )
    yield server
    assert server.stdin is not None
    server.stdin.close()
    server.wait(timeout=30)


def _ask(server: subprocess.Popen[str], command: str, reply: str) -> tuple[list[str], list[int]]:
    """Send a command; return the words of its reply and the steps the saver reported before it."""
    assert server.stdin is not None and server.stdout is not None
    server.stdin.write(command + "\n")
    server.stdin.flush()
    saved = []
    while (words := server.stdout.readline().split()) and words[0] == "saved":
        saved.append(int(words[1]))
    assert words and words[0] == reply, f"worker server answered {words} to {command!r}"
    return words, saved


def _assert_newest_checkpoint_is_intact(output_dir: Path, last_saved: int) -> int:
    latest = find_latest_valid(output_dir)
    assert latest.skipped == {}, (
        "a save was seen half-done: checkpoint-<step> must appear whole or not at all"
    )
    for path in list_checkpoints(output_dir):
        assert verify_checkpoint(path) == []
    if latest.path is None:
        assert last_saved == 0
        return 0
    loaded = load_checkpoint(latest.path)
    step = loaded.step
    assert step == checkpoint_step(latest.path) and step >= last_saved
    assert loaded.optimizer_state is not None
    tensors = [*loaded.model_tensors.values(), *loaded.optimizer_state["state"][0].values()]
    assert set(loaded.model_tensors) == {"weight", "bias"} and len(tensors) == 4
    assert all(torch.all(tensor == float(step)) for tensor in tensors)
    assert loaded.trainer_state == {"step": step} and loaded.config_yaml == f"step: {step}\n"
    return step


def _kill_during_saves(server: subprocess.Popen[str], output_dir: Path, kills: int, seed: int) -> None:
    rng = random.Random(seed)
    last_saved = 0
    kills_mid_save = 0
    for _ in range(kills):
        (_, pid), saved = _ask(server, f"save {output_dir}", "started")
        time.sleep(rng.uniform(0.0, KILL_DELAY_S))
        os.kill(int(pid), signal.SIGKILL)
        (_, _, status), saved_after = _ask(server, f"reap {pid}", "reaped")
        assert os.waitstatus_to_exitcode(int(status)) == -signal.SIGKILL, (
            "the saver died before it was killed"
        )
        last_saved = max([last_saved, *saved, *saved_after])
        kills_mid_save += any(p.name.startswith(".tmp-") for p in output_dir.iterdir())
        last_saved = _assert_newest_checkpoint_is_intact(output_dir, last_saved)

    assert kills_mid_save > 0, "no kill landed inside a save; the test is not testing anything"
    assert last_saved > 0
    _save(output_dir, last_saved + 1, save_total_limit=2)  # a resumed run cleans up after the crashes
    assert not [p for p in output_dir.iterdir() if p.name.startswith(".tmp-")]


def test_kill_9_during_saves_never_leaves_a_bad_newest_checkpoint(
    fork_server: subprocess.Popen[str], tmp_path: Path
) -> None:
    _kill_during_saves(fork_server, tmp_path, kills=25, seed=0)


@pytest.mark.slow
def test_kill_9_during_saves_200_times(fork_server: subprocess.Popen[str], tmp_path: Path) -> None:
    _kill_during_saves(fork_server, tmp_path, kills=200, seed=1)
