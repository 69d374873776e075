"""Automatic choices: each rule's value and reason, and provenance (user / default / auto)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tunewise.config.load import load_config
from tunewise.config.problems import ConfigError
from tunewise.config.resolve import (
    Hardware,
    choose_batch,
    choose_learning_rate,
    choose_precision,
    choose_world_size,
    resolve_static,
    resolve_steps,
)

CPU = Hardware("cpu", bf16_supported=False)
AMPERE = Hardware("cuda", bf16_supported=True)
TURING = Hardware("cuda", bf16_supported=False)


@pytest.mark.parametrize(
    ("hw", "expected"),
    [
        (AMPERE, "bf16"),
        (TURING, "fp16"),
        (CPU, "fp32"),
        (Hardware("cpu", bf16_supported=True), "bf16"),  # AMX or AVX512_BF16
    ],
)
def test_precision_rule(hw: Hardware, expected: str) -> None:
    value, reason = choose_precision(hw)
    assert value == expected and reason


def test_bf16_on_cpu_only_with_bf16_matmul_instructions() -> None:
    value, reason = choose_precision(Hardware("cpu", bf16_supported=False))
    assert value == "fp32" and "not faster" in reason


def test_learning_rate_rule_by_method() -> None:
    assert choose_learning_rate("lora")[0] == 2e-4
    assert choose_learning_rate("qlora")[0] == 2e-4
    assert choose_learning_rate("full")[0] == 2e-5


@pytest.mark.parametrize(
    ("effective", "world", "cap", "per_device", "accumulation"),
    [
        (16, 1, 8, 8, 2),
        (32, 2, 8, 8, 2),
        (12, 1, 8, 6, 2),
        (7, 1, 8, 7, 1),
        (64, 4, 16, 16, 1),
        (9, 1, 4, 3, 3),
    ],
)
def test_batch_rule(effective: int, world: int, cap: int, per_device: int, accumulation: int) -> None:
    got = choose_batch(effective, world, cap)
    assert got[:2] == (per_device, accumulation)
    assert per_device * accumulation * world == effective
    assert f"{effective} = {per_device} per device x {accumulation} accumulation x {world} devices" == got[2]


def test_batch_rule_rejects_indivisible_world() -> None:
    with pytest.raises(ValueError, match="not divisible by the 4 devices"):
        choose_batch(10, 4, 8)


def test_provenance_user_default_auto() -> None:
    cfg = load_config(
        {
            "training": {
                "learning_rate": 1e-4,
                "per_device_train_batch_size": "auto",
                "gradient_accumulation_steps": "auto",
                "effective_batch_size": 32,
            }
        }
    )
    res = resolve_static(cfg, CPU)
    assert res.choices["training.learning_rate"].source == "user"
    assert res.choices["training.precision"].source == "auto"
    assert res.choices["training.per_device_train_batch_size"].value == 4  # the CPU cap
    assert res.choices["training.gradient_accumulation_steps"].value == 8
    assert res.config.training.effective_batch_size is None  # spelled out by the two keys now
    steps = resolve_steps(res, num_train_examples=320, world_size=1)
    assert steps.plan.steps_per_epoch == 10 and steps.plan.total_steps == 30  # 3 epochs by default
    assert res.choices["training.warmup_steps"].value == 1  # ceil(0.03 x 30)
    assert res.choices["training.warmup_steps"].source == "auto"
    assert res.choices["training.logging_steps"].source == "default"


def test_auto_micro_batches_are_capped_at_4_on_cpu_and_16_on_a_gpu() -> None:
    auto = {"per_device_train_batch_size": "auto", "effective_batch_size": 32}
    got = {}
    for name, hw in (("cpu", CPU), ("gpu", AMPERE)):
        res = resolve_static(load_config({"training": dict(auto)}), hw)
        t = res.config.training
        got[name] = (t.per_device_train_batch_size, t.gradient_accumulation_steps)
    assert got == {"cpu": (4, 8), "gpu": (16, 2)}


BATCH_KEYS = ("per_device_train_batch_size", "gradient_accumulation_steps")


def batch_choices(training: dict, hw: Hardware = CPU) -> dict[str, tuple[int, str]]:
    res = resolve_static(load_config({"training": training}), hw)
    for key in BATCH_KEYS:
        assert getattr(res.config.training, key) == res.choices[f"training.{key}"].value
    return {
        key: (res.choices[f"training.{key}"].value, res.choices[f"training.{key}"].source)
        for key in BATCH_KEYS
    }


def test_a_batch_key_given_as_a_number_is_kept_and_only_the_auto_one_derived() -> None:
    """STYLE rule 4: the auto key is the effective batch over the given one (and the devices), whatever the cap."""
    per_device_auto = {"per_device_train_batch_size": "auto", "effective_batch_size": 16}
    assert batch_choices({**per_device_auto, "gradient_accumulation_steps": 1}) == {
        "per_device_train_batch_size": (16, "auto"),  # above the CPU cap of 4: accumulation 1 was asked for
        "gradient_accumulation_steps": (1, "user"),
    }
    assert batch_choices(
        {**per_device_auto, "gradient_accumulation_steps": 2}, Hardware("cpu", False, 2)
    ) == {
        "per_device_train_batch_size": (4, "auto"),  # 16 = 4 x 2 x 2 devices
        "gradient_accumulation_steps": (2, "user"),
    }
    accumulation_auto = {"per_device_train_batch_size": 8, "gradient_accumulation_steps": "auto"}
    assert batch_choices({**accumulation_auto, "effective_batch_size": 32}) == {
        "per_device_train_batch_size": (8, "user"),
        "gradient_accumulation_steps": (4, "auto"),
    }
    # A key left at its default is no choice of the user's: picked with the auto one (the CPU cap, target 16).
    assert batch_choices({"gradient_accumulation_steps": "auto"}) == {
        "per_device_train_batch_size": (4, "auto"),
        "gradient_accumulation_steps": (4, "auto"),
    }
    res = resolve_static(load_config({"training": {**accumulation_auto, "effective_batch_size": 32}}), CPU)
    assert res.choices["training.gradient_accumulation_steps"].reason == (
        "32 = 8 per device x 4 accumulation x 1 devices, per_device_train_batch_size yours"
    )


@pytest.mark.parametrize(
    ("training", "message"),
    [
        (
            {
                "per_device_train_batch_size": 8,
                "gradient_accumulation_steps": "auto",
                "effective_batch_size": 12,
            },
            (
                "12 sequences per step is not a multiple of per_device_train_batch_size 8 x 1 device(s) (yours, so it "
                "is kept); set effective_batch_size to 8 or 16, or per_device_train_batch_size: auto too"
            ),
        ),
        (
            {
                "per_device_train_batch_size": "auto",
                "gradient_accumulation_steps": 3,
                "effective_batch_size": 16,
            },
            (
                "16 sequences per step is not a multiple of gradient_accumulation_steps 3 x 1 device(s) (yours, so it "
                "is kept); set effective_batch_size to 15 or 18, or gradient_accumulation_steps: auto too"
            ),
        ),
    ],
)
def test_an_effective_batch_the_given_key_does_not_divide_is_an_error(training: dict, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        resolve_static(load_config({"training": training}), CPU)
    assert [(p.path, p.message) for p in caught.value.problems] == [
        ("training.effective_batch_size", message)
    ]


def test_auto_learning_rate_and_4bit_for_qlora() -> None:
    res = resolve_static(load_config({"adapter": {"method": "qlora"}}), CPU)
    assert res.config.training.learning_rate == 2e-4
    assert res.config.quantization.load_in_4bit is True
    assert res.config.quantization.bnb_4bit_compute_dtype == "float32"


@pytest.mark.parametrize(("hw", "expected"), [(AMPERE, True), (TURING, True), (CPU, False)])
def test_the_memory_check_is_on_for_gpus_by_default(hw: Hardware, expected: bool) -> None:
    res = resolve_static(load_config({}), hw)
    choice = res.choices["training.memory_check"]
    assert res.config.training.memory_check is expected and (choice.value, choice.source) == (
        expected,
        "auto",
    )
    assert ("OOM killer" in choice.reason) is not expected
    forced = resolve_static(load_config({"training": {"memory_check": not expected}}), hw)
    assert forced.config.training.memory_check is (not expected)
    assert forced.choices["training.memory_check"].source == "user"


def test_constant_schedule_gets_no_warmup() -> None:
    res = resolve_static(load_config({"training": {"lr_scheduler_type": "constant"}}), CPU)
    assert resolve_steps(res, 100, 1).warmup_steps == 0


def test_user_warmup_ratio_is_hf_ceil() -> None:
    res = resolve_static(load_config({"training": {"warmup_ratio": 0.1, "max_steps": 25}}), CPU)
    assert resolve_steps(res, 100, 1).warmup_steps == 3  # ceil(2.5)


def test_auto_warmup_stays_shorter_than_the_run() -> None:
    """ceil(3% x 1) = 1 warmup step made a 1-step run's only update run at learning rate 0."""
    res = resolve_static(load_config({"training": {"max_steps": 1}}), CPU)
    assert resolve_steps(res, 100, 1).warmup_steps == 0
    assert res.choices["training.warmup_steps"].reason.endswith("less than the 1-step run")
    res = resolve_static(load_config({"training": {"max_steps": 2}}), CPU)
    assert resolve_steps(res, 100, 1).warmup_steps == 1  # ceil(0.06)


