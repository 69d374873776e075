"""The training loop: one readable function over optimizer steps.

One optimizer step = one accumulation window of micro-batches. The loss of every micro-batch is
its summed target cross-entropy divided by the number of target tokens in the whole window
(across all ranks under DDP), so accumulation and data parallelism give exactly the gradient of
one big batch, as transformers does since 4.46.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from functools import partial

import torch
from accelerate import Accelerator
from accelerate.utils.memory import clear_device_cache

from tunewise.config.problems import ConfigError, Problem
from tunewise.data.collate import (
    batch_indices,
    batch_tensor_tokens,
    collate_packed,
    collate_padded,
    group_window_by_length,
    iterate_batches,
    largest_first,
    pack_within,
)
from tunewise.data.tokenize import IGNORE
from tunewise.training.checkpoint import CheckpointError, capture_rng_state, restore_rng_state
from tunewise.training.memory import (
    TrainingOutOfMemory,
    catch_out_of_memory,
    first_line,
    memory_check_line,
    peak_memory_bytes,
)
from tunewise.training.progress import TrainProgress

log = logging.getLogger("tunewise")


@dataclass(frozen=True)
class LoopSettings:
    per_device_batch_size: int
    gradient_accumulation_steps: int
    total_steps: int
    # Micro-batches each process draws in one pass over the data (StepPlan.batches_per_epoch): the
    # denominator of the logged epoch, as HF's steps_in_epoch.
    batches_per_epoch: int
    max_steps_overrides: bool
    logging_steps: int
    eval_steps: int | None
    save_steps: int | None
    max_grad_norm: float | None
    data_seed: int
    pad_token_id: int
    packing: bool = False
    padding: str = "longest"
    padding_side: str = "right"
    max_seq_length: int = 512
    pad_to_multiple_of: int | None = None
    group_by_length: bool = False
    max_tokens_per_micro_batch: int | None = None  # packed rows only
    metric_for_best_model: str = "eval_loss"
    greater_is_better: bool = False
    early_stopping_patience: int | None = None
    early_stopping_threshold: float = 0.0
    nonfinite_patience: int = 3
    memory_check: bool = False  # after the first step, the run's largest micro-batch once (see check_memory)
    # Also save after a step that ends this long after the last save (or the start): training.save_minutes.
    save_seconds: float | None = None


@dataclass
class LoopState:
    """Everything that, with model/optimizer/scheduler/RNG, defines where training is."""

    step: int = 0
    epoch: int = 0
    window: int = 0  # next accumulation window within `epoch`
    tokens: int = 0  # non-padding input tokens seen
    target_tokens: int = 0
    best_metric: float | None = None  # the best evaluation and its step (HF's best_metric, best_global_step)
    best_step: int | None = None
    # The newest checkpoint whose evaluation was the best so far when it was saved, and that value: what
    # load_best_model_at_end loads and rotation keeps (HF's best_model_checkpoint). Not best_step's own
    # checkpoint, which does not exist when that evaluation fell between saves.
    best_checkpoint: int | None = None
    best_checkpoint_metric: float | None = None
    evals_without_improvement: int = 0
    consecutive_nonfinite: int = 0
    skipped_steps: list[int] = field(default_factory=list)
    fp16_overflows: int = 0
    rollbacks: int = 0
    stop_reason: str | None = None
    memory_check: dict | None = None  # what check_memory found in this process
    evaluation_due: bool = False  # the evaluation after `step` ran out of memory: a resume runs it first

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Hooks:
    """What the loop calls out to; each is optional."""

    evaluate: Callable[[int], dict] | None = None
    save: Callable[[LoopState], None] | None = None
    log: Callable[[dict], None] | None = None
    should_stop: Callable[[], bool] = lambda: False
    rollback: Callable[[LoopState], LoopState] | None = None  # nonfinite_policy: rollback
    clock: Callable[[], float] = time.monotonic  # seconds, for save_seconds


def epoch_windows(
    settings: LoopSettings, lengths: list[int], epoch: int, rank: int, world: int
) -> list[list[list[int]]]:
    """This rank's micro-batch indices for `epoch`, grouped into accumulation windows."""
    k = settings.gradient_accumulation_steps
    global_batch = settings.per_device_batch_size * world
    batches = batch_indices(
        lengths,
        global_batch,
        shuffle=True,
        seed=settings.data_seed + epoch,
        group_by_length=settings.group_by_length,
        # HF groups by one optimizer step's examples (train_batch_size x accumulation); here all ranks' share,
        # so the same examples form each step whatever the number of processes.
        group_size=global_batch * k,
    )
    mine = [b[rank::world] for b in batches]
    windows = [mine[i : i + k] for i in range(0, len(mine), k)]
    if settings.packing:  # packed rows hold no pads: only their order within the step is chosen
        if settings.max_tokens_per_micro_batch:
            budget, multiple = settings.max_tokens_per_micro_batch, settings.pad_to_multiple_of
            windows = [pack_within(w, lengths, budget, multiple) for w in windows]
        return [largest_first(w, lengths) for w in windows]
    return [group_window_by_length(w, lengths) for w in windows]  # its longest examples first


