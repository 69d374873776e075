"""QLoRA and an 8-bit base, on CPU, through bitsandbytes' CPU backend: real steps, reload, merge.

The tiny llama is 64 wide here: bitsandbytes quantises in blocks of 64 values.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import bitsandbytes as bnb
import pytest
import torch
from peft import PeftModel
from rich.console import Console

from tunewise import run
from tunewise.models.adapters import (
    LoraSettings,
    apply_method,
    check_method_support,
    count_parameters,
    memory_by_method,
    quantization_config,
)
from tunewise.models.load import load_model
from tunewise.models.memory import ParamSpec, weight_bytes
from tunewise.models.merge import merge_adapter
from tunewise.testing import save_tiny_model, tiny_chat_rows

IDS = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def wide_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama-64"), hidden_size=64, intermediate_size=128)


@pytest.fixture(scope="module")
def train_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("qlora-data") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in tiny_chat_rows(32, seed=1)))
    return path


def config(model_dir: Path, data: Path, out: Path, method: str, steps: int, **quantization: Any) -> dict:
    return {
        "model": {"model_name_or_path": str(model_dir)},
        "data": {"dataset": str(data), "validation_file": str(data), "max_seq_length": 64},
        "adapter": {"method": method, "r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
        "quantization": quantization,
        "training": {
            "output_dir": str(out),
            "max_steps": steps,
            "per_device_train_batch_size": 8,
            "learning_rate": 1e-2,
            "warmup_steps": 0,
            "logging_steps": 1,
        },
        "evaluation": {"task_metric": "none", "num_sample_prompts": 0, "max_eval_samples": 8},
    }


def train_recording(cfg: dict, monkeypatch: pytest.MonkeyPatch) -> tuple[dict, dict, Any]:
    """Train; return the summary, the parameters before training, and the prepared run after."""
    seen: dict[str, Any] = {}
    prepare_model, save_final = run.prepare_model, run.save_final

    def recording_prepare(c: Any) -> Any:
        out = prepare_model(c)
        seen["initial"] = {n: p.detach().clone() for n, p in out[0].named_parameters()}
        return out

    def recording_save(prep: Any, output_dir: Path) -> None:
        seen["prep"] = prep
        save_final(prep, output_dir)

    monkeypatch.setattr(run, "prepare_model", recording_prepare)
    monkeypatch.setattr(run, "save_final", recording_save)
    summary = run.train(cfg, console=Console(file=io.StringIO()))
    return summary, seen["initial"], seen["prep"]


def stored_bytes(param: torch.Tensor) -> int:
    """What a parameter really occupies: a 4-bit weight also keeps its (double-quantised) absmax."""
    size = param.numel() * param.element_size()
    state = getattr(param, "quant_state", None)
    if state is not None:
        size += state.absmax.numel() * state.absmax.element_size()
        size += state.state2.absmax.numel() * state.state2.absmax.element_size()
    return size


def logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def train_losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def assert_only_adapters_changed(prep: Any, initial: dict) -> set[str]:
    trained = {n for n, p in prep.model.named_parameters() if p.requires_grad}
    assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained)
    for name, param in prep.model.named_parameters():
        assert (not torch.equal(param.detach(), initial[name])) is (name in trained), name
    return trained


@pytest.mark.parametrize(
    ("bits", "quant_type", "compute_dtype"),
    [(4, "nf4", "float32"), (4, "fp4", "bfloat16"), (8, "nf4", "float32")],
)
def test_bitsandbytes_trains_lora_and_dora_on_this_cpu(
    bits: int, quant_type: str, compute_dtype: str
) -> None:
    # Measured, not assumed: the probe checks gradients against the de-quantised weight.
    args = ("qlora", bits == 4, bits == 8, True, "cpu", "olora", quant_type, compute_dtype)
    assert check_method_support(*args) == []


def test_inits_that_rewrite_the_base_weights_fail_on_a_quantised_one() -> None:
    problems = check_method_support("qlora", True, False, False, "cpu", "pissa")
    assert [p.key for p in problems] == ["adapter.init_lora_weights"]
    assert "Please initialize PiSSA under float32" in problems[0].message


def test_kbit_preparation_puts_norms_in_fp32(wide_model_dir: Path) -> None:
    quant = quantization_config(True, False, "nf4", True, "bfloat16")
    model = load_model(wide_model_dir, dtype="bfloat16", quantization_config=quant)
    model = apply_method(model, "qlora", LoraSettings(r=4), quantized=True, gradient_checkpointing=True)
    norms = [p for n, p in model.named_parameters() if "norm" in n]
    assert norms and all(p.dtype == torch.float32 and not p.requires_grad for p in norms)
    assert model.base_model.model.model.gradient_checkpointing is True
    down = model.base_model.model.model.layers[0].mlp.down_proj.base_layer
    assert isinstance(down, bnb.nn.Linear4bit)
    # The memory model's 4-bit arithmetic is bitsandbytes' real storage, byte for byte.
    state = down.weight.quant_state
    real = down.weight.numel() + state.absmax.numel() + 4 * state.state2.absmax.numel()
    assert weight_bytes(ParamSpec(tuple(state.shape), "4bit-double-quant", False)) == real


def test_an_evaluation_before_training_leaves_qlora_gradients_unchanged(wide_model_dir: Path) -> None:
    # On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight at its first no-grad eval forward for a
    # bf16 kernel without a backward; training after tunewise's eval_before then lost the input gradients.
    def gradients(evaluate_first: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)  # the same LoRA A inits
        quant = quantization_config(True, False, "nf4", True, "float32")
        model = apply_method(
            load_model(wide_model_dir, quantization_config=quant),
            "qlora",
            LoraSettings(r=4),
            quantized=True,
            gradient_checkpointing=False,
        )
        for name, param in model.named_parameters():
            if "lora_B" in name:  # B starts at zero: perturb it (seeded) so every A gets a gradient
                param.data.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(7)) / 10)
        if evaluate_first:
            logits(model)
        model.train()
        model(input_ids=IDS, labels=IDS).loss.backward()
        layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert len(layers) == 2 * 7
        assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    plain, after_eval = gradients(False), gradients(True)
    assert len(plain) == 2 * 7 * 2 and plain.keys() == after_eval.keys()
    first = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    assert plain[first].abs().max() > 1e-4  # the lowest layer's adapter gets a gradient through the body
    for name in plain:
        assert torch.allclose(after_eval[name], plain[name], atol=1e-6, rtol=1e-5), name


def test_qlora_steps_on_cpu_reload_and_merge(
    wide_model_dir: Path, train_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = config(wide_model_dir, train_file, tmp_path / "run", "qlora", steps=8)
    summary, initial, prep = train_recording(cfg, monkeypatch)
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in prep.model.modules()) == 2 * 7
    assert len(assert_only_adapters_changed(prep, initial)) == 2 * 7 * 2
    estimate = memory_by_method(
        wide_model_dir, LoraSettings(r=8), "adamw_torch", method="qlora", torch_dtype="float32", bits=4
    )["qlora"]
    assert estimate.trainable_parameters == count_parameters(prep.model)[0]
    assert estimate.weights == sum(stored_bytes(p) for p in prep.model.parameters())
    losses = train_losses(Path(summary["output_dir"]))
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.1
    assert summary["eval_after"]["eval_loss"] < summary["eval_before"]["eval_loss"] - 0.1

    out = Path(summary["output_dir"])
    quant = quantization_config(True, False, "nf4", True, "float32")
    base = load_model(wide_model_dir, quantization_config=quant)
    reloaded = PeftModel.from_pretrained(base, out)
    assert torch.allclose(logits(reloaded), logits(prep.model), atol=1e-5, rtol=0)

    merged = merge_adapter(out, tmp_path / "merged")
    assert any("de-quantises" in note for note in merged.notes)
    full_precision = PeftModel.from_pretrained(load_model(wide_model_dir), out)
    merged_model = load_model(merged.output_dir)
    assert torch.allclose(logits(merged_model), logits(full_precision), atol=1e-4, rtol=0)


def test_an_8bit_base_steps_on_cpu_and_reloads(
    wide_model_dir: Path, train_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = config(wide_model_dir, train_file, tmp_path / "run", "lora", steps=5, load_in_8bit=True)
    summary, initial, prep = train_recording(cfg, monkeypatch)
    assert sum(isinstance(m, bnb.nn.Linear8bitLt) for m in prep.model.modules()) == 2 * 7
    assert_only_adapters_changed(prep, initial)
    losses = train_losses(Path(summary["output_dir"]))
    assert losses[-1] < losses[0] - 0.05
    base = load_model(wide_model_dir, quantization_config=quantization_config(False, True))
    reloaded = PeftModel.from_pretrained(base, Path(summary["output_dir"]))
    assert torch.allclose(logits(reloaded), logits(prep.model), atol=1e-5, rtol=0)


def test_bitsandbytes_missing_cpu_inference_kernel_is_not_reported() -> None:
    # tunewise never repacks 4-bit weights for that kernel; other bitsandbytes warnings still pass.
    import logging

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")

    def record(message: str) -> logging.LogRecord:
        return logger.makeRecord(logger.name, logging.WARNING, __file__, 1, message, (), None)

    assert not logger.filter(record("Failed to load CPU gemm_4bit_forward from kernels-community: offline"))
    assert logger.filter(record("some other bitsandbytes warning"))