def test_a_warmup_steps_below_1_is_a_fraction_of_the_run_as_in_transformers_5() -> None:
    res = resolve_static(load_config({"training": {"warmup_steps": 0.05, "max_steps": 50}}), CPU)
    assert resolve_steps(res, 100, 1).warmup_steps == 3  # TrainingArguments.get_warmup_steps: ceil(0.05 x 50)
    choice = res.choices["training.warmup_steps"]
    assert (choice.value, choice.source) == (3, "user") and "is a ratio" in choice.reason


def test_resolved_config_reloads_without_warnings_about_ignored_keys() -> None:
    from tunewise.config.load import dump_config
    from tunewise.config.rules import check_config

    res = resolve_static(load_config({"training": {"metric_for_best_model": "eval_perplexity"}}), AMPERE)
    again = load_config(__import__("yaml").safe_load(dump_config(res.config)))
    assert again.training.greater_is_better is False
    assert [p for p in check_config(again) if p.severity != "info"] == []


@pytest.mark.real_cpu_precision
def test_cpu_bf16_probe_picks_bf16_with_amx_or_avx512_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    from tunewise.config.resolve import probe_hardware

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    old_torch = probe_hardware()  # a torch without its CPU checks: no native bf16, fp32
    assert old_torch.bf16_supported is False
    assert choose_precision(old_torch)[0] == "fp32"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    avx512_bf16 = probe_hardware()  # AVX512_BF16 alone (AMD Zen 4): measured faster too
    assert avx512_bf16.bf16_supported is True
    value, reason = choose_precision(avx512_bf16)
    assert value == "bf16" and "AVX512_BF16" in reason
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    amx = probe_hardware()
    assert amx.bf16_supported is True
    value, reason = choose_precision(amx)
    assert value == "bf16" and "AMX" in reason
    # oneDNN, which runs torch's bf16 matmuls on CPU, capped below bf16 instructions emulates them: fp32.
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx512_core_vnni")
    assert probe_hardware().bf16_supported is False
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    assert probe_hardware().bf16_supported is True
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "AVX2")  # oneDNN's older name
    assert probe_hardware().bf16_supported is False


