"""The real embedded SmolLM2-135M-Instruct: conversion cache, a few LoRA steps, generation.

Marked `smollm` (deselect with -m "not smollm"); `.ci/run` runs it.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from tunewise.models import load as model_load
from tunewise.run import train

pytestmark = pytest.mark.smollm


def test_gguf_conversion_is_cached_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNEWISE_CACHE", str(tmp_path))
    source = model_load.resolve_source("smollm2-135m-instruct")
    assert source.kind == "embedded" and source.path.endswith(".gguf")
    target_parent = tmp_path / "models"
    target_parent.mkdir()
    # What a conversion killed mid-write leaves behind: a temp folder with a config but no weights.
    stale = target_parent / ".tmp-SmolLM2-135M-Instruct.Q4_1-stale-999999"
    stale.mkdir()
    (stale / "config.json").write_text("{}")

    first = model_load.materialize(source)
    assert first.parent == target_parent and not first.name.startswith(".tmp")
    assert (first / "model.safetensors").is_file() and (first / "tokenizer.json").is_file()
    config = json.loads((first / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config

    calls = []
    monkeypatch.setattr(model_load, "_convert_gguf", lambda *a: calls.append(a))
    assert model_load.materialize(source) == first and calls == []  # the cache is used, no conversion


def test_a_few_lora_steps_on_smollm2_with_generation(tmp_path: Path) -> None:
    config = {
        "data": {"dataset": "builtin:json_extract", "max_seq_length": 256, "packing": True},
        "adapter": {"method": "lora", "r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
        "training": {
            "output_dir": str(tmp_path / "run"),
            "max_steps": 4,
            "per_device_train_batch_size": 4,
            "learning_rate": 1e-3,
            "warmup_steps": 0,
            "logging_steps": 1,
        },
        "generation": {"max_new_tokens": 40},
        "evaluation": {"max_eval_samples": 4, "num_sample_prompts": 2},
    }
    summary = train(config, console=Console(file=io.StringIO()))
    assert summary["task_metric"] == "json_exact_match"
    assert summary["eval_after"]["eval_loss"] < summary["eval_before"]["eval_loss"] * 0.7
    samples = summary["samples"]
    assert len(samples) == 2 and all(s["after"] for s in samples)
    # Before training the model answers in prose or multi-line JSON, never the exact one-line form.
    assert summary["eval_before"]["json_exact_match"] <= 0.25
    assert (Path(config["training"]["output_dir"]) / "adapter_model.safetensors").is_file()