def micro_batch_tokens(settings: LoopSettings, lengths: list[int], ids: list[int]) -> int:
    """Tokens in the micro-batch's input tensor as `make_collate` builds it, padding included."""
    if not ids:
        return 1  # a rank's stand-in micro-batch: one pad token (collate_micro_batch)
    return batch_tensor_tokens(
        [lengths[i] for i in ids],
        packed=settings.packing,
        pad_to_length=settings.max_seq_length if settings.padding == "max_length" else None,
        pad_to_multiple_of=settings.pad_to_multiple_of,
    )


@dataclass(frozen=True)
class LargestMicroBatch:
    tokens: int  # in its input tensor, padding included
    step: int  # the optimizer step that runs it
    ids: list[int]


def largest_micro_batch(
    settings: LoopSettings, lengths: list[int], state: LoopState, rank: int, world: int
) -> LargestMicroBatch | None:
    """This rank's micro-batch with the most tokens from `state` to the end of the run (the first such)."""
    best: LargestMicroBatch | None = None
    step, epoch, start = state.step, state.epoch, state.window
    while step < settings.total_steps:
        windows = epoch_windows(settings, lengths, epoch, rank, world)
        if not windows:
            return None
        for window in windows[start:]:
            step += 1
            for ids in window:
                tokens = micro_batch_tokens(settings, lengths, ids)
                if best is None or tokens > best.tokens:
                    best = LargestMicroBatch(tokens, step, ids)
            if step == settings.total_steps:
                break
        epoch, start = epoch + 1, 0
    return best


def make_collate(settings: LoopSettings) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
    if settings.packing:
        return partial(
            collate_packed, pad_to_multiple_of=settings.pad_to_multiple_of, pad_token_id=settings.pad_token_id
        )
    return partial(
        collate_padded,
        pad_token_id=settings.pad_token_id,
        padding_side=settings.padding_side,
        pad_to_length=settings.max_seq_length if settings.padding == "max_length" else None,
        pad_to_multiple_of=settings.pad_to_multiple_of,
    )


def logged_epoch(settings: LoopSettings, epoch: int, window: int) -> float:
    """The `epoch` of a row after accumulation window `window` (from 0) of `epoch`, as HF's
    `epoch + (step + 1) / steps_in_epoch`: micro-batches drawn so far over micro-batches per pass, both
    on one process, the last window of a pass short when the accumulation does not divide it.

    Fix (test_training_semantics.py): it counted windows over steps per epoch, 1/3 after the first of 3
    steps over 8 micro-batches with accumulation 3, where HF logs 3/8."""
    drawn = min((window + 1) * settings.gradient_accumulation_steps, settings.batches_per_epoch)
    return round(epoch + drawn / settings.batches_per_epoch, 4)


def _save(state: LoopState, hooks: Hooks) -> None:
    """Checkpoint this step, first noting whether it is the best checkpoint, as HF's `_save_checkpoint`
    (trainer.py) does: a checkpoint is the best one when the best evaluation so far is its own step's.

    Fix (test_training_semantics.py): load_best_model_at_end loaded checkpoint-<best_step>, which does not
    exist when that evaluation fell between saves (eval_steps 2, save_steps 4)."""
    assert hooks.save is not None
    if state.best_step is not None and state.best_step == state.step:
        state.best_checkpoint, state.best_checkpoint_metric = state.step, state.best_metric
    hooks.save(state)


