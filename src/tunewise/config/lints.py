"""Lints on a resolved plan: settings that are legal but probably not what the user wants.

Unlike the rules of config/rules.py (on the config as written), lints see resolved numbers (total steps, the
learning rate auto picked, the device), so they run after resolution and never stop a run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# Usual peak learning rates. Full fine-tuning: 1e-5 to 5e-5 is the norm (Alpaca 2e-5, LIMA 1e-5,
# Zephyr SFT 2e-5), up to 1e-4 for small models; below 5e-6 barely moves in a short run. LoRA/QLoRA:
# 1e-4 to 3e-4 (QLoRA 1e-4 to 2e-4, the LoRA paper 2e-4 to 5e-4), up to 1e-3 for small
# models; below 5e-5 the adapters, which start at zero, barely learn.
LR_RANGE = {"full": (5e-6, 1e-4), "lora": (5e-5, 1e-3), "qlora": (5e-5, 1e-3)}
MAX_WARMUP_FRACTION = 0.2  # recipes use 3-10%; past 20% a short run spends much of itself ramping up
ALPHA_RATIO_RANGE = (0.5, 4.0)  # common practice: lora_alpha = r or 2r (PEFT's default alpha 8, r 8)
TENSOR_CORE_MULTIPLE = 8  # NVIDIA: fp16/bf16 matmul dimensions in multiples of 8 keep tensor cores busy
# Padding worth removing: at a quarter of the batch tokens, packing (same batches, same loss) skips that
# much linear-layer work; on CPU packed runs were 1.7x faster than padded ones (docs/performance.md).
PADDING_WASTE_PERCENT = 25.0
# The share of a device's memory a suggested token budget may fill with what the plan counts: the rest is for
# what it does not (the backward's temporaries, a chunk of logits, the allocator's overhead). A guess, not a
# measurement: on SmolLM2 on CPU the forward's RSS grew 1.4-1.5x the counted activations (docs/training.md).
MEMORY_FILL = 0.7


@dataclass(frozen=True)
class PlanFacts:
    """The resolved numbers a plan lints, as plain values (no config objects)."""

    method: str
    """full, lora or qlora."""
    learning_rate: float
    total_steps: int
    warmup_steps: int
    logging_steps: int | None
    eval_steps: int | None
    save_steps: int | None
    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    max_seq_length: int
    device_type: str
    """cpu, cuda or mps."""
    precision: str
    """bf16, fp16 or fp32."""
    model_pretrained_dtype: str | None
    """The model config's torch_dtype (e.g. bfloat16), when it records one."""
    r: int
    lora_alpha: float
    use_rslora: bool
    has_validation: bool
    pad_to_multiple_of: int | None = None
    """data.pad_to_multiple_of; a multiple of 8 here already aligns every batch for tensor cores."""
    packing: bool = False
    padding_waste_percent: float | None = None
    """% of the tokens in the first epoch's (unpacked) batches that are padding."""
    cpu_native_bf16: bool = False
    """The CPU has bf16 matmul instructions (AVX512_BF16 or AMX)."""
    estimated_memory_bytes: int | None = None
    """Weights, gradients, optimizer state and the largest micro-batch's saved activations (report.py)."""
    device_memory_bytes: int | None = None
    """The GPU's memory, or the host's RAM on CPU."""
    forward_out_of_memory: str | None = None
    """What ran out of memory while the plan measured activations (the weights on the GPU, or the largest
    micro-batch's forward), with the error."""
    gradient_checkpointing: bool = False
    fitting_token_budget: int | None = None
    """The largest max_tokens_per_micro_batch whose measured activations, with weights, gradients and optimizer
    state, fill at most MEMORY_FILL of the device (None: none at least max_seq_length does)."""
    save_minutes: float | None = None
    """training.save_minutes: checkpoints by time besides save_steps."""


@dataclass(frozen=True)
class Lint:
    severity: Literal["warning", "info"]
    key: str
    """Dotted config path the lint is about."""
    message: str
    """Why it is probably wrong, in one line."""
    fix: str
    """What to change."""


def lint(facts: PlanFacts) -> list[Lint]:
    """Every lint that applies to a resolved plan, in config order."""
    return [
        *_learning_rate(facts),
        *_warmup(facts),
        *_intervals(facts),
        *_alpha_ratio(facts),
        *_tensor_cores(facts),
        *_fp16_on_bf16_model(facts),
        *_bf16_on_cpu(facts),
        *_memory(facts),
        *_no_validation(facts),
        *_padding(facts),
    ]


