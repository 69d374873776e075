"""Plan lints: each on its exact message and fix, and a sane plan that gives none."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from tunewise.config.lints import Lint, PlanFacts, lint

SANE = PlanFacts(
    method="lora",
    learning_rate=2e-4,
    total_steps=300,
    warmup_steps=9,
    logging_steps=10,
    eval_steps=50,
    save_steps=100,
    per_device_train_batch_size=8,
    gradient_accumulation_steps=2,
    max_seq_length=512,
    device_type="cuda",
    precision="bf16",
    model_pretrained_dtype="bfloat16",
    r=16,
    lora_alpha=32,
    use_rslora=False,
    has_validation=True,
)


def lints_for(**changes: Any) -> list[Lint]:
    return lint(dataclasses.replace(SANE, **changes))


def test_sane_plans_give_no_lints() -> None:
    assert lint(SANE) == []
    assert lints_for(method="full", learning_rate=2e-5) == []
    assert lints_for(method="qlora", device_type="cpu", precision="fp32", max_seq_length=500) == []
    assert lints_for(per_device_train_batch_size=3, max_seq_length=500, pad_to_multiple_of=8) == []


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        (
            {"learning_rate": 1e-2},
            Lint(
                "warning",
                "training.learning_rate",
                "learning rate 0.01 is above the usual range for LoRA (5e-05 to 0.001)",
                "set learning_rate: auto (the LoRA default), or keep it if you tested it",
            ),
        ),
        (
            {"method": "full", "learning_rate": 2e-4},
            Lint(
                "warning",
                "training.learning_rate",
                "learning rate 0.0002 is above the usual range for full fine-tuning (5e-06 to 0.0001)",
                "set learning_rate: auto (the full fine-tuning default), or keep it if you tested it",
            ),
        ),
        (
            {"method": "qlora", "learning_rate": 1e-5},
            Lint(
                "warning",
                "training.learning_rate",
                "learning rate 1e-05 is below the usual range for QLoRA (5e-05 to 0.001)",
                "set learning_rate: auto (the QLoRA default), or keep it if you tested it",
            ),
        ),
        (
            {"warmup_steps": 90},
            Lint(
                "warning",
                "training.warmup_steps",
                "warmup takes 90 of 300 steps (30%): the learning rate peaks late and little training happens "
                "at the full rate",
                "use warmup_ratio: 0.05 (here 15 steps), or a few % of the run",
            ),
        ),
        (
            {"logging_steps": 500},
            Lint(
                "warning",
                "training.logging_steps",
                "logging_steps (500) is larger than the 300 total steps: metrics.jsonl gets a training row for the last step only",
                "set logging_steps to at most 300 (e.g. 30), or a fraction like 0.1",
            ),
        ),
        (
            {"eval_steps": 500},
            Lint(
                "warning",
                "training.eval_steps",
                "eval_steps (500) is larger than the 300 total steps: evaluation runs only before and after "
                "training",
                "set eval_steps to at most 300 (e.g. 30), or a fraction like 0.1",
            ),
        ),
        (
            {"save_steps": 500},
            Lint(
                "warning",
                "training.save_steps",
                "save_steps (500) is larger than the 300 total steps: no checkpoint is saved before the end",
                "set save_steps to at most 300 (e.g. 30), or a fraction like 0.1",
            ),
        ),
        (
            {"save_steps": 500, "save_minutes": 30},
            Lint(
                "warning",
                "training.save_steps",
                "save_steps (500) is larger than the 300 total steps: no checkpoint is saved before the end "
                "but by save_minutes (every 30 min)",
                "set save_steps to at most 300 (e.g. 30), or a fraction like 0.1",
            ),
        ),
        (
            {"lora_alpha": 256},
            Lint(
                "info",
                "adapter.lora_alpha",
                "lora_alpha / r = 16 (alpha 256, r 16) is outside the usual 0.5 to 4: the adapter update is "
                "scaled 16x, like a learning rate",
                "set lora_alpha to 16 or 32 (r or 2 x r), or retune learning_rate for this scale",
            ),
        ),
        (
            {"max_seq_length": 500, "per_device_train_batch_size": 8},
            Lint(
                "info",
                "data.max_seq_length",
                "max_seq_length 500 is not a multiple of 8: full-length and packed rows miss the multiple of 8 "
                "that GPU tensor cores run fastest on",
                "use max_seq_length: 504, or pad_to_multiple_of: 8",
            ),
        ),
        (
            {"per_device_train_batch_size": 3},
            Lint(
                "info",
                "training.per_device_train_batch_size",
                "per_device_train_batch_size 3 is not a multiple of 8: with dynamic padding, batch x padded "
                "length (the token rows of every linear layer) is often not one either",
                "set pad_to_multiple_of: 8 (aligns any batch size), or a batch size that is a multiple of 8",
            ),
        ),
        (
            {"precision": "fp16"},
            Lint(
                "warning",
                "training.precision",
                "fp16 on a model pretrained in bfloat16: activations it learned past fp16's maximum (65504) "
                "overflow to inf and the loss turns NaN",
                "use precision: bf16 on a GPU that supports it (Ampere or newer), or fp32",
            ),
        ),
        (
            {"has_validation": False},
            Lint(
                "warning",
                "training.eval_steps",
                "eval_steps is 50 but there is no validation data: evaluation never runs",
                "set validation_split: 0.1 (or a row count), or validation_file",
            ),
        ),
        (
            {"has_validation": False, "eval_steps": None},
            Lint(
                "info",
                "data.validation_split",
                "no validation data: no eval loss, task metric or sample answers, so nothing shows overfitting",
                "set validation_split: 0.1 (or a row count), or validation_file",
            ),
        ),
    ],
)
def test_each_lint(changes: dict[str, Any], expected: Lint) -> None:
    assert lints_for(**changes) == [expected]


def test_multiples_of_8_only_on_gpu() -> None:
    for device in ("cpu", "mps"):
        assert (
            lints_for(device_type=device, precision="fp32", per_device_train_batch_size=3, max_seq_length=500)
            == []
        )
    keys = [x.key for x in lints_for(per_device_train_batch_size=3, max_seq_length=500)]
    assert keys == ["data.max_seq_length", "training.per_device_train_batch_size"]


def test_bf16_on_cpu_warns_only_without_bf16_instructions() -> None:
    (warning,) = lints_for(device_type="cpu")
    assert warning == Lint(
        "warning",
        "training.precision",
        "bf16 on a CPU without bf16 matmul instructions (AVX512_BF16 or AMX): they are emulated, 7x "
        "slower than fp32 in an autocast linear on an AVX2 CPU (docs/performance.md)",
        "use precision: auto (fp32 here) or fp32",
    )
    assert lints_for(device_type="cpu", cpu_native_bf16=True) == []
    assert lints_for(device_type="cpu", precision="fp32") == []
    assert lint(SANE) == []  # a GPU: its bf16 is native


def test_alpha_ratio_skipped_for_rslora_and_full() -> None:
    assert lints_for(lora_alpha=256, use_rslora=True) == []
    assert lints_for(method="full", learning_rate=2e-5, lora_alpha=256) == []
    assert lints_for(lora_alpha=8) == []  # ratio 0.5, the edge of the usual range


def test_fp16_lint_reads_torch_prefixed_dtype() -> None:
    assert [x.key for x in lints_for(precision="fp16", model_pretrained_dtype="torch.bfloat16")] == [
        "training.precision"
    ]
    assert lints_for(precision="fp16", model_pretrained_dtype="float16") == []
    assert lints_for(precision="fp16", model_pretrained_dtype=None) == []


def test_warmup_edge_and_several_lints_in_config_order() -> None:
    assert lints_for(warmup_steps=60) == []  # exactly 20%
    keys = [x.key for x in lints_for(learning_rate=1e-2, warmup_steps=200, logging_steps=400)]
    assert keys == ["training.learning_rate", "training.warmup_steps", "training.logging_steps"]


def test_warmup_of_one_step_in_a_tiny_run_is_not_flagged() -> None:
    # ceil(3% x 3) = 1 step is 33% of the run, but the lint's own fix (5%, at least 1 step) is that same step.
    def warmup_lints(warmup_steps: int) -> list[str]:
        found = lints_for(total_steps=3, warmup_steps=warmup_steps)
        return [x.message for x in found if x.key == "training.warmup_steps"]

    assert warmup_lints(1) == []
    assert warmup_lints(2) == [
        "warmup takes 2 of 3 steps (67%): the learning rate peaks late and little training happens at the full rate"
    ]


def test_warmup_as_long_as_the_run_is_flagged_even_in_a_tiny_run() -> None:
    """Update k of a w-step warmup runs at k/w of the rate: a 1-step run with 1 warmup step trains nothing."""

    def warmup_lints(total_steps: int, warmup_steps: int) -> list[str]:
        found = lints_for(total_steps=total_steps, warmup_steps=warmup_steps)
        return [x.message for x in found if x.key == "training.warmup_steps"]

    assert warmup_lints(1, 1) == [
        (
            "warmup (1 steps) lasts the whole 1-step run: the first update runs at learning rate 0 and none at "
            "the full rate, and the only one runs at 0: nothing trains"
        )
    ]
    assert warmup_lints(3, 3) == [
        (
            "warmup (3 steps) lasts the whole 3-step run: the first update runs at learning rate 0 and none at "
            "the full rate"
        )
    ]
    assert warmup_lints(3, 1) == []


def test_heavy_padding_suggests_packing_and_packing_or_light_padding_silences_it() -> None:
    assert lints_for(padding_waste_percent=40.0) == [
        Lint(
            "info",
            "data.packing",
            "40% of the tokens in this run's batches are padding, computed and thrown away; packing keeps "
            "the same batches and loss without it",
            "set packing: true (data inspect shows the numbers)",
        )
    ]
    assert lints_for(padding_waste_percent=40.0, packing=True) == []
    assert lints_for(padding_waste_percent=10.0) == []


def test_a_run_estimated_above_the_devices_memory_warns_with_the_fixes() -> None:
    gib = 2**30
    assert lints_for(estimated_memory_bytes=70 * gib, device_memory_bytes=80 * gib) == []
    assert lints_for(estimated_memory_bytes=90 * gib, device_memory_bytes=80 * gib, packing=True) == [
        Lint(
            "warning",
            "training.max_tokens_per_micro_batch",
            "weights, gradients, optimizer state and the largest micro-batch's activations come to ~90.0 GiB, "
            "more than the 80.0 GiB of this GPU",
            "set training.max_tokens_per_micro_batch; gradient_checkpointing: true; a smaller "
            "per_device_train_batch_size with more gradient_accumulation_steps",
        )
    ]
    (padded,) = lints_for(
        estimated_memory_bytes=90 * gib, device_memory_bytes=80 * gib, gradient_checkpointing=True
    )
    assert padded.key == "training.per_device_train_batch_size"
    assert (
        padded.fix
        == "set data.packing: true; a smaller per_device_train_batch_size with more gradient_accumulation_steps"
    )
    big = {"estimated_memory_bytes": 90 * gib, "device_memory_bytes": 80 * gib, "fitting_token_budget": 8192}
    (packed,) = lints_for(**big, packing=True)
    assert packed.fix.startswith("set training.max_tokens_per_micro_batch: 8192; ")
    (padded,) = lints_for(**big)
    assert padded.fix.startswith("set data.packing: true with max_tokens_per_micro_batch: 8192; ")
    (failed,) = lints_for(forward_out_of_memory="the largest micro-batch's forward (CUDA out of memory.)")
    assert (
        failed.message
        == "the plan ran out of memory measuring the largest micro-batch's forward (CUDA out of memory.)"
    )