def _improved(value: float, best: float | None, greater: bool, threshold: float) -> bool:
    if best is None:
        return True
    return value > best + threshold if greater else value < best - threshold


def global_counts(accelerator: Accelerator, *values: int) -> list[int]:
    """Each value summed over the processes, in one collective for all of them."""
    if accelerator.num_processes == 1:
        return list(values)
    t = torch.tensor(values, device=accelerator.device, dtype=torch.long)
    return [int(v) for v in accelerator.reduce(t, reduction="sum").tolist()]


def global_count(accelerator: Accelerator, value: int) -> int:
    return global_counts(accelerator, value)[0]


def any_process(accelerator: Accelerator, *flags: bool) -> list[bool]:
    """Each flag, true where it is true on any process."""
    return [count > 0 for count in global_counts(accelerator, *map(int, flags))]


def train_step(
    accelerator: Accelerator,
    loss_module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    window: list[dict[str, torch.Tensor]],
    max_grad_norm: float | None,
) -> tuple[float, float, int]:
    """Forward/backward every micro-batch of one window, then clip. Returns (loss, grad_norm, targets)."""
    loss, grad_norm, targets = launch_step(accelerator, loss_module, window, max_grad_norm)
    return float(loss), float(grad_norm), targets


def launch_step(
    accelerator: Accelerator,
    loss_module: torch.nn.Module,
    window: list[dict[str, torch.Tensor]],
    max_grad_norm: float | None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """`train_step` without waiting for the device: the loss and gradient norm stay tensors, so the caller
    can prepare the next window while the GPU computes this one."""
    local_targets = sum(int((b["targets"] != IGNORE).sum()) for b in window)
    window_targets = global_count(accelerator, local_targets)
    loss_sum = torch.zeros((), device=accelerator.device)
    for i, batch in enumerate(window):
        last = i == len(window) - 1
        with accelerator.no_sync(loss_module) if not last else nullcontext(), accelerator.autocast():
            summed = loss_module(**{k: v.to(accelerator.device) for k, v in batch.items()})
            if not bool((batch["targets"] != IGNORE).any()):
                summed = summed + _zero_through_parameters(loss_module)
            # DDP averages gradients over ranks, hence the world-size factor.
            accelerator.backward(summed * accelerator.num_processes / max(window_targets, 1))
        loss_sum += summed.detach()
    limit = max_grad_norm if max_grad_norm else float("inf")
    grad_norm = accelerator.clip_grad_norm_(loss_module.parameters(), limit)
    loss = global_sum(accelerator, loss_sum) / max(window_targets, 1)
    return loss, torch.as_tensor(grad_norm), window_targets


def _zero_through_parameters(module: torch.nn.Module) -> torch.Tensor:
    """0 x every trainable parameter, for a micro-batch without targets.

    Fix (test_training_semantics.py, test_distributed.py): such a micro-batch (a rank's empty share of an
    epoch's last global batch) can give a constant loss with no graph (the loss's unfused path, e.g. a
    PEFT modules_to_save head), whose backward raised "does not require grad"; and under DDP every
    parameter must still get a (zero) gradient, or this rank never joins the gradient all-reduce.
    """
    return sum((p.sum() for p in module.parameters() if p.requires_grad), torch.zeros(())) * 0.0


def global_sum(accelerator: Accelerator, value: torch.Tensor) -> torch.Tensor:
    if accelerator.num_processes > 1:
        value = accelerator.reduce(value.clone(), reduction="sum")
    return value


def windows_from(
    settings: LoopSettings, dataset: object, lengths: list[int], state: LoopState, rank: int, world: int
) -> Iterator[tuple[int, int, list[list[int]], list[dict[str, torch.Tensor]]]]:
    """(epoch, window index, example ids, collated micro-batches), resuming at `state`."""
    collate = make_collate(settings)
    epoch, start = state.epoch, state.window
    while True:
        windows = epoch_windows(settings, lengths, epoch, rank, world)
        for w in range(start, len(windows)):
            batches = [
                collate_micro_batch(dataset, ids, collate, settings.pad_token_id) for ids in windows[w]
            ]
            yield epoch, w, [ids for ids, _ in batches], [b for _, b in batches]
        epoch, start = epoch + 1, 0


def collate_micro_batch(
    dataset: object, ids: list[int], collate: Callable, pad_token_id: int
) -> tuple[list[int], dict[str, torch.Tensor]]:
    if ids:
        return next(iterate_batches(dataset, [ids], collate))
    # A rank whose share of the epoch's last global batch is empty still runs forward and backward
    # (DDP needs every rank in the gradient all-reduce), on one pad token that has no target.
    one = torch.tensor([[pad_token_id]])
    return ids, {
        "input_ids": one,
        "attention_mask": torch.ones_like(one),
        "targets": torch.full_like(one, IGNORE),
    }


@dataclass
class PendingLog:
    """The losses of the steps since the last `metrics.jsonl` row, and the row of the last finished step."""

    losses: list[float] = field(default_factory=list)
    row: dict | None = None

    def write(self, hooks: Hooks) -> None:
        """Log the last finished step's row, its loss the mean since the previous row (as HF); a no-op when
        every finished step is in a row already."""
        if hooks.log and self.losses and self.row is not None:
            hooks.log({**self.row, "loss": sum(self.losses) / len(self.losses)})
        self.losses.clear()


def fit(
    accelerator: Accelerator,
    loss_module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    train_dataset: object,
    settings: LoopSettings,
    state: LoopState,
    hooks: Hooks,
    progress: TrainProgress | None = None,
) -> LoopState:
    _refuse_silent_fp32(accelerator)
    with _pending_rows(hooks) as pending:
        lengths = list(train_dataset["length"])  # type: ignore[index]
        loss_module.train()
        started = time.perf_counter()
        tokens_at_start = state.tokens
        windows = windows_from(
            settings, train_dataset, lengths, state, accelerator.process_index, accelerator.num_processes
        )
        upcoming = next(windows)
        memory_checked = not settings.memory_check
        if state.evaluation_due and hooks.evaluate:
            # The evaluation after the restored step ran out of memory: run before the next step, then that step's
            # checkpoint saved again with what it found (the best step, early stopping).
            # Fix (test_crash_safety.py): the resume trained on, and the evaluation never counted.
            _evaluate_step(accelerator, optimizer, state, settings, hooks)
            if hooks.save:
                _save(state, hooks)
        last_saved = hooks.clock()
        while state.step < settings.total_steps and state.stop_reason is None:
            epoch, w, example_ids, window = upcoming
            # The random state as the step found it: what a checkpoint after a failed step keeps. One process
            # only, the one kind of run that saves then (_save_last_step).
            rng = capture_rng_state() if accelerator.num_processes == 1 else None
            try:
                run_step = partial(launch_step, accelerator, loss_module, window, settings.max_grad_norm)
                launched, failure = catch_out_of_memory(run_step)
                if launched is not None:
                    # Read and collate the next window while the device computes this one.
                    upcoming = next(windows)
                    loss_t, grad_norm_t, targets = launched
                    loss, grad_norm = float(loss_t), float(grad_norm_t)
            except Exception:  # not an out-of-memory: save what is finished, then let it go on
                if (saved := _save_last_step(accelerator, optimizer, state, hooks, rng, "error")) is not None:
                    log.error(
                        "step %d is saved in checkpoint-%d: after this error, `--resume` continues there",
                        saved,
                        saved,
                    )
                raise
            if failure is not None:
                tokens = max(int(b["input_ids"].numel()) for b in window)
                raise _out_of_memory(
                    accelerator, optimizer, state, hooks, rng, failure, f"step {state.step + 1}", tokens
                )
            state.epoch, state.window = epoch, w + 1
            scaled = accelerator.scaler is not None  # fp16: the loss scaler owns overflowing gradients
            if not math.isfinite(loss) or (not math.isfinite(grad_norm) and not scaled):
                if _skip_nonfinite(optimizer, state, example_ids, loss, grad_norm, settings, hooks):
                    state = _give_up_or_roll_back(state, hooks)
                    pending.losses.clear()
                    windows = windows_from(
                        settings,
                        train_dataset,
                        lengths,
                        state,
                        accelerator.process_index,
                        accelerator.num_processes,
                    )
                    upcoming = next(windows)
                continue
            learning_rate = scheduler.get_last_lr()[0]  # the rate this update uses, as HF logs it
            optimizer.step()
            if scaled and accelerator.optimizer_step_was_skipped:
                _note_overflow(state)
            else:
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.consecutive_nonfinite = 0
            state.step += 1
            # The examples' own tokens: not a packed row's filler (pad_to_multiple_of), a padded batch's pads or
            # the one pad token of a rank's stand-in micro-batch (no example ids).
            seen = sum(lengths[i] for ids in example_ids for i in ids)
            state.tokens += global_count(accelerator, seen)
            state.target_tokens += targets
            elapsed = time.perf_counter() - started
            row = {
                "step": state.step,
                "epoch": logged_epoch(settings, epoch, w),
                "loss": loss,
                "learning_rate": learning_rate,
                "grad_norm": grad_norm,
                "tokens": state.tokens,
                "tokens_per_second": (state.tokens - tokens_at_start) / max(elapsed, 1e-9),
            }
            pending.losses.append(loss)
            pending.row = row
            if progress:
                progress.update(state.step, row)
            # Fix (test_training_semantics.py): as HF, a logged "loss" is the mean over the steps since the last log.
            if state.step % settings.logging_steps == 0 or state.step == settings.total_steps:
                pending.write(hooks)
            if settings.eval_steps and state.step % settings.eval_steps == 0 and hooks.evaluate:
                _evaluate_step(accelerator, optimizer, state, settings, hooks)
            if state.step >= settings.total_steps and state.stop_reason is None:
                state.stop_reason = "max_steps" if settings.max_steps_overrides else "epochs"
            # Every process calls this, every step: a signal or the clock can reach the processes a step apart,
            # and one saving (a barrier) or stopping while the others train on would hang them all.
            stop_requested, save_time_due = any_process(
                accelerator,
                hooks.should_stop(),
                settings.save_seconds is not None and hooks.clock() - last_saved >= settings.save_seconds,
            )
            if stop_requested and state.stop_reason is None:
                state.stop_reason = "interrupted"
            if hooks.save and (
                state.stop_reason
                or (settings.save_steps and state.step % settings.save_steps == 0)
                or save_time_due
            ):
                _save(state, hooks)
                last_saved = hooks.clock()
            if not memory_checked and state.stop_reason is None:  # after step 1 is logged and saved as usual
                memory_checked = True
                ran = max(int(b["input_ids"].numel()) for b in window)
                state.memory_check = check_memory(
                    accelerator, loss_module, optimizer, train_dataset, settings, lengths, state, hooks, ran
                )
                if progress:
                    progress.note(memory_check_line(state.memory_check, accelerator.device))
        if state.stop_reason is None:  # resumed at its last step: nothing was left to train
            state.stop_reason = "max_steps" if settings.max_steps_overrides else "epochs"
    return state


@contextmanager
def _pending_rows(hooks: Hooks) -> Iterator[PendingLog]:
    """The steps since the last metrics row, logged however training ends.

    Fix (test_training_semantics.py): rows came only at multiples of logging_steps and at total_steps, so a
    run that stopped before (early stopping, Ctrl-C, an error) never logged its last steps' losses.
    """
    pending = PendingLog()
    try:
        yield pending
    except BaseException:
        try:
            pending.write(hooks)
        except OSError as error:  # a full disk, say: the error that stopped the run is the one to report
            log.error("could not log the steps since the last metrics row: %s", first_line(error))
        raise
    pending.write(hooks)


def _out_of_memory(
    accelerator: Accelerator,
    optimizer: torch.optim.Optimizer,
    state: LoopState,
    hooks: Hooks,
    rng: dict | None,
    detail: str,
    where: str,
    tokens: int,
) -> TrainingOutOfMemory:
    """Free what the failed step held and checkpoint the last completed step, with the random state the
    failed step began from, so `--resume` after a change that fits runs it as the uninterrupted run would."""
    clear_device_cache(garbage_collection=True)
    saved = _save_last_step(accelerator, optimizer, state, hooks, rng, "out_of_memory")
    return TrainingOutOfMemory(detail, where, tokens, saved, str(accelerator.device))


def _save_last_step(
    accelerator: Accelerator,
    optimizer: torch.optim.Optimizer,
    state: LoopState,
    hooks: Hooks,
    rng: dict | None,
    reason: str,
) -> int | None:
    """After an error before an update: checkpoint the last finished step (its gradients dropped, `rng` the
    random state it ended with), so nothing finished is lost; the step saved, or None.

    One process only: under DDP the other ranks wait in a collective this rank will never join, and a save
    would wait for them; their last periodic checkpoint is where a resume starts."""
    optimizer.zero_grad(set_to_none=True)
    if not hooks.save or state.step == 0 or accelerator.num_processes > 1 or rng is None:
        return None
    restore_rng_state(rng)
    state.stop_reason = reason
    try:
        _save(state, hooks)
    except (CheckpointError, OSError, RuntimeError) as error:  # the first error is the one to report
        log.error("could not save step %d before stopping: %s", state.step, first_line(error))
        return None
    return state.step


def check_memory(
    accelerator: Accelerator,
    loss_module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    dataset: object,
    settings: LoopSettings,
    lengths: list[int],
    state: LoopState,
    hooks: Hooks,
    ran_tokens: int,
) -> dict:
    """Forward and backward of the run's largest micro-batch once, right after the first step, without an
    update: with packing or random order it can come hours in, and an out-of-memory should show now.

    After the first step the optimizer's state exists, so this peaks where a real step would. Its
    gradients are discarded and the random state put back: the run continues exactly as without it.
    Skipped where the first step already ran a micro-batch as large. Under DDP each rank checks its own
    and all fail together.
    """
    largest = largest_micro_batch(
        settings, lengths, state, accelerator.process_index, accelerator.num_processes
    )
    if largest is not None and largest.tokens <= ran_tokens:
        largest = None  # the first step held one as large
    failure = None
    if largest is not None:
        _, batch = collate_micro_batch(dataset, largest.ids, make_collate(settings), settings.pad_token_id)
        rng = capture_rng_state()
        failure = catch_out_of_memory(lambda: _forward_backward(accelerator, loss_module, batch))[1]
        optimizer.zero_grad(set_to_none=True)
        restore_rng_state(rng)
    tokens, step = (largest.tokens, largest.step) if largest is not None else (ran_tokens, state.step)
    if global_count(accelerator, int(failure is not None)):  # every rank stops if one ran out
        where = f"the memory check after step {state.step}"
        where += f" (that micro-batch comes in step {step})" if failure is not None else ""
        detail = failure or "another process ran out of memory"
        raise _out_of_memory(accelerator, optimizer, state, hooks, capture_rng_state(), detail, where, tokens)
    return {
        "largest_micro_batch_tokens": tokens,
        "step": step,
        "ran": largest is not None,
        "peak_memory_bytes": peak_memory_bytes(accelerator.device),  # the run's own peak, reached early
    }


def _forward_backward(
    accelerator: Accelerator, loss_module: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> None:
    """One micro-batch's forward and backward, its gradient times 0."""
    with accelerator.no_sync(loss_module), accelerator.autocast():
        summed = loss_module(**{k: v.to(accelerator.device) for k, v in batch.items()})
        if summed.requires_grad:
            accelerator.backward(summed * 0.0)


def _refuse_silent_fp32(accelerator: Accelerator) -> None:
    """Fix (test_training_semantics.py): fp16 on CPU must fail before the first step, not train in fp32.

    accelerate gives fp16 autocast and loss scaling only on accelerators; on CPU `Accelerator(mixed_precision=
    "fp16")` quietly computes everything in fp32 (no autocast, no scaler).
    """
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        message = (
            "fp16 needs a GPU: on CPU accelerate applies no fp16 autocast and no loss scaling, so this run "
            "would silently train in fp32. Use precision: bf16 (CPU autocast) or fp32."
        )
        raise ConfigError([Problem("training.precision", message)])


def _evaluate_step(
    accelerator: Accelerator,
    optimizer: torch.optim.Optimizer,
    state: LoopState,
    settings: LoopSettings,
    hooks: Hooks,
) -> None:
    """The evaluation after `state.step`. Should it run out of memory, the step is saved with the random state it
    ended with and the evaluation marked due, which a resume runs before training on."""
    after_step = capture_rng_state() if accelerator.num_processes == 1 else None
    if (failure := catch_out_of_memory(partial(_evaluate, state, settings, hooks))[1]) is not None:
        state.evaluation_due = True
        where = f"the evaluation after step {state.step}"
        raise _out_of_memory(accelerator, optimizer, state, hooks, after_step, failure, where, 0)
    state.evaluation_due = False


def _evaluate(state: LoopState, settings: LoopSettings, hooks: Hooks) -> None:
    assert hooks.evaluate is not None
    metrics = hooks.evaluate(state.step)
    value = metrics.get(settings.metric_for_best_model)
    if value is None:
        # Fix (test_training_semantics.py): a missing metric returned here, which silently turned off early
        # stopping and the best checkpoint for the whole run; `prepare` refuses such a metric before training.
        computed = ", ".join(k for k in metrics if not k.startswith("_")) or "nothing"
        message = (
            f"`{settings.metric_for_best_model}` is not among the metrics of the evaluation after step "
            f"{state.step} (it computed {computed}), so early stopping and the best model cannot follow it; "
            "set metric_for_best_model to one of them"
        )
        raise ConfigError([Problem("training.metric_for_best_model", message)])
    # Fix (test_training_semantics.py): as HF, patience (EarlyStoppingCallback) needs an improvement
    # larger than the threshold over the best *before* this evaluation, while the best metric and step
    # (Trainer._determine_best_metric) follow any strict improvement; a NaN is never the best.
    if _improved(value, state.best_metric, settings.greater_is_better, settings.early_stopping_threshold):
        state.evals_without_improvement = 0
    else:
        state.evals_without_improvement += 1
        patience = settings.early_stopping_patience
        if patience and state.evals_without_improvement >= patience:
            state.stop_reason = "early_stopping"
    if not math.isnan(value) and _improved(value, state.best_metric, settings.greater_is_better, 0.0):
        state.best_metric, state.best_step = value, state.step


class NonFiniteError(RuntimeError):
    pass


def _skip_nonfinite(
    optimizer: torch.optim.Optimizer,
    state: LoopState,
    example_ids: list[list[int]],
    loss: float,
    grad_norm: float,
    settings: LoopSettings,
    hooks: Hooks,
) -> bool:
    """Drop the update of a non-finite step and log it; True once `nonfinite_patience` ran out."""
    optimizer.zero_grad(set_to_none=True)
    state.consecutive_nonfinite += 1
    state.skipped_steps.append(state.step + 1)
    ids = sorted(i for batch in example_ids for i in batch)
    if hooks.log:
        hooks.log(
            {
                "step": state.step + 1,
                "skipped": True,
                "loss": str(loss),
                "grad_norm": str(grad_norm),
                "example_ids": ids,
            }
        )
    log.warning(
        "step %d: non-finite loss %s / grad_norm %s; update skipped (examples %s)",
        state.step + 1,
        loss,
        grad_norm,
        ids[:20],
    )
    return state.consecutive_nonfinite >= settings.nonfinite_patience


def _give_up_or_roll_back(state: LoopState, hooks: Hooks) -> LoopState:
    if hooks.rollback is None:
        raise NonFiniteError(
            f"{state.consecutive_nonfinite} consecutive steps had a non-finite loss or gradient norm "
            f"(skipped steps {state.skipped_steps[-state.consecutive_nonfinite :]}; their example ids are in "
            "metrics.jsonl). Lower training.learning_rate, use bf16 instead of fp16, check those examples, "
            "or set training.nonfinite_policy: rollback. No checkpoint holds non-finite values."
        )
    return hooks.rollback(state)


def _note_overflow(state: LoopState) -> None:
    state.fp16_overflows += 1
    if state.fp16_overflows in (10, 100, 1000):
        log.warning(
            "fp16 loss scaling has skipped %d updates for overflow; bf16 (training.precision: bf16) has fp32's "
            "range and needs no loss scaling, if your GPU supports it",
            state.fp16_overflows,
        )
