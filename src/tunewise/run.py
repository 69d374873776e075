"""A run, read top to bottom: load config -> resolve -> load model -> build data -> fit -> save.

`prepare` does everything up to the first step and is shared by `tunewise plan` (which stops
there) and `tunewise train`.
"""

from __future__ import annotations

import copy
import json
import os
import shlex
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils.memory import clear_device_cache
from rich.console import Console
from rich.markup import escape
from transformers import PreTrainedTokenizerBase, set_seed

from tunewise.card import model_card
from tunewise.config.load import dump_config, load_config
from tunewise.config.problems import ConfigError, Problem
from tunewise.config.resolve import (
    Hardware,
    Resolution,
    StepsResolution,
    cadence_problems,
    probe_hardware,
    resolve_static,
    resolve_steps,
    resolve_task_metric,
)
from tunewise.config.rules import LOWER_IS_BETTER
from tunewise.config.schema import TunewiseConfig
from tunewise.data.build import DataBundle, build_data
from tunewise.data.tokenize import TokenizeSettings, resolve_chat_template
from tunewise.eval.metrics import eval_loss, generate_answers, score
from tunewise.infer.generate import SamplingSettings, prompt_messages, stop_at_end_of_turn
from tunewise.models.adapters import (
    LoraSettings,
    apply_method,
    check_method_support,
    count_parameters,
    quantization_config,
)
from tunewise.models.fast import (
    CPU_ACTIVATION_MEMORY_BUDGET,
    VARLEN_SDPA,
    compile_layers,
    compile_problem,
    use_fast_lora_dropout,
)
from tunewise.models.kernels import bf16_kernel_runs, cpu_attention_ops, cpu_has_bf16_matmuls
from tunewise.models.load import (
    load_model,
    load_tokenizer,
    materialize,
    model_overrides,
    pad_with_eos,
    resolve_source,
)
from tunewise.models.merge import open_with_system_prompt
from tunewise.training.host_memory import set_host_memory
from tunewise.training.loop import Hooks, LoopSettings, LoopState, fit
from tunewise.training.loss import CausalLMLoss, packing_problem
from tunewise.training.memory import (
    TrainingOutOfMemory,
    catch_out_of_memory,
    out_of_memory_advice,
    peak_memory_bytes,
)
from tunewise.training.optim import OptimizerChoice, build_optimizer, choose_optimizer
from tunewise.training.progress import EvalBars, TrainProgress
from tunewise.training.resume import (
    GracefulStop,
    RunCheckpointer,
    best_checkpoint,
    find_resume_checkpoint,
    forget_missing_best,
    load_best,
    restore,
    roll_back,
    set_aside_earlier_run,
)
from tunewise.training.schedule import build_scheduler


@dataclass
class Prepared:
    resolution: Resolution
    hardware: Hardware
    model: Any  # PreTrainedModel or PeftModel
    tokenizer: PreTrainedTokenizerBase
    data: DataBundle
    steps: StepsResolution
    trainable_parameters: int
    total_parameters: int
    model_dir: Path
    config_overrides: dict[str, float]
    user_config: TunewiseConfig  # as the user wrote it, before resolution
    optimizer: OptimizerChoice  # what build_optimizer builds for training.optim here
    pretrained_dtype: str | None = None
    notes: list[str] = field(default_factory=list)
    world_size_reason: str = ""  # why hardware.world_size processes: the launcher's, or `plan --processes`
    task_metric: str | None = None
    """What every evaluation with the task metric computes (resolve_task_metric); None: none."""

    @property
    def config(self) -> TunewiseConfig:
        return self.resolution.config


