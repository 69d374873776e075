"""Checkpoints of a live run, exact resume, and graceful stops on SIGTERM / Ctrl-C."""

from __future__ import annotations

import json
import logging
import shlex
import signal
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, Self

import torch
import yaml
from accelerate import Accelerator
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from rich.console import Console

from tunewise.training.checkpoint import (
    MANIFEST,
    Checkpoint,
    CheckpointError,
    find_latest_valid,
    is_checkpoint_name,
    list_checkpoints,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    stale_leftovers,
)
from tunewise.training.loop import LoopState, NonFiniteError

log = logging.getLogger("tunewise")

EARLIER_RUNS = "earlier-runs"
# Everything a run writes into output_dir beside its checkpoints (run.py: RunWriter, save_final), so an earlier
# run moves aside whole. Fix (test_crash_safety.py): the card, a full fine-tune's config.json and generation
# config and the tokenizer stayed: the new run overwrote the card, the earlier full model in earlier-runs/
# could not be loaded, and its config.json left beside a new adapter made the folder look like both. Other
# files (your notes, data) stay where they are, except names a model's save may write too (*.py, *.model,
# tokenizer*): those move aside with the run, never deleted.
RUN_FILES = (
    # the run's record; metrics.jsonl.tmp is what a kill during a metrics rewrite leaves
    "config.yaml",
    "metrics.jsonl",
    "metrics.jsonl.tmp",
    "summary.json",
    "README.md",
    # the final adapter (PEFT's save_pretrained)
    "adapter_model.safetensors",
    "adapter_config.json",
    # the final full model (transformers' save_pretrained): one file or shards and their index, and the
    # modules of a trust_remote_code model or tokenizer, which save_pretrained copies beside them
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model-*-of-*.safetensors",
    "model.safetensors.index.json",
    "*.py",
    # the tokenizer, of every kind a causal LM uses (tokenizer.save_pretrained): tokenizer.json and
    # tokenizer_config.json, BPE's vocab.json + merges.txt, WordPiece's vocab.txt, SentencePiece's
    # tokenizer.model / spiece.model / sentencepiece.bpe.model, tiktoken files, and the chat templates
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "*.model",
    "*.tiktoken",
    "chat_template.jinja",
    "chat_template.json",
    "additional_chat_templates",
)


def set_aside_earlier_run(output_dir: Path) -> Path | None:
    """Move an earlier run's files out of `output_dir` before a fresh run there; returns where they went.

    Without this a fresh run would append its rows to the earlier run's metrics.jsonl, and a later
    `--resume` could pick up the earlier run's newer checkpoint (or one a crashed save left aside, which
    a resume puts back). Nothing is deleted: every file of `RUN_FILES` goes to
    `output_dir/earlier-runs/<UTC time>/`, which then loads as the run directory it was. A folder without
    metrics.jsonl, checkpoints or such leftovers is left as it is.
    """
    if not output_dir.is_dir():
        return None
    folders = list_checkpoints(output_dir) + [path for _, _, path in stale_leftovers(output_dir)]
    if not folders and not (output_dir / "metrics.jsonl").exists():
        return None
    target = output_dir / EARLIER_RUNS / datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    while target.exists():  # two runs within one second
        target = target.with_name(target.name + "-1")
    target.mkdir(parents=True)
    # A set: one file may match two patterns (tokenizer.model), and a second rename of it would fail.
    files = {path for pattern in RUN_FILES for path in output_dir.glob(pattern)}
    for path in folders + sorted(files):
        path.rename(target / path.name)
    return target


# Keys that may differ between a checkpoint's config and the resumed run's: they change how long
# or how often, or how a step's micro-batches are cut or its activations kept, never what it computes.
RESUMABLE_CHANGES = {
    # Fix (test_crash_safety.py): a run directory copied to another disk or machine must resume there.
    "training.output_dir",
    "training.max_steps",
    "training.num_train_epochs",
    "training.save_steps",
    "training.save_minutes",
    "training.save_total_limit",
    "training.logging_steps",
    "training.eval_steps",
    "training.early_stopping_patience",
    "training.early_stopping_threshold",
    "training.nonfinite_patience",
    "training.nonfinite_policy",
    "training.load_best_model_at_end",
    # The same steps and gradients, cut or recomputed otherwise: the fixes an out-of-memory message suggests.
    "training.max_tokens_per_micro_batch",
    "training.gradient_checkpointing",
    "training.memory_check",
    "training.per_device_eval_batch_size",  # evaluation only
}
RESUMABLE_SECTIONS = ("generation.", "evaluation.")


class ResumeError(RuntimeError):
    """The run cannot be resumed as asked; the message says why and what to do."""


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    if isinstance(model, PeftModel):
        return get_peft_model_state_dict(model)
    return model.state_dict()


