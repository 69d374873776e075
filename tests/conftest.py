"""Shared fixtures: a tiny llama and a tokenizer built in-process, and data written to tmp files."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from tunewise.config import resolve
from tunewise.testing import save_tiny_model, tiny_chat_rows


@pytest.fixture(autouse=True)
def one_thread_for_tiny_models(request: pytest.FixtureRequest) -> object:
    """Tiny models run faster on one thread (no fork/join per op); the real SmolLM2 gets them all."""
    if request.node.get_closest_marker("smollm"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


_REAL_BF16_PROBE = resolve._cpu_has_bf16_matmuls


@pytest.fixture
def bench_script(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], object]:
    """Loads a script of bench/ (not a package) as a module: `bench_script("vs_trl")`."""
    # cpu_layouts.py asks for huge pages through the environment when loaded, unless the variable is set.
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "0")

    def load(name: str) -> object:
        path = Path(__file__).parents[1] / "bench" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        sys.modules.setdefault(name, module)  # dataclasses look their module up there
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(scope="session", autouse=True)
def fp32_by_default_on_every_cpu() -> Iterator[None]:
    """`precision: auto` is bf16 on a CPU with AMX or AVX512_BF16; the suite's numerics (exact reloads, HF
    references, the merged fp32 LoRA path) are written for fp32, so it hides both from the probe, for session
    and module fixtures too: the same results on every CI machine. Tests marked `real_cpu_precision` see the
    CPU as it is; tests that train in a subprocess set `training.precision: fp32` themselves."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(resolve, "_cpu_has_bf16_matmuls", lambda: False)
        yield


@pytest.fixture(autouse=True)
def real_cpu_precision_when_marked(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if request.node.get_closest_marker("real_cpu_precision"):
        monkeypatch.setattr(resolve, "_cpu_has_bf16_matmuls", _REAL_BF16_PROBE)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def chat_files(tmp_path: Path) -> tuple[Path, Path]:
    train = write_jsonl(tmp_path / "train.jsonl", tiny_chat_rows(64, seed=1))
    validation = write_jsonl(tmp_path / "validation.jsonl", tiny_chat_rows(16, seed=2))
    return train, validation


@pytest.fixture
def tiny_config(tiny_model_dir: Path, chat_files: tuple[Path, Path], tmp_path: Path) -> dict:
    """A complete config for a few fast steps on the tiny model."""
    train, validation = chat_files
    return {
        "model": {"model_name_or_path": str(tiny_model_dir)},
        "data": {"dataset": str(train), "validation_file": str(validation), "max_seq_length": 128},
        "adapter": {"method": "lora", "r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
        "training": {
            "output_dir": str(tmp_path / "run"),
            "max_steps": 12,
            "per_device_train_batch_size": 8,
            "gradient_accumulation_steps": 1,
            "learning_rate": 3e-2,
            "warmup_steps": 0,
            "logging_steps": 1,
        },
        "generation": {"max_new_tokens": 16},
        "evaluation": {"num_sample_prompts": 2, "max_eval_samples": 8},
    }