def prepare_model(cfg: TunewiseConfig) -> tuple[Any, PreTrainedTokenizerBase, Path, dict[str, float]]:
    m, a, q = cfg.model, cfg.adapter, cfg.quantization
    device_type = probe_hardware().device_type
    problems = check_method_support(
        a.method,
        bool(q.load_in_4bit),
        q.load_in_8bit,
        a.use_dora,
        device_type,
        a.init_lora_weights,
        q.bnb_4bit_quant_type,
        str(q.bnb_4bit_compute_dtype),
        q.bnb_4bit_use_double_quant,
    )
    if problems:  # before any weights are read or converted
        raise ConfigError([Problem(p.key, p.message) for p in problems])
    if cfg.training.torch_compile and (why := compile_problem(device_type)):
        raise ConfigError([Problem("training.torch_compile", why)])
    model_dir = materialize(resolve_source(m.model_name_or_path))
    tokenizer = load_tokenizer(model_dir, m.trust_remote_code)
    pad_with_eos(tokenizer)
    from transformers import AutoConfig

    overrides = model_overrides(
        AutoConfig.from_pretrained(model_dir, trust_remote_code=m.trust_remote_code),
        m.dropout,
        m.attention_dropout,
    )
    quant = quantization_config(
        bool(q.load_in_4bit),
        q.load_in_8bit,
        q.bnb_4bit_quant_type,
        q.bnb_4bit_use_double_quant,
        str(q.bnb_4bit_compute_dtype),
    )
    model: Any = load_model(
        model_dir,
        dtype=str(m.torch_dtype),
        attn_implementation=m.attn_implementation,
        trust_remote_code=m.trust_remote_code,
        config_overrides=overrides,
        quantization_config=quant,
    )
    if cfg.data.packing and m.attn_implementation == "sdpa":
        model.set_attn_implementation(VARLEN_SDPA)  # packed rows: attention within each example only
        if device_type == "cpu":  # built here, once per machine (~15 s), not inside the first step
            cpu_attention_ops()
            if cfg.training.precision == "bf16" and cpu_has_bf16_matmuls():
                bf16_kernel_runs()  # and tried in bf16, so a fallback is announced before training
    set_seed(cfg.training.seed)  # adapter initialisation
    lora = LoraSettings(**{k: getattr(a, k) for k in LoraSettings.__dataclass_fields__})
    model = apply_method(
        model,
        a.method,
        lora,
        quantized=quant is not None,
        gradient_checkpointing=cfg.training.gradient_checkpointing,
    )
    use_fast_lora_dropout(model)
    if cfg.data.packing and (why := packing_problem(model)):  # before compile_layers: nothing compiles for it
        raise ConfigError([Problem("data.packing", why)])
    if cfg.training.torch_compile:
        compile_layers(model, CPU_ACTIVATION_MEMORY_BUDGET if device_type == "cpu" else None)
    return model, tokenizer, model_dir, overrides


def prepare_data(cfg: TunewiseConfig, tokenizer: PreTrainedTokenizerBase) -> DataBundle:
    d = cfg.data
    return build_data(
        dataset=d.dataset,
        validation_file=d.validation_file,
        validation_split=d.validation_split,
        format=d.format,
        bad_rows=d.bad_rows,
        system_prompt=d.system_prompt,
        data_seed=int(cfg.training.data_seed),  # type: ignore[arg-type]  # resolve_static fills it
        tokenizer=tokenizer,
        settings=TokenizeSettings(d.max_seq_length, d.truncation_side, d.train_on_inputs, d.chat_template),
        max_eval_samples=cfg.evaluation.max_eval_samples,
    )