def load_model_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    if isinstance(model, PeftModel):
        result = set_peft_model_state_dict(model, tensors)
        missing = list(getattr(result, "unexpected_keys", []))
        if missing:
            raise ResumeError(f"checkpoint adapter has tensors this model lacks: {missing[:5]}")
    else:
        model.load_state_dict(tensors)


def _adapter_files(model: torch.nn.Module) -> tuple[str, dict[str, bytes]]:
    if not isinstance(model, PeftModel):  # with config.json the folder loads as a HF model
        config_json = model.config.to_json_string()  # type: ignore[union-attr,operator]
        return "model.safetensors", {"config.json": config_json.encode()}
    config = model.peft_config["default"].to_dict()
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    return "adapter_model.safetensors", {
        "adapter_config.json": json.dumps(config, indent=2, default=str).encode()
    }


def _all_finite(tensors: dict[str, torch.Tensor]) -> bool:
    return all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())


@dataclass
class RunCheckpointer:
    """Saves checkpoints of this run; remembers the best one so rotation never deletes it."""

    output_dir: Path
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    config_yaml: str
    save_total_limit: int | None
    scaler: Any = None
    extra_state: dict[str, Any] = field(default_factory=dict)

    def save(self, state: LoopState) -> Path:
        tensors = {k: v.detach().cpu().contiguous() for k, v in model_tensors(self.model).items()}
        if not _all_finite(tensors):  # skipped updates should make this impossible; never persist it
            raise CheckpointError(f"refusing to save step {state.step}: the weights hold NaN or inf")
        weights_name, extra = _adapter_files(self.model)
        # Fix (test_training_semantics.py): this kept checkpoint-<best_step>, which does not exist when that
        # evaluation fell between saves, while the best saved one went; HF's rotate_checkpoints keeps
        # best_model_checkpoint.
        best = state.best_checkpoint
        keep = {self.output_dir / f"checkpoint-{best}"} if best is not None else None
        return save_checkpoint(
            self.output_dir,
            state.step,
            model_tensors=tensors,
            optimizer_state=self.optimizer.state_dict(),
            scheduler_state=self.scheduler.state_dict(),
            trainer_state={**state.to_json(), **self.extra_state},
            config_yaml=self.config_yaml,
            scaler_state=self.scaler.state_dict() if self.scaler is not None else None,
            save_total_limit=self.save_total_limit,
            keep=keep,
            extra_files=extra,
            weights_name=weights_name,
        )


def find_resume_checkpoint(output_dir: Path, resume: str | bool) -> Path:
    """`--resume` (newest valid checkpoint in output_dir) or `--resume PATH`."""
    if isinstance(resume, str) and resume not in ("", "latest", "true"):
        return _given_checkpoint(Path(resume), output_dir)
    latest = find_latest_valid(output_dir)
    for bad, problems in latest.skipped.items():
        log.warning("skipping damaged checkpoint %s: %s", bad, "; ".join(problems))
    if latest.path is None:
        raise ResumeError(
            f"--resume: no valid checkpoint in {output_dir}; train without --resume to start afresh"
        )
    return latest.path


def _given_checkpoint(path: Path, output_dir: Path) -> Path:
    """`--resume PATH`: a checkpoint folder (named checkpoint-<step> or holding a manifest), which
    load_checkpoint then verifies; anything else is refused here, saying what PATH is instead.

    Fix (test_crash_safety.py): a run directory went on to load_checkpoint, which called it a damaged
    checkpoint and advised deleting it: the whole run.
    """
    if not path.is_dir():
        raise ResumeError(f"--resume: {path} is not a checkpoint directory")
    if (path / MANIFEST).exists() or is_checkpoint_name(path.name):
        return path
    checkpoints = list_checkpoints(path)
    if not checkpoints:
        raise ResumeError(
            f"--resume: {path} is not a checkpoint (a checkpoint-<step> folder holding {MANIFEST}) and holds "
            "none; give a checkpoint-<step> folder of a run, or --resume alone for the newest valid checkpoint "
            f"in output_dir ({output_dir})"
        )
    newest = shlex.quote(str(checkpoints[-1]))
    same = path.resolve() == output_dir.resolve()
    alone = "--resume alone (its newest valid checkpoint) or " if same else ""
    raise ResumeError(
        f"--resume: {path} is a run directory, not a checkpoint: use {alone}--resume {path}/checkpoint-N, "
        f"e.g. --resume {newest}. It holds {', '.join(c.name for c in checkpoints)}"
    )


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "lr_scheduler_kwargs":
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(saved_yaml: str, current_yaml: str) -> list[str]:
    """Keys whose values differ and that may not change on resume."""
    saved, current = _flatten(yaml.safe_load(saved_yaml)), _flatten(yaml.safe_load(current_yaml))
    keys = sorted(set(saved) | set(current))
    return [
        f"{k}: {saved.get(k)!r} -> {current.get(k)!r}"
        for k in keys
        if saved.get(k) != current.get(k)
        and k not in RESUMABLE_CHANGES
        and not k.startswith(RESUMABLE_SECTIONS)
    ]


