"""A run, read top to bottom: load config -> resolve -> load model -> build data -> fit -> save.

`prepare` does everything up to the first step and is shared by `tunewise plan` (which stops
there) and `tunewise train`.
"""

from __future__ import annotations

import json
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from rich.console import Console
from transformers import PreTrainedModel, PreTrainedTokenizerBase, set_seed

from tunewise.config.load import dump_config, load_config
from tunewise.config.resolve import (
    Hardware,
    Resolution,
    StepsResolution,
    probe_hardware,
    resolve_static,
    resolve_steps,
)
from tunewise.config.schema import TunewiseConfig
from tunewise.data.build import DataBundle, build_data
from tunewise.data.tokenize import TokenizeSettings
from tunewise.eval.metrics import choose_task_metric, eval_loss, score
from tunewise.infer.generate import SamplingSettings, generate, prompt_messages
from tunewise.models.adapters import LoraSettings, apply_method, count_parameters, quantization_config
from tunewise.models.load import load_model, load_tokenizer, materialize, model_overrides, resolve_source
from tunewise.train.loop import Hooks, LoopSettings, LoopState, fit
from tunewise.train.loss import CausalLMLoss
from tunewise.train.optim import build_optimizer
from tunewise.train.progress import TrainProgress
from tunewise.train.schedule import build_scheduler


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
    notes: list[str] = field(default_factory=list)

    @property
    def config(self) -> TunewiseConfig:
        return self.resolution.config


def prepare_model(cfg: TunewiseConfig) -> tuple[Any, PreTrainedTokenizerBase, Path, dict[str, float]]:
    m, a, q = cfg.model, cfg.adapter, cfg.quantization
    model_dir = materialize(resolve_source(m.model_name_or_path))
    tokenizer = load_tokenizer(model_dir, m.trust_remote_code)
    if tokenizer.pad_token is None:
        # Pads never reach the loss (labels are built from masks, not from pad ids), so reusing
        # EOS as pad cannot mask the EOS the model must learn to emit.
        tokenizer.pad_token = tokenizer.eos_token
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
    model = load_model(
        model_dir,
        dtype=str(m.torch_dtype),
        attn_implementation=m.attn_implementation,
        trust_remote_code=m.trust_remote_code,
        config_overrides=overrides,
        quantization_config=quant,
    )
    set_seed(cfg.training.seed)  # adapter initialisation
    lora = LoraSettings(**{k: getattr(a, k) for k in LoraSettings.__dataclass_fields__})
    model = apply_method(
        model,
        a.method,
        lora,
        quantized=quant is not None,
        gradient_checkpointing=cfg.training.gradient_checkpointing,
    )
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
        data_seed=int(cfg.training.data_seed or cfg.training.seed),
        tokenizer=tokenizer,
        settings=TokenizeSettings(d.max_seq_length, d.truncation_side, d.train_on_inputs, d.chat_template),
        max_eval_samples=cfg.evaluation.max_eval_samples,
    )


def prepare(
    config: str | Path | dict | TunewiseConfig | None,
    overrides: list[str] | tuple[str, ...] = (),
    world_size: int = 1,
) -> Prepared:
    cfg = load_config(config, list(overrides))
    hardware = probe_hardware(world_size)
    res = resolve_static(cfg, hardware)
    model, tokenizer, model_dir, config_overrides = prepare_model(res.config)
    data = prepare_data(res.config, tokenizer)
    steps = resolve_steps(res, len(data.train), world_size)
    trainable, total = count_parameters(model)
    return Prepared(
        res, hardware, model, tokenizer, data, steps, trainable, total, model_dir, config_overrides
    )


# ---------------------------------------------------------------------------------------- training


def sampling(cfg: TunewiseConfig) -> SamplingSettings:
    g = cfg.generation
    return SamplingSettings(
        g.max_new_tokens, g.do_sample, g.temperature, g.top_p, g.top_k, g.repetition_penalty
    )


def evaluate_all(prep: Prepared, loss_module: torch.nn.Module, device: torch.device, with_task: bool) -> dict:
    """eval_loss, eval_perplexity and (with_task) the task metric and the answers given."""
    cfg = prep.config
    if prep.data.validation is None:
        return {}
    pad = int(prep.tokenizer.pad_token_id)
    metrics = eval_loss(
        loss_module, prep.data.validation, cfg.training.per_device_eval_batch_size, pad, device
    )
    rows = prep.data.validation_rows
    if with_task and rows is not None and "messages" in rows.column_names:
        pairs = [prompt_messages(m) for m in rows["messages"]]
        references = [ref for _, ref in pairs]
        metric = choose_task_metric(cfg.evaluation.task_metric, references)
        if metric:
            answers = generate(
                prep.model,
                prep.tokenizer,
                [p for p, _ in pairs],
                sampling(cfg),
                cfg.training.per_device_eval_batch_size,
                cfg.data.chat_template,
            )
            metrics[metric] = score(metric, answers, references)
            metrics["_answers"] = answers
            metrics["_task_metric"] = metric
    return metrics


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


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

    def text(self, name: str, content: str) -> None:
        if self.enabled:
            (self.dir / name).write_text(content)


