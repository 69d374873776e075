"""How many steps a run takes, how long it warms up, and its learning-rate schedule.

Every number here means what the same-named ``TrainingArguments`` field means to HF ``Trainer``
(transformers 5.x); ``tests/unit/test_hf_equivalence.py`` checks each one against ``Trainer`` itself.
"""

from __future__ import annotations

import inspect
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
from transformers import get_scheduler
from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION
from transformers.trainer_utils import SchedulerType

from tunewise.config.schema import SchedulerName

SCHEDULER_NAMES: tuple[str, ...] = typing.get_args(SchedulerName)
"""HF ``lr_scheduler_type`` values we build (the config schema's choices), each stepped once per update."""


@dataclass(frozen=True)
class StepPlan:
    """How many micro-batches and optimizer updates a run takes, counted as HF ``Trainer`` counts them."""

    batches_per_epoch: int
    """Micro-batches of ``per_device_batch_size`` each device draws from one pass over the data."""
    steps_per_epoch: int
    """Optimizer updates per pass: ceil(batches_per_epoch / gradient_accumulation_steps)."""
    last_window_batches: int
    """Micro-batches in the last accumulation window of a pass (fewer than accumulation when it does not divide)."""
    total_steps: int
    """Optimizer updates in the whole run: the scheduler's ``num_training_steps``."""
    num_epochs: int
    """Passes the loop starts over the data; the last one stops early once ``total_steps`` is reached."""
    effective_batch_size: int
    """Sequences per full optimizer update: per-device batch x accumulation x world size."""
    max_steps_overrides: bool
    """True when ``max_steps > 0`` set ``total_steps`` and ``num_train_epochs`` was ignored."""
    reason: str
    """Where ``total_steps`` came from, in one line."""


def compute_step_plan(
    num_examples: int,
    per_device_batch_size: int,
    gradient_accumulation_steps: int,
    world_size: int,
    num_train_epochs: float,
    max_steps: int,
    drop_last: bool = False,
) -> StepPlan:
    """Count micro-batches, optimizer updates and epochs exactly as ``Trainer.set_initial_training_values``."""
    problems = _step_input_problems(
        num_examples,
        per_device_batch_size,
        gradient_accumulation_steps,
        world_size,
        num_train_epochs,
        max_steps,
    )
    if problems:
        raise ValueError("Cannot plan the training steps:\n  - " + "\n  - ".join(problems))
    batches = _batches_per_device(num_examples, per_device_batch_size, world_size, drop_last)
    if batches == 0:
        raise ValueError(
            f"{num_examples} examples with per_device_train_batch_size={per_device_batch_size} x "
            f"{world_size} device(s) and dataloader_drop_last=True leave no full batch to train on: "
            "lower the batch size, add data, or set dataloader_drop_last=False."
        )
    accumulation = gradient_accumulation_steps
    # HF: `len_dataloader // gas + int(len_dataloader % gas > 0)`; the last window of a pass is short.
    steps_per_epoch = _ceil_div(batches, accumulation)
    last_window = batches % accumulation or accumulation
    if max_steps > 0:
        total_steps = max_steps
        num_epochs = _ceil_div(max_steps, steps_per_epoch)
        reason = (
            f"max_steps={max_steps} overrides num_train_epochs={num_train_epochs}: "
            f"{num_epochs} pass(es) of {steps_per_epoch} step(s) over the data"
        )
    else:
        # Same float expression as HF, so 0.3 epochs x 10 steps = ceil(3.0000000000000004) = 4, as there.
        total_steps = math.ceil(num_train_epochs * steps_per_epoch)
        num_epochs = math.ceil(num_train_epochs)
        reason = f"num_train_epochs={num_train_epochs} x {steps_per_epoch} step(s) per epoch, rounded up"
    if total_steps == 0:
        raise ValueError(
            "num_train_epochs=0 gives 0 optimizer steps: set num_train_epochs > 0 or max_steps > 0."
        )
    return StepPlan(
        batches_per_epoch=batches,
        steps_per_epoch=steps_per_epoch,
        last_window_batches=last_window,
        total_steps=total_steps,
        num_epochs=num_epochs,
        effective_batch_size=per_device_batch_size * accumulation * world_size,
        max_steps_overrides=max_steps > 0,
        reason=reason,
    )


def _step_input_problems(
    num_examples: int,
    per_device_batch_size: int,
    gradient_accumulation_steps: int,
    world_size: int,
    num_train_epochs: float,
    max_steps: int,
) -> list[str]:
    problems = [
        f"{name}={value} must be >= {low}"
        for name, value, low in (
            ("num_examples", num_examples, 1),
            ("per_device_train_batch_size", per_device_batch_size, 1),
            ("gradient_accumulation_steps", gradient_accumulation_steps, 1),
            ("world_size", world_size, 1),
        )
        if value < low
    ]
    if max_steps == 0:
        # HF would record max_steps=0 yet still run one optimizer step before its stop check fires.
        problems.append(
            "max_steps=0 is ambiguous: use -1 to train for num_train_epochs, or a positive step count"
        )
    if max_steps < 0 and num_train_epochs < 0:
        problems.append(f"num_train_epochs={num_train_epochs} must be >= 0")
    return problems


def _batches_per_device(num_examples: int, batch_size: int, world_size: int, drop_last: bool) -> int:
    """Length of the training dataloader on one device after ``accelerate`` shards it.

    The global batch sampler yields ceil (or floor with drop_last) num_examples / batch_size batches;
    accelerate's ``BatchSamplerShard`` deals them round-robin and, with its default ``even_batches=True``,
    gives every device ceil(batches / world_size) (floor with drop_last), wrapping around to the first
    examples to fill the shortfall.
    """
    if drop_last:
        return num_examples // batch_size // world_size
    return _ceil_div(_ceil_div(num_examples, batch_size), world_size)