def restore(
    path: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    current_config_yaml: str,
    force: bool = False,
    scaler: Any = None,
) -> tuple[LoopState, Checkpoint]:
    """Load a checkpoint into the live objects; returns the loop state to continue from."""
    ck = load_checkpoint(path)
    diffs = config_differences(ck.config_yaml, current_config_yaml)
    if diffs and not force:
        raise ResumeError(
            f"--resume: the config differs from the one {path.name} was trained with:\n  "
            + "\n  ".join(diffs)
            + "\nrestore those values, or pass --force-resume to continue anyway"
        )
    load_model_tensors(model, ck.model_tensors)
    # load_state_dict puts back the checkpoint's hyperparameters; keep the current config's (they differ
    # only under --force-resume), all but the rates, which the schedule sets below.
    current = [{k: v for k, v in g.items() if k not in _SCHEDULED} for g in optimizer.param_groups]
    if ck.optimizer_state is not None:
        optimizer.load_state_dict(ck.optimizer_state)
        for group, settings in zip(optimizer.param_groups, current):
            group.update(settings)
    if ck.scheduler_state is not None:
        scheduler.load_state_dict(ck.scheduler_state)
        _follow_current_schedule(optimizer, scheduler, _lr_ratio(ck.config_yaml, current_config_yaml))
    if scaler is not None and ck.scaler_state is not None:
        scaler.load_state_dict(ck.scaler_state)
    restore_rng_state(ck.rng_state)  # last: nothing above may consume randomness after it
    fields = LoopState.__dataclass_fields__
    state = LoopState(**{k: v for k, v in ck.trainer_state.items() if k in fields})
    if "best_checkpoint" not in ck.trainer_state:  # saved before tunewise recorded it: best_step's, if saved
        state.best_checkpoint, state.best_checkpoint_metric = state.best_step, state.best_metric
    # Fix (test_crash_safety.py): the final and the interrupted checkpoint hold why that process stopped;
    # kept, it ended the resumed loop before its first step (a resumed Ctrl-C run never trained again).
    # Early stopping is the exception: it is why the run ended, and it still holds unless the patience changed.
    if not still_early_stopped(state, current_config_yaml):
        state.stop_reason = None
    return state, ck


def still_early_stopped(state: LoopState, current_config_yaml: str) -> bool:
    """Whether a restored early-stopped run stays stopped: its evaluations without improvement still reach
    the current training.early_stopping_patience.

    Fix (test_crash_safety.py): the stop was cleared like any other, so the resume that the out-of-memory
    error after training prints ("evaluates and writes the run without training again") trained on to
    max_steps. A larger max_steps alone does not restart it (the metric stopped improving all the same); a
    larger patience, or none, does, counting on from the restored evaluations. The threshold is not
    re-applied: the evaluations already counted were judged with the one they ran under.
    """
    patience = yaml.safe_load(current_config_yaml)["training"].get("early_stopping_patience")
    return (
        state.stop_reason == "early_stopping"
        and patience is not None
        and state.evals_without_improvement >= patience
    )


_SCHEDULED = ("params", "lr", "initial_lr")


def _lr_ratio(saved_yaml: str, current_yaml: str) -> float:
    """current / saved training.learning_rate: not 1 only when --force-resume changed it."""
    saved, current = yaml.safe_load(saved_yaml), yaml.safe_load(current_yaml)
    return float(current["training"]["learning_rate"]) / float(saved["training"]["learning_rate"])


def _follow_current_schedule(optimizer: torch.optim.Optimizer, scheduler: Any, lr_ratio: float) -> None:
    """Fix (test_crash_safety.py): the restored rates came from the checkpoint's schedule, so after a
    changed max_steps (or warmup, or a forced learning_rate) the first resumed step ran at the old rate,
    e.g. 0 when continuing a finished linear schedule. Re-derive them as the scheduler's own step would,
    from the schedule built for this config, at the restored step; unchanged configs get the same floats.
    """
    if lr_ratio != 1.0:
        scale_learning_rate(optimizer, scheduler, lr_ratio)
    if hasattr(scheduler, "lr_lambdas"):  # LambdaLR: every schedule transformers.get_scheduler builds
        rates = [
            base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)
        ]
        for group, rate in zip(optimizer.param_groups, rates):
            group["lr"] = rate
        scheduler._last_lr = rates  # what get_last_lr() reports, as LRScheduler.step sets it