AMX = Hardware("cpu", bf16_supported=True)


@pytest.mark.parametrize(
    ("hw", "data", "value", "source"),
    [
        (AMX, {}, 64, "auto"),  # bf16 on CPU: oneDNN compiles a kernel per new batch shape
        (CPU, {}, None, "default"),  # fp32 on CPU: MKL, nothing to gain from pad tokens
        (AMPERE, {}, None, "default"),
        (AMX, {"pad_to_multiple_of": 8}, 8, "user"),
        (AMX, {"pad_to_multiple_of": None}, None, "user"),  # an explicit null turns the rounding off
    ],
)
def test_bf16_on_cpu_rounds_batches_to_recurring_shapes(
    hw: Hardware, data: dict, value: int | None, source: str
) -> None:
    res = resolve_static(load_config({"data": data}), hw)
    assert res.config.data.pad_to_multiple_of == value
    assert res.choices["data.pad_to_multiple_of"].value == value
    assert res.choices["data.pad_to_multiple_of"].source == source
    if source == "auto":
        assert "oneDNN" in res.choices["data.pad_to_multiple_of"].reason


def test_a_config_files_runs_go_to_runs_named_after_it(tmp_path: Path) -> None:
    named = tmp_path / "lr-sweep-3.yaml"
    named.write_text("training:\n  max_steps: 2\n")
    res = resolve_static(load_config(named), CPU, named)
    assert res.config.training.output_dir == "runs/lr-sweep-3"
    choice = res.choices["training.output_dir"]
    assert (choice.source, choice.reason) == ("auto", "named after lr-sweep-3.yaml")

    chosen = tmp_path / "mine.yaml"
    chosen.write_text("training:\n  output_dir: out/here\n")
    res = resolve_static(load_config(chosen), CPU, chosen)
    assert res.config.training.output_dir == "out/here" and "training.output_dir" not in res.choices
    # A dict or no config at all: the schema's default.
    assert resolve_static(load_config({}), CPU).config.training.output_dir == "runs/quickstart"


@pytest.mark.parametrize(
    ("environ", "device", "requested", "expected"),
    [
        ({}, "cpu", None, 1),
        ({}, "cuda", 4, 4),  # `plan --processes 4` outside a launcher
        ({"WORLD_SIZE": "2", "LOCAL_RANK": "1", "RANK": "1"}, "cuda", None, 2),  # torchrun, accelerate launch
        ({"WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "cpu", 2, 2),  # the launcher agrees with --processes
        ({"OMPI_COMM_WORLD_SIZE": "3"}, "cpu", None, 3),  # mpirun: accelerate's MULTI_CPU reads it
        ({"OMPI_COMM_WORLD_SIZE": "3"}, "cuda", None, 1),  # on a GPU accelerate needs LOCAL_RANK
        ({"WORLD_SIZE": "2"}, "cuda", None, 1),
    ],
)
def test_world_size_is_read_as_accelerate_reads_it(
    environ: dict, device: str, requested: int | None, expected: int
) -> None:
    value, reason = choose_world_size(environ, device, requested)
    assert value == expected and reason


def test_a_process_count_the_launcher_contradicts_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"--processes 4, but the launcher started 2 \(WORLD_SIZE=2\)"):
        choose_world_size({"WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "cuda", 4)