def loop_settings(prep: Prepared) -> LoopSettings:
    t, d, s = prep.config.training, prep.config.data, prep.steps
    return LoopSettings(
        per_device_batch_size=int(t.per_device_train_batch_size),
        gradient_accumulation_steps=int(t.gradient_accumulation_steps),
        total_steps=s.plan.total_steps,
        steps_per_epoch=s.plan.steps_per_epoch,
        max_steps_overrides=s.plan.max_steps_overrides,
        logging_steps=s.logging_steps,
        eval_steps=s.eval_steps,
        save_steps=s.save_steps,
        max_grad_norm=t.max_grad_norm,
        data_seed=int(t.data_seed if t.data_seed is not None else t.seed),
        pad_token_id=int(prep.tokenizer.pad_token_id),
        packing=d.packing,
        padding=d.padding,
        padding_side=d.padding_side,
        max_seq_length=d.max_seq_length,
        pad_to_multiple_of=d.pad_to_multiple_of,
        group_by_length=d.group_by_length,
        metric_for_best_model=t.metric_for_best_model,
        greater_is_better=bool(t.greater_is_better),
        early_stopping_patience=t.early_stopping_patience,
        early_stopping_threshold=t.early_stopping_threshold,
        nonfinite_patience=t.nonfinite_patience,
    )


def save_final(prep: Prepared, output_dir: Path) -> None:
    """The final adapter in PEFT format (or the full model), with the tokenizer."""
    prep.model.save_pretrained(output_dir)
    prep.tokenizer.save_pretrained(output_dir)


def train(
    config: str | Path | dict | TunewiseConfig | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    console: Console | None = None,
) -> dict:
    """Fine-tune as the config says and return the run summary (also written to summary.json)."""
    from tunewise.report import print_eval, print_plan, print_samples

    console = console or Console()
    state = PartialState()
    prep = prepare(config, overrides, world_size=state.num_processes)
    cfg = prep.config
    t = cfg.training
    mixed = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}[t.precision]
    accelerator = Accelerator(mixed_precision=mixed, cpu=prep.hardware.device_type == "cpu")
    main = accelerator.is_main_process
    output_dir = Path(t.output_dir)
    writer = RunWriter(output_dir, main)
    writer.text("config.yaml", dump_config(cfg))

    optimizer, optim_notes = build_optimizer(
        prep.model,
        t.optim,
        float(t.learning_rate),
        t.weight_decay,
        t.adam_beta1,
        t.adam_beta2,
        t.adam_epsilon,
        prep.hardware.device_type,
    )
    prep.notes += optim_notes
    scheduler = build_scheduler(
        optimizer,
        t.lr_scheduler_type,
        prep.steps.warmup_steps,
        prep.steps.plan.total_steps,
        t.lr_scheduler_kwargs,
    )
    loss_module, optimizer = accelerator.prepare(CausalLMLoss(prep.model), optimizer)
    if main:
        print_plan(console, prep)

    before = evaluate_all(prep, loss_module, accelerator.device, with_task=True)
    if main:
        print_eval(console, "before training", before)
        writer.metrics({"step": 0, **_public(before)})

    def on_eval(step: int) -> dict:
        metrics = evaluate_all(prep, loss_module, accelerator.device, with_task=False)
        writer.metrics({"step": step, **_public(metrics)})
        return metrics

    hooks = Hooks(evaluate=on_eval if prep.data.validation is not None else None, log=writer.metrics)
    started = time.perf_counter()
    with TrainProgress(prep.steps.plan.total_steps, console) if main else _null() as progress:
        state_ = fit(
            accelerator,
            loss_module,
            optimizer,
            scheduler,
            prep.data.train,
            loop_settings(prep),
            LoopState(),
            hooks,
            progress,
        )
    train_seconds = time.perf_counter() - started
    after = evaluate_all(prep, loss_module, accelerator.device, with_task=True)
    summary = {
        "eval_before": _public(before),
        "eval_after": _public(after),
        "task_metric": after.get("_task_metric"),
        "train_seconds": round(train_seconds, 2),
        "peak_memory_bytes": peak_memory_bytes(accelerator.device),
        "output_dir": str(output_dir.resolve()),
        "total_steps": state_.step,
        "tokens": state_.tokens,
        "best_step": state_.best_step,
        "best_metric": state_.best_metric,
        "stop_reason": state_.stop_reason,
        "samples": _samples(prep, before, after, cfg.evaluation.num_sample_prompts),
    }
    if main:
        writer.metrics({"step": state_.step, **_public(after)})
        save_final(prep, output_dir)
        writer.text("summary.json", json.dumps(summary, indent=2))
        print_eval(console, "after training", after)
        print_samples(console, summary["samples"])
        console.print(f"\n[bold green]Run written to[/] {output_dir.resolve()}")
    return summary


def _public(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not k.startswith("_")}


def _samples(prep: Prepared, before: dict, after: dict, n: int) -> list[dict]:
    rows = prep.data.validation_rows
    if not n or rows is None or "_answers" not in after or "messages" not in rows.column_names:
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


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *args: object) -> None:
        return None