def prepare(
    config: str | Path | dict | TunewiseConfig | None,
    overrides: list[str] | tuple[str, ...] = (),
    world_size: int = 1,
    world_size_reason: str = "",
) -> Prepared:
    cfg = load_config(config, list(overrides))
    hardware = probe_hardware(world_size)
    res = resolve_static(cfg, hardware, Path(config) if isinstance(config, str | Path) else None)
    if problem := output_dir_problem(Path(res.config.training.output_dir)):
        raise ConfigError([Problem("training.output_dir", problem)])
    optimizer = choose_optimizer(res.config.training.optim, hardware.device_type)
    record_optimizer(res, optimizer)
    model, tokenizer, model_dir, config_overrides = prepare_model(res.config)
    data = prepare_data(res.config, tokenizer)
    if res.config.data.chat_template is not None:  # refused for plain text (data/load.py)
        # The run directory's tokenizer (and so a merge of it, vLLM, apply_chat_template) renders
        # conversations as training did, not with the template the model came with.
        tokenizer.chat_template = resolve_chat_template(tokenizer, res.config.data.chat_template)
    steps = resolve_steps(res, len(data.train), world_size)
    task_metric, problems = None, cadence_problems(res.config, steps)
    if data.validation_rows is not None:  # without validation rows nothing is evaluated (a lint says so)
        pairs = validation_prompts(data.validation_rows)
        task_metric, found = resolve_task_metric(res, None if pairs is None else [ref for _, ref in pairs])
        problems += found
    if problems:
        raise ConfigError(problems)
    trainable, total = count_parameters(model)
    pretrained = json.loads((model_dir / "config.json").read_text()).get("torch_dtype")
    return Prepared(
        res,
        hardware,
        model,
        tokenizer,
        data,
        steps,
        trainable,
        total,
        model_dir,
        config_overrides,
        cfg,
        optimizer,
        pretrained,
        world_size_reason=world_size_reason,
        task_metric=task_metric,
    )


def record_optimizer(res: Resolution, choice: OptimizerChoice) -> None:
    """training.optim as the plan shows it: the optimizer train builds (`auto` where it is not the one named:
    a fallback), and why."""
    named = res.config.training.optim
    source = "auto" if choice.label != named else "user" if "training.optim" in res.user else "default"
    res.record("training.optim", choice.label, source, "; ".join(choice.notes))


def validation_prompts(rows: Any) -> list[tuple[list[dict], str]] | None:
    """Each validation conversation's prompt and reference answer; None for plain text, which has neither."""
    if "messages" not in rows.column_names:
        return None
    return [prompt_messages(m) for m in rows["messages"]]


def output_dir_problem(path: Path) -> str | None:
    """Why a run could not write its directory, found without creating anything, so it shows before the model
    and data load (and in `plan`).

    Fix (test_run_contract.py): a file there, or a parent that is one, failed at the first write, after loading."""
    for at in (path, *path.parents):
        if not at.exists():
            continue
        if not at.is_dir():
            where = "is a file" if at == path else f"is under {at}, a file"
            return f"{path} {where}: give a directory (it is created if missing)"
        if not os.access(at, os.W_OK | os.X_OK):
            return f"{at} is not writable, so {path} cannot be written: give a directory you can write"
        return None
    return None


# ---------------------------------------------------------------------------------------- training


def sampling(cfg: TunewiseConfig) -> SamplingSettings:
    g = cfg.generation
    return SamplingSettings(
        g.max_new_tokens, g.do_sample, g.temperature, g.top_p, g.top_k, g.repetition_penalty
    )


# Compiled layers (training.torch_compile) serve training; evaluation and generation run them eagerly, which
# spares a compile per new shape (each decoding step with a KV cache is one) for a few passes.
@torch.compiler.set_stance("force_eager")
def evaluate_all(
    prep: Prepared,
    loss_module: torch.nn.Module,
    device: torch.device,
    with_task: bool,
    bars: EvalBars | None = None,
) -> dict:
    """eval_loss, eval_perplexity and (with_task) the task metric and the answers given, or without a task metric
    the answers to the sample prompts alone; `bars` shows each."""
    cfg = prep.config
    if prep.data.validation is None:
        return {}
    pad = int(prep.tokenizer.pad_token_id)
    batch_size = cfg.training.per_device_eval_batch_size
    with bars.phase("eval loss", "batches") if bars else nullcontext(None) as report:
        metrics = eval_loss(loss_module, prep.data.validation, batch_size, pad, device, report)
    rows, metric = prep.data.validation_rows, prep.task_metric
    pairs = validation_prompts(rows) if with_task and rows is not None else None
    # Fix (test_run_contract.py): the sample answers came only from the task metric's, so `task_metric: none`
    # showed no samples; they are generation alone, so without a metric just the samples' prompts are answered.
    if pairs and not metric:
        pairs = pairs[: cfg.evaluation.num_sample_prompts]
    if pairs:
        what = f"prompts for {metric}" if metric else "sample prompts"
        with bars.phase("answers", what) if bars else nullcontext(None) as report:
            prompts = [p for p, _ in pairs]
            settings, template = sampling(cfg), cfg.data.chat_template
            answers = generate_answers(
                prep.model, prep.tokenizer, prompts, settings, batch_size, template, report
            )
        metrics["_answers"] = answers
        if metric:
            metrics[metric] = score(metric, answers, [ref for _, ref in pairs])
            metrics["_task_metric"] = metric
    return metrics


