"""Running out of memory: recognising it, the error that says what was saved and what to change, and the
process's peak memory.

The loop (training/loop.py) catches an out-of-memory in a step, an evaluation or its memory check, saves the last
finished step and raises `TrainingOutOfMemory`; the run (run.py) fills in `out_of_memory_advice` for its config.
"""

from __future__ import annotations

import resource
from collections.abc import Callable
from typing import TypeVar

import torch
from accelerate.utils.memory import should_reduce_batch_size

from tunewise.config.schema import TunewiseConfig

T = TypeVar("T")


class TrainingOutOfMemory(RuntimeError):
    """A micro-batch did not fit in memory; says which, what was saved, and (`advice`) what to change."""

    def __init__(self, detail: str, where: str, tokens: int, saved_step: int | None, device: str) -> None:
        super().__init__(detail)
        self.detail, self.where, self.tokens = detail, where, tokens
        self.saved_step, self.device = saved_step, device
        self.advice: list[str] = []  # filled by the caller, who knows the config
        self.resume_command: str | None = None

    @property
    def in_evaluation(self) -> bool:
        """An evaluation ran out (its batches are not counted: no tokens), not a training step."""
        return not self.tokens

    def __str__(self) -> str:
        head = f"Out of memory on {self.device} in {self.where}"
        if self.tokens:  # a training micro-batch (an evaluation's batches are not counted)
            head += f", at a micro-batch of {self.tokens:,} tokens (padding included)"
        lines = [f"{head}: {self.detail}"]
        if self.saved_step:
            lines.append(
                f"Step {self.saved_step} is saved in checkpoint-{self.saved_step}: no finished step is lost."
            )
        if self.advice:
            lines.append("To fit it:")
            lines += [f"  - {line}" for line in self.advice]
        if self.saved_step and self.resume_command:
            lines.append(f"Then continue with:\n  {self.resume_command}")
        elif self.saved_step:
            lines.append(
                "None of these keeps the run's micro-batches and gradients as they were, so `--resume` refuses "
                "them: `--resume --force-resume` continues approximately (docs/checkpoints.md), or start afresh."
            )
        return "\n".join(lines)


def is_out_of_memory(error: BaseException) -> bool:
    """The allocator's out-of-memory on any device, torch's error or a failed CPU allocation (a plain RuntimeError),
    as accelerate recognises it for `find_executable_batch_size`."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, Exception) and should_reduce_batch_size(error)
    )


def catch_out_of_memory(work: Callable[[], T]) -> tuple[T | None, str | None]:
    """(work(), None), or (None, the out-of-memory's first line); any other error goes on. A call of its own, so
    the failed work's frames, and the tensors they hold, are freed by the time the caller handles it."""
    try:
        return work(), None
    except Exception as error:
        if not is_out_of_memory(error):
            raise
        return None, first_line(error)


def first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def out_of_memory_advice(
    cfg: TunewiseConfig, tokens: int, evaluation: bool = False
) -> tuple[list[str], list[str]]:
    """What to change after running out of memory at a micro-batch of `tokens` tokens (or in an evaluation):
    the advice, and as `--set` overrides the first change that a resume accepts (training/resume.py:
    RESUMABLE_CHANGES)."""
    t, d = cfg.training, cfg.data
    advice: list[str] = []
    sets: list[str] = []
    if evaluation:
        batch = t.per_device_eval_batch_size
        if batch > 1:
            advice.append(
                f"training.per_device_eval_batch_size: {batch // 2} (now {batch}; evaluation only: the same "
                "metrics, and a resume accepts it)"
            )
            sets.append(f"training.per_device_eval_batch_size={batch // 2}")
        advice.append(
            f"a lower generation.max_new_tokens (now {cfg.generation.max_new_tokens}): the task metric's "
            "answers keep a key/value cache that grows with it"
        )
        return advice, sets
    if d.packing:
        # Half the failed micro-batch, on the pad multiple, never below the longest example.
        multiple = d.pad_to_multiple_of or 1
        budget = max(d.max_seq_length, tokens // 2 // multiple * multiple)
        if budget < tokens:
            advice.append(
                f"training.max_tokens_per_micro_batch: {budget} (packed rows of at most that many tokens: the "
                "same steps, gradients and loss; a resume accepts it)"
            )
            sets.append(f"training.max_tokens_per_micro_batch={budget}")
    else:
        advice.append(
            "data.packing: true with training.max_tokens_per_micro_batch (no pads, and a bound on a "
            "micro-batch's tokens whatever lengths are drawn; a new run)"
        )
    if not t.gradient_checkpointing:
        advice.append(
            "training.gradient_checkpointing: true (activations recomputed in the backward: the same gradients "
            "for ~30% more compute; a resume accepts it)"
        )
        sets = sets or ["training.gradient_checkpointing=true"]
    advice.append(
        f"a smaller training.per_device_train_batch_size (now {t.per_device_train_batch_size}) and a larger "
        "gradient_accumulation_steps for the same effective batch (other micro-batches: a new run)"
    )
    advice.append(f"a lower data.max_seq_length (now {d.max_seq_length}; longer examples are truncated)")
    return advice, sets


def peak_memory_bytes(device: torch.device) -> int:
    """The process's peak so far: allocated on the GPU, resident on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def memory_check_line(check: dict, device: torch.device) -> str:
    peak = f"{check['peak_memory_bytes'] / 2**30:.2f}"
    if device.type == "cuda":
        peak += f" of {torch.cuda.get_device_properties(device).total_memory / 2**30:.1f}"
    tokens = f"{check['largest_micro_batch_tokens']:,} tokens"
    if check["ran"]:
        return f"memory check: the run's largest micro-batch ({tokens}, step {check['step']}) fits; peak {peak} GiB"
    return (
        f"memory check: step {check['step']} held the run's largest micro-batch ({tokens}); peak {peak} GiB"
    )