def _learning_rate(f: PlanFacts) -> list[Lint]:
    low, high = LR_RANGE[f.method]
    if low <= f.learning_rate <= high:
        return []
    side = "below" if f.learning_rate < low else "above"
    name = {"full": "full fine-tuning", "lora": "LoRA", "qlora": "QLoRA"}[f.method]
    message = f"learning rate {f.learning_rate:g} is {side} the usual range for {name} ({low:g} to {high:g})"
    fix = f"set learning_rate: auto (the {name} default), or keep it if you tested it"
    return [Lint("warning", "training.learning_rate", message, fix)]


def _warmup(f: PlanFacts) -> list[Lint]:
    if f.total_steps <= 0 or f.warmup_steps <= MAX_WARMUP_FRACTION * f.total_steps:
        return []
    if f.warmup_steps >= f.total_steps:
        # Update k of a warmup of w steps runs at k/w of the rate, from 0: a 1-step run with 1 warmup step
        # changes nothing.
        nothing = ", and the only one runs at 0: nothing trains" if f.total_steps == 1 else ""
        message = (
            f"warmup ({f.warmup_steps} steps) lasts the whole {f.total_steps}-step run: the first update runs at "
            f"learning rate 0 and none at the full rate{nothing}"
        )
        fix = f"set warmup_steps to fewer than {f.total_steps} (0 for none)"
        return [Lint("warning", "training.warmup_steps", message, fix)]
    share = f.warmup_steps / f.total_steps
    suggested = max(1, round(0.05 * f.total_steps))
    if f.warmup_steps <= suggested:
        # A very short run: one warmup step is already a large share, and the fix would be that same step.
        return []
    message = (
        f"warmup takes {f.warmup_steps} of {f.total_steps} steps ({share:.0%}): the learning rate peaks "
        "late and little training happens at the full rate"
    )
    fix = f"use warmup_ratio: 0.05 (here {suggested} steps), or a few % of the run"
    return [Lint("warning", "training.warmup_steps", message, fix)]


def _intervals(f: PlanFacts) -> list[Lint]:
    consequence = {
        "logging_steps": "metrics.jsonl gets a training row for the last step only",
        "eval_steps": "evaluation runs only before and after training",
        "save_steps": "no checkpoint is saved before the end"
        + (f" but by save_minutes (every {f.save_minutes:g} min)" if f.save_minutes else ""),
    }
    lints = []
    for key, then in consequence.items():
        value = getattr(f, key)
        if value is not None and value > f.total_steps:
            message = f"{key} ({value}) is larger than the {f.total_steps} total steps: {then}"
            fix = f"set {key} to at most {f.total_steps} (e.g. {max(1, f.total_steps // 10)}), or a fraction like 0.1"
            lints.append(Lint("warning", f"training.{key}", message, fix))
    return lints


def _alpha_ratio(f: PlanFacts) -> list[Lint]:
    # rsLoRA scales by alpha / sqrt(r), so its alphas are not comparable with r; no rule of thumb there.
    if f.method == "full" or f.use_rslora:
        return []
    ratio = f.lora_alpha / f.r
    low, high = ALPHA_RATIO_RANGE
    if low <= ratio <= high:
        return []
    message = (
        f"lora_alpha / r = {ratio:g} (alpha {f.lora_alpha:g}, r {f.r}) is outside the usual {low:g} to {high:g}: "
        f"the adapter update is scaled {ratio:g}x, like a learning rate"
    )
    fix = f"set lora_alpha to {f.r} or {2 * f.r} (r or 2 x r), or retune learning_rate for this scale"
    return [Lint("info", "adapter.lora_alpha", message, fix)]