class RunWriter:
    """Writes the run directory (only on the main process)."""

    def __init__(self, output_dir: Path, enabled: bool) -> None:
        self.dir, self.enabled = output_dir, enabled
        if enabled:
            output_dir.mkdir(parents=True, exist_ok=True)

    def metrics(self, row: dict) -> None:
        if self.enabled:
            with open(self.dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

    def truncate_metrics(self, after_step: int, keep_skipped: bool = False) -> None:
        """Drop rows a crashed run logged after the checkpoint we resume from (with `keep_skipped`, a
        rollback's: its skipped-step rows stay, as the record of which examples gave non-finite values)."""
        path = self.dir / "metrics.jsonl"
        if self.enabled and path.is_file():
            rows = [line for line in path.read_text().splitlines() if _kept(line, after_step, keep_skipped)]
            # Fix (test_crash_safety.py): write_text truncated first, so a kill -9 here lost every row;
            # write a copy and rename it over the old file instead.
            partial = path.with_name("metrics.jsonl.tmp")
            partial.write_text("".join(row + "\n" for row in rows))
            os.replace(partial, path)

    def text(self, name: str, content: str) -> None:
        if self.enabled:
            (self.dir / name).write_text(content)


def _kept(line: str, after_step: int, keep_skipped: bool) -> bool:
    try:
        row = json.loads(line)
    except ValueError:  # fix (test_crash_safety.py): a line torn by kill -9 made every resume crash here
        return False
    # The evaluation after training is redone by whatever resumes (it trains on, or only evaluates and writes).
    # Fix (test_crash_safety.py): kept, each evaluate-only resume added another row for the same step.
    if row.get("after_training"):
        return False
    return row.get("step", 0) <= after_step or (keep_skipped and bool(row.get("skipped")))


def loop_settings(prep: Prepared) -> LoopSettings:
    t, d, s = prep.config.training, prep.config.data, prep.steps
    return LoopSettings(
        per_device_batch_size=int(t.per_device_train_batch_size),
        gradient_accumulation_steps=int(t.gradient_accumulation_steps),
        total_steps=s.plan.total_steps,
        batches_per_epoch=s.plan.batches_per_epoch,
        max_steps_overrides=s.plan.max_steps_overrides,
        logging_steps=s.logging_steps,
        eval_steps=s.eval_steps,
        save_steps=s.save_steps,
        max_grad_norm=t.max_grad_norm,
        data_seed=int(t.data_seed),  # type: ignore[arg-type]  # resolved, never None here
        pad_token_id=int(prep.tokenizer.pad_token_id),
        packing=d.packing,
        padding=d.padding,
        padding_side=d.padding_side,
        max_seq_length=d.max_seq_length,
        pad_to_multiple_of=d.pad_to_multiple_of,
        group_by_length=d.group_by_length,
        max_tokens_per_micro_batch=t.max_tokens_per_micro_batch,
        metric_for_best_model=t.metric_for_best_model,
        greater_is_better=bool(t.greater_is_better),
        early_stopping_patience=t.early_stopping_patience,
        early_stopping_threshold=t.early_stopping_threshold,
        nonfinite_patience=t.nonfinite_patience,
        memory_check=t.memory_check is True,
        save_seconds=None if t.save_minutes is None else 60 * t.save_minutes,
    )


def save_final(prep: Prepared, output_dir: Path) -> None:
    """The final adapter in PEFT format, with the tokenizer; or the full model, a model as a merge writes it: its
    generation config stopping at the chat template's end of turn, its chat template opening a conversation
    without a system message with the run's data.system_prompt, as training did."""
    tokenizer = prep.tokenizer
    if prep.config.adapter.method == "full":
        stop_at_end_of_turn(prep.model, tokenizer)
        if system_prompt := prep.config.data.system_prompt:
            # Fix (test_run_contract.py): a full fine-tune's directory is the model vLLM or apply_chat_template
            # serve, and they prompted it without the system prompt every training row began with.
            tokenizer = copy.deepcopy(tokenizer)  # the run's own renders rows as before
            open_with_system_prompt(tokenizer, system_prompt)  # the model card says so
    prep.model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)