def scale_learning_rate(optimizer: torch.optim.Optimizer, scheduler: Any, factor: float) -> None:
    """Scale the whole schedule (base and current rates) by `factor`: the rollback's lower LR."""
    scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]
    for group in optimizer.param_groups:
        group["lr"] *= factor
        if "initial_lr" in group:
            group["initial_lr"] *= factor
    # Fix (test_crash_safety.py): the loop logs get_last_lr(), which still said the unscaled rate for the
    # first step after a rollback. LRScheduler.step sets _last_lr this same way.
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


class GracefulStop:
    """First SIGINT/SIGTERM: finish the step, save, exit cleanly. A second Ctrl-C: stop at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("%s received: finishing this step, saving, then exiting", signal.Signals(signum).name)

    def __enter__(self) -> Self:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside a notebook worker): no handler
                pass
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def forget_missing_best(state: LoopState, output_dir: Path) -> None:
    """After a resume: a best checkpoint the state names but `output_dir` no longer holds is forgotten, with
    a warning, as HF's train() does with best_model_checkpoint; later evaluations may name another."""
    if state.best_checkpoint is None or (output_dir / f"checkpoint-{state.best_checkpoint}").is_dir():
        return
    log.warning(
        "the best checkpoint of the resumed run, checkpoint-%d, is not in %s: load_best_model_at_end can only "
        "load a checkpoint saved from now on",
        state.best_checkpoint,
        output_dir,
    )
    state.best_checkpoint = state.best_checkpoint_metric = None


def load_best(model: torch.nn.Module, output_dir: Path, state: LoopState, metric: str) -> str:
    """load_best_model_at_end: the best checkpoint's weights into the live model, as HF's `_load_best_model`
    loads best_model_checkpoint; returns what it did, for the console."""
    if state.best_step is None:
        return "load_best_model_at_end: nothing was evaluated during training; the final weights stay"
    best = f"{metric} {state.best_metric:.4f} at step {state.best_step}"
    if state.best_checkpoint is None:
        return (
            "load_best_model_at_end: the final weights stay: no checkpoint had the best evaluation so far when "
            f"it was saved (the best: {best})"
        )
    path = output_dir / f"checkpoint-{state.best_checkpoint}"
    load_model_tensors(model, load_checkpoint(path).model_tensors)
    done = f"loaded the best checkpoint, {path.name} ({metric} {state.best_checkpoint_metric:.4f})"
    if state.best_checkpoint == state.best_step:
        return done
    return f"{done}; the best evaluation, {best}, fell between checkpoints"


def best_checkpoint(state: LoopState, loaded: bool) -> dict | None:
    """summary.json's `best_checkpoint`: the step and metric of the checkpoint load_best_model_at_end loads,
    and whether it was loaded; None when no checkpoint's own evaluation was the best so far."""
    if state.best_checkpoint is None:
        return None
    return {"step": state.best_checkpoint, "metric": state.best_checkpoint_metric, "loaded": loaded}


def roll_back(
    state: LoopState,
    checkpointer: RunCheckpointer,
    accelerator: Accelerator,
    config_yaml: str,
    console: Console | None,
) -> LoopState:
    """nonfinite_policy: rollback: back to the newest checkpoint, with half the learning rate."""
    latest = find_latest_valid(checkpointer.output_dir).path
    if latest is None:
        raise NonFiniteError(
            f"{state.consecutive_nonfinite} consecutive non-finite steps and no checkpoint to roll back to yet; "
            "set training.save_steps (or a shorter training.save_minutes) so one exists, or lower "
            "training.learning_rate"
        )
    rollbacks = state.rollbacks + 1
    restored, _ = restore(
        latest,
        model=checkpointer.model,
        optimizer=checkpointer.optimizer,
        scheduler=checkpointer.scheduler,
        current_config_yaml=config_yaml,
        scaler=accelerator.scaler,
    )
    factor = 0.5**rollbacks
    # Fix (test_crash_safety.py): a checkpoint saved after an earlier rollback already holds its lower
    # rate; scaling by the whole factor again gave x0.125 at the second rollback instead of x0.25.
    scale_learning_rate(
        checkpointer.optimizer, checkpointer.scheduler, 0.5 ** (rollbacks - restored.rollbacks)
    )
    restored.rollbacks = rollbacks
    restored.skipped_steps = state.skipped_steps
    if console:
        console.print(f"[yellow]rolled back[/] to {latest.name}; learning rate x{factor}")
    return restored