def _tensor_cores(f: PlanFacts) -> list[Lint]:
    # Only NVIDIA tensor cores care; on CPU (and MPS) a multiple of 8 buys nothing. Linear layers
    # multiply (batch x padded length) token rows, attention multiplies length x length: padding
    # every batch to a multiple of 8 aligns both, whatever the batch size.
    n = TENSOR_CORE_MULTIPLE
    if f.device_type != "cuda" or (f.pad_to_multiple_of or 1) % n == 0:
        return []
    lints = []
    if f.max_seq_length % n:
        rounded = -(-f.max_seq_length // n) * n
        message = (
            f"max_seq_length {f.max_seq_length} is not a multiple of {n}: full-length and packed rows "
            f"miss the multiple of {n} that GPU tensor cores run fastest on"
        )
        fix = f"use max_seq_length: {rounded}, or pad_to_multiple_of: {n}"
        lints.append(Lint("info", "data.max_seq_length", message, fix))
    if f.per_device_train_batch_size % n:
        message = (
            f"per_device_train_batch_size {f.per_device_train_batch_size} is not a multiple of {n}: with "
            f"dynamic padding, batch x padded length (the token rows of every linear layer) is often not one either"
        )
        fix = (
            f"set pad_to_multiple_of: {n} (aligns any batch size), or a batch size that is a multiple of {n}"
        )
        lints.append(Lint("info", "training.per_device_train_batch_size", message, fix))
    return lints


def _fp16_on_bf16_model(f: PlanFacts) -> list[Lint]:
    pretrained = (f.model_pretrained_dtype or "").removeprefix("torch.")
    if f.precision != "fp16" or pretrained not in ("bfloat16", "bf16"):
        return []
    message = (
        "fp16 on a model pretrained in bfloat16: activations it learned past fp16's maximum (65504) "
        "overflow to inf and the loss turns NaN"
    )
    fix = "use precision: bf16 on a GPU that supports it (Ampere or newer), or fp32"
    return [Lint("warning", "training.precision", message, fix)]


def _bf16_on_cpu(f: PlanFacts) -> list[Lint]:
    if f.device_type != "cpu" or f.precision != "bf16" or f.cpu_native_bf16:
        return []
    message = (
        "bf16 on a CPU without bf16 matmul instructions (AVX512_BF16 or AMX): they are emulated, 7x "
        "slower than fp32 in an autocast linear on an AVX2 CPU (docs/performance.md)"
    )
    return [Lint("warning", "training.precision", message, "use precision: auto (fp32 here) or fp32")]


def _memory(f: PlanFacts) -> list[Lint]:
    need, have = f.estimated_memory_bytes, f.device_memory_bytes
    if f.forward_out_of_memory:
        message = f"the plan ran out of memory measuring {f.forward_out_of_memory}"
    elif need is not None and have is not None and need > have:
        where = "GPU" if f.device_type == "cuda" else f.device_type
        message = (
            f"weights, gradients, optimizer state and the largest micro-batch's activations come to "
            f"~{need / 2**30:.1f} GiB, more than the {have / 2**30:.1f} GiB of this {where}"
        )
    else:
        return []
    budget = f.fitting_token_budget
    if f.packing:
        fixes = [
            f"set training.max_tokens_per_micro_batch: {budget}"
            if budget
            else "set training.max_tokens_per_micro_batch"
        ]
    else:
        fixes = ["set data.packing: true" + (f" with max_tokens_per_micro_batch: {budget}" if budget else "")]
    fixes += [] if f.gradient_checkpointing else ["gradient_checkpointing: true"]
    fixes += ["a smaller per_device_train_batch_size with more gradient_accumulation_steps"]
    key = "training.max_tokens_per_micro_batch" if f.packing else "training.per_device_train_batch_size"
    return [Lint("warning", key, message, "; ".join(fixes))]


def _no_validation(f: PlanFacts) -> list[Lint]:
    if f.has_validation:
        return []
    if f.eval_steps is not None:
        message = f"eval_steps is {f.eval_steps} but there is no validation data: evaluation never runs"
        return [Lint("warning", "training.eval_steps", message, _VALIDATION_FIX)]
    message = "no validation data: no eval loss, task metric or sample answers, so nothing shows overfitting"
    return [Lint("info", "data.validation_split", message, _VALIDATION_FIX)]


_VALIDATION_FIX = "set validation_split: 0.1 (or a row count), or validation_file"


def _padding(f: PlanFacts) -> list[Lint]:
    waste = f.padding_waste_percent
    if f.packing or waste is None or waste < PADDING_WASTE_PERCENT:
        return []
    message = (
        f"{waste:.0f}% of the tokens in this run's batches are padding, computed and thrown away; packing "
        "keeps the same batches and loss without it"
    )
    return [Lint("info", "data.packing", message, "set packing: true (data inspect shows the numbers)")]