def build_optimization(prep: Prepared) -> tuple[torch.optim.Optimizer, Any]:
    t = prep.config.training
    # Its notes are choose_optimizer's, which prepare recorded as training.optim's reason for the plan.
    optimizer, _ = build_optimizer(
        prep.model,
        t.optim,
        float(t.learning_rate),
        t.weight_decay,
        t.adam_beta1,
        t.adam_beta2,
        t.adam_epsilon,
        prep.hardware.device_type,
    )
    scheduler = build_scheduler(
        optimizer,
        t.lr_scheduler_type,
        prep.steps.warmup_steps,
        prep.steps.plan.total_steps,
        t.lr_scheduler_kwargs,
    )
    return optimizer, scheduler


def train(
    config: str | Path | dict | TunewiseConfig | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    console: Console | None = None,
    resume: str | bool = False,
    force_resume: bool = False,
) -> dict:
    """Fine-tune as the config says and return the run summary (also written to summary.json).

    `resume=True` continues from the newest valid checkpoint in output_dir, `resume=PATH` from that one.
    """
    from tunewise.report import print_eval, print_plan, print_samples

    console = console or Console()
    # A fresh process state per run (as HF's TrainingArguments does), so a second train() in one process may
    # use another precision; cpu=True makes accelerate honour torchrun's environment on a GPU-less machine.
    AcceleratorState._reset_state(reset_partial_state=True)
    cpu = probe_hardware().device_type == "cpu"
    host_notes = set_host_memory() if cpu else []  # before the model loads (training/host_memory.py)
    processes = PartialState(cpu=cpu).num_processes
    why = "accelerate's count, from the launcher" if processes > 1 else "not started by a launcher"
    prep = prepare(config, overrides, world_size=processes, world_size_reason=why)
    prep.notes.extend(host_notes)
    cfg, t = prep.config, prep.config.training
    mixed = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}[t.precision]
    accelerator = Accelerator(mixed_precision=mixed, cpu=cpu)
    main = accelerator.is_main_process
    evals: dict[int, dict] = {}
    output_dir = Path(t.output_dir)
    if main and not resume and (earlier := set_aside_earlier_run(output_dir)):
        prep.notes.append(f"{output_dir} held an earlier run: its files were moved to {earlier}")
    accelerator.wait_for_everyone()
    try:
        writer = RunWriter(output_dir, main)
    except OSError as error:  # what output_dir_problem cannot foresee: a read-only or special file system
        raise ConfigError([Problem("training.output_dir", f"cannot create {output_dir}: {error}")]) from None
    config_yaml = dump_config(cfg)

    optimizer, scheduler = build_optimization(prep)
    loss_module, optimizer = accelerator.prepare(CausalLMLoss(prep.model), optimizer)
    checkpointer = RunCheckpointer(
        output_dir, prep.model, optimizer, scheduler, config_yaml, t.save_total_limit, accelerator.scaler
    )
    state = LoopState()
    if resume:
        path = find_resume_checkpoint(output_dir, resume)
        state, ck = restore(
            path,
            model=prep.model,
            optimizer=optimizer,
            scheduler=scheduler,
            current_config_yaml=config_yaml,
            force=force_resume,
            scaler=accelerator.scaler,
        )
        before = ck.trainer_state.get("eval_before", {})
        forget_missing_best(state, output_dir)
        writer.truncate_metrics(after_step=state.step)
        if main:
            console.print(
                f"[bold]resuming[/] from {escape(str(path))} (step {state.step}, epoch {state.epoch})"
            )
            if state.stop_reason == "early_stopping":  # kept by restore: see still_early_stopped
                console.print(
                    f"the run stopped early at step {state.step} ({state.evals_without_improvement} "
                    f"evaluations without improvement, early_stopping_patience {t.early_stopping_patience}): "
                    "evaluating and writing it without training again; to train on, resume with a larger "
                    "training.early_stopping_patience, or null for none"
                )
    writer.text("config.yaml", config_yaml)
    if main:
        print_plan(console, prep, measure=False)  # no extra forward in the run's own memory (plan_summary)
    if not resume:
        before = evaluate_all(
            prep, loss_module, accelerator.device, True, EvalBars(console) if main else None
        )
        writer.metrics({"step": 0, **_public(before)})
    if main:
        print_eval(console, "before training", before)
    checkpointer.extra_state = {
        "eval_before": _public(before) | {k: v for k, v in before.items() if k == "_answers"}
    }

    def on_eval(step: int) -> dict:
        # Task metrics cost generation: only when they pick the best model, or at the last step, whose
        # evaluation then serves as the final one.
        with_task = t.metric_for_best_model not in LOWER_IS_BETTER or step == prep.steps.plan.total_steps
        bars = progress.eval_bars() if progress else None
        evals[step] = evaluate_all(prep, loss_module, accelerator.device, with_task, bars)
        writer.metrics({"step": step, **_public(evals[step])})
        return evals[step]

    def on_save(s: LoopState) -> None:
        if main:
            checkpointer.save(s)
        accelerator.wait_for_everyone()

    def on_rollback(s: LoopState) -> LoopState:
        restored = roll_back(s, checkpointer, accelerator, config_yaml, console if main else None)
        # Fix (test_crash_safety.py): steps trained after the checkpoint are trained again; their first
        # rows stayed, so metrics.jsonl held two rows for one step.
        writer.truncate_metrics(after_step=restored.step, keep_skipped=True)
        return restored

    started = time.perf_counter()
    with (
        GracefulStop() as stop,
        TrainProgress(prep.steps.plan.total_steps, console, state.step)
        if main
        else nullcontext() as progress,
    ):
        hooks = Hooks(
            evaluate=on_eval if prep.data.validation is not None else None,
            save=on_save,
            log=writer.metrics,
            should_stop=lambda: stop.requested,
            rollback=on_rollback if t.nonfinite_policy == "rollback" else None,
        )
        try:
            state = fit(
                accelerator,
                loss_module,
                optimizer,
                scheduler,
                prep.data.train,
                loop_settings(prep),
                state,
                hooks,
                progress,
            )
        except TrainingOutOfMemory as error:
            advise(error, cfg, config, overrides)
            raise
    train_seconds = time.perf_counter() - started
    summary = {
        "eval_before": _public(before),
        "train_seconds": round(train_seconds, 2),
        "peak_memory_bytes": peak_memory_bytes(accelerator.device),
        "output_dir": str(output_dir.resolve()),
        "total_steps": state.step,
        "tokens": state.tokens,
        "best_step": state.best_step,
        "best_metric": state.best_metric,
        "best_checkpoint": best_checkpoint(state, loaded=False),
        "stop_reason": state.stop_reason,
        "skipped_steps": state.skipped_steps,
        "memory_check": state.memory_check,
    }
    if state.stop_reason == "interrupted":
        if main:
            writer.text("summary.json", json.dumps(summary, indent=2))
            print_resume_command(console, state.step, config, overrides)
        return summary
    after = evals.get(state.step)
    if t.load_best_model_at_end:
        done = load_best(prep.model, output_dir, state, t.metric_for_best_model)
        if state.best_checkpoint is not None:
            after = None  # evaluated afresh: the weights are the checkpoint's
            summary["best_checkpoint"] = best_checkpoint(state, loaded=True)
        if main:
            console.print(done)
    if after is None or "_answers" not in after:
        bars = EvalBars(console) if main else None
        after = final_evaluation(prep, loss_module, accelerator, state.step, config, overrides, bars)
        writer.metrics({"step": state.step, **_public(after), "after_training": True})
    samples = _samples(prep, before, after, cfg.evaluation.num_sample_prompts)
    summary |= {"eval_after": _public(after), "task_metric": after.get("_task_metric"), "samples": samples}
    if main:
        save_final(prep, output_dir)
        writer.text("README.md", model_card(prep, summary, output_dir))  # in place of PEFT's empty template
        writer.text("summary.json", json.dumps(summary, indent=2))
        print_eval(console, "after training", after)
        print_samples(console, samples)
        console.print(f"\n[bold green]Run written to[/] {escape(str(output_dir.resolve()))}")
    return summary