def _ceil_div(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


def resolve_warmup_steps(
    total_steps: int, warmup_steps: float | None, warmup_ratio: float | None
) -> tuple[int, str]:
    """Warmup length in optimizer steps and why, as ``TrainingArguments.get_warmup_steps``.

    ``warmup_steps >= 1`` wins; otherwise the ratio gives ceil(ratio x total_steps). transformers 5
    dropped ``warmup_ratio`` and reads a ``warmup_steps`` below 1 as that ratio; both spellings work here.
    """
    if warmup_steps is not None and warmup_steps < 0:
        raise ValueError(f"warmup_steps={warmup_steps} must be >= 0.")
    if warmup_ratio is not None and not 0 <= warmup_ratio <= 1:
        raise ValueError(f"warmup_ratio={warmup_ratio} must be between 0 and 1.")
    if warmup_steps is not None and warmup_steps >= 1:
        if warmup_steps != int(warmup_steps):
            raise ValueError(
                f"warmup_steps={warmup_steps} must be a whole number of steps, or a ratio below 1."
            )
        steps = int(warmup_steps)
        ignored = f"; warmup_ratio={warmup_ratio} ignored" if warmup_ratio else ""
        return steps, f"warmup_steps={steps} given{ignored}{_longer_than_run(steps, total_steps)}"
    if warmup_steps:  # 0 < warmup_steps < 1 is how transformers 5 spells a ratio
        steps = math.ceil(total_steps * warmup_steps)
        return (
            steps,
            f"warmup_steps={warmup_steps} < 1 is a ratio: ceil({warmup_steps} x {total_steps} steps) = {steps}",
        )
    if warmup_ratio:
        steps = math.ceil(total_steps * warmup_ratio)
        return steps, f"ceil(warmup_ratio {warmup_ratio} x {total_steps} steps) = {steps}"
    return 0, "no warmup (warmup_steps and warmup_ratio unset or 0)"


def _longer_than_run(warmup_steps: int, total_steps: int) -> str:
    if warmup_steps <= total_steps:
        return ""
    return f" (longer than the {total_steps}-step run: the learning rate never reaches its peak)"


def resolve_interval(value: float | None, total_steps: int) -> int | None:
    """``logging_steps``/``eval_steps``/``save_steps`` in optimizer steps, as ``TrainerState.compute_steps``.

    A value below 1 is a fraction of the run, rounded up: ceil(total_steps x value). None stays None.
    """
    if value is None:
        return None
    if value <= 0:
        raise ValueError(
            f"interval {value} must be > 0: a step count, or a fraction below 1 of the run; leave it unset to disable."
        )
    if value < 1:
        return math.ceil(total_steps * value)
    if value != int(value):
        raise ValueError(f"interval {value} must be a whole number of steps if bigger than 1.")
    return int(value)


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    name: str,
    num_warmup_steps: int,
    num_training_steps: int,
    scheduler_kwargs: dict[str, Any] | None,
) -> torch.optim.lr_scheduler.LRScheduler:
    """``transformers.get_scheduler``, after refusing arguments it would silently ignore.

    Drive it as ``Trainer`` does: build it before the first update, then ``optimizer.step()`` followed by
    ``scheduler.step()`` once per optimizer update; update k (from 0) runs at lr x schedule(k).
    """
    problems = scheduler_argument_problems(name, num_warmup_steps, num_training_steps, scheduler_kwargs)
    if problems:
        raise ValueError("Invalid learning-rate schedule:\n  - " + "\n  - ".join(problems))
    return get_scheduler(
        name,
        optimizer=optimizer,
        num_warmup_steps=num_warmup_steps,
        num_training_steps=num_training_steps,
        scheduler_specific_kwargs=scheduler_kwargs,
    )


def scheduler_argument_problems(
    name: str, num_warmup_steps: int, num_training_steps: int, scheduler_kwargs: dict[str, Any] | None
) -> list[str]:
    """Every reason ``build_scheduler`` would refuse these arguments, for validation before any model loads."""
    if name not in SCHEDULER_NAMES:
        return [f"lr_scheduler_type={name!r} is not supported; choose one of: {', '.join(SCHEDULER_NAMES)}"]
    problems = []
    if num_training_steps < 1:
        problems.append(f"num_training_steps={num_training_steps} must be >= 1")
    if num_warmup_steps < 0:
        problems.append(f"num_warmup_steps={num_warmup_steps} must be >= 0")
    if name == "constant" and num_warmup_steps > 0:
        # get_scheduler returns get_constant_schedule(optimizer) for "constant", dropping the warmup.
        problems.append(
            f"lr_scheduler_type='constant' ignores warmup ({num_warmup_steps} steps) in transformers: "
            "use 'constant_with_warmup', or set warmup_steps/warmup_ratio to 0"
        )
    accepted = _scheduler_kwarg_names(name)
    unknown = sorted(set(scheduler_kwargs or {}) - accepted)
    if unknown:
        takes = f"takes only {', '.join(sorted(accepted))}" if accepted else "takes no lr_scheduler_kwargs"
        problems.append(f"lr_scheduler_kwargs {unknown} do not apply: {name!r} {takes}")
    return problems


def _scheduler_kwarg_names(name: str) -> set[str]:
    """Keyword arguments HF passes through to this schedule, read from its signature."""
    if name in ("constant", "constant_with_warmup"):
        return set()  # get_scheduler passes them no scheduler_specific_kwargs at all
    schedule = cast("Callable[..., Any]", TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(name)])
    parameters = inspect.signature(schedule).parameters
    return set(parameters) - {"optimizer", "num_warmup_steps", "num_training_steps", "last_epoch"}