def final_evaluation(
    prep: Prepared,
    loss_module: torch.nn.Module,
    accelerator: Accelerator,
    step: int,
    config: object,
    overrides: list[str] | tuple[str, ...],
    bars: EvalBars | None = None,
) -> dict:
    """The evaluation after training. Should it run out of memory, the run's last step is already saved (every
    run saves when it stops): the error says so, with a smaller evaluation batch to resume with, which
    evaluates and writes the run without training again."""
    after, failure = catch_out_of_memory(
        lambda: evaluate_all(prep, loss_module, accelerator.device, True, bars)
    )
    if failure is None:
        return after  # type: ignore[return-value]  # a dict whenever nothing failed
    clear_device_cache(garbage_collection=True)
    where = f"the evaluation after training (step {step})"
    stopped = TrainingOutOfMemory(failure, where, 0, step, str(accelerator.device))
    advise(stopped, prep.config, config, overrides)
    raise stopped


def advise(
    error: TrainingOutOfMemory, cfg: TunewiseConfig, config: object, overrides: list[str] | tuple[str, ...]
) -> None:
    """Fill in the fixes for this config and the command that resumes with the first one a resume accepts."""
    error.advice, sets = out_of_memory_advice(cfg, error.tokens, evaluation=error.in_evaluation)
    error.resume_command = resume_command(config, [*overrides, *sets]) if sets else None


def resume_command(config: object, overrides: list[str] | tuple[str, ...]) -> str:
    """The shell command that resumes this run; the --set overrides are part of the config the checkpoint
    was made with."""
    where = shlex.quote(str(config)) if isinstance(config, (str, Path)) else "CONFIG"
    sets = "".join(f" --set {shlex.quote(o)}" for o in overrides)
    return f"tunewise train {where}{sets} --resume"


def print_resume_command(
    console: Console, step: int, config: object, overrides: list[str] | tuple[str, ...]
) -> None:
    # Escaped for Rich markup ("[" in paths), and never wrapped, so it pastes back as one command.
    console.print(
        f"[bold yellow]stopped[/] at step {step}; checkpoint saved. Resume with:\n  "
        + escape(resume_command(config, overrides)),
        soft_wrap=True,
    )


def _public(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not k.startswith("_")}


@torch.compiler.set_stance("force_eager")
def _samples(prep: Prepared, before: dict, after: dict, n: int) -> list[dict]:
    rows = prep.data.validation_rows
    if not n or rows is None or "messages" not in rows.column_names:
        return []
    if "_answers" not in before or "_answers" not in after:  # a resume of a checkpoint saved without them
        return []
    out = []
    for i, messages in enumerate(rows.select(range(min(n, len(rows))))["messages"]):
        prompt, reference = prompt_messages(messages)
        out.append(
            {
                "prompt": prompt[-1]["content"],
                "reference": reference,
                "before": before["_answers"][i],
                "after": after["_answers"][i],
            }
        )
    return out
