"""What a run prints: the plan, evaluations and before/after samples."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from tunewise.run import Prepared
    from tunewise.training.loop import LargestMicroBatch

PLAN_KEYS = [
    "training.output_dir",
    "training.precision",
    "training.learning_rate",
    "training.lr_scheduler_type",
    "training.warmup_steps",
    "training.per_device_train_batch_size",
    "training.gradient_accumulation_steps",
    "training.max_tokens_per_micro_batch",
    "training.memory_check",
    "training.total_steps",
    "training.optim",
    "training.weight_decay",
    "training.max_grad_norm",
    "training.logging_steps",
    "training.eval_steps",
    "training.save_steps",
    "training.save_minutes",
    "model.torch_dtype",
    "quantization.load_in_4bit",
    "quantization.bnb_4bit_compute_dtype",
    "data.max_seq_length",
    "data.packing",
    "data.pad_to_multiple_of",
    "evaluation.task_metric",
    "training.seed",
]


def plan_lints(
    prep: Prepared, memory: tuple[int, int | None, str | None] | None = None, token_budget: int | None = None
) -> list[dict]:
    """Config warnings/infos and plan lints, as {severity, key, message, fix}; `memory`: the run's estimated
    bytes, the device's, and the error if the largest micro-batch's forward ran out (`activation_memory`);
    `token_budget`: a max_tokens_per_micro_batch that fits (`fitting_token_budget`)."""
    from tunewise.config.lints import PlanFacts, lint
    from tunewise.config.rules import check_config

    cfg, t, steps = prep.config, prep.config.training, prep.steps
    pretrained = getattr(getattr(prep.model, "config", None), "dtype", None)
    facts = PlanFacts(
        method=cfg.adapter.method,
        learning_rate=float(t.learning_rate),
        total_steps=steps.plan.total_steps,
        warmup_steps=steps.warmup_steps,
        logging_steps=steps.logging_steps,
        eval_steps=steps.eval_steps,
        save_steps=steps.save_steps,
        save_minutes=t.save_minutes,
        per_device_train_batch_size=int(t.per_device_train_batch_size),
        gradient_accumulation_steps=int(t.gradient_accumulation_steps),
        max_seq_length=cfg.data.max_seq_length,
        device_type=prep.hardware.device_type,
        precision=t.precision,
        model_pretrained_dtype=prep.pretrained_dtype
        or (str(pretrained).removeprefix("torch.") if pretrained else None),
        r=cfg.adapter.r,
        lora_alpha=cfg.adapter.lora_alpha,
        use_rslora=cfg.adapter.use_rslora,
        has_validation=prep.data.validation is not None,
        pad_to_multiple_of=cfg.data.pad_to_multiple_of,
        packing=cfg.data.packing,
        padding_waste_percent=_padding_waste(prep),
        cpu_native_bf16=prep.hardware.bf16_supported,
        estimated_memory_bytes=memory[0] if memory else None,
        device_memory_bytes=memory[1] if memory else None,
        forward_out_of_memory=memory[2] if memory else None,
        gradient_checkpointing=cfg.training.gradient_checkpointing,
        fitting_token_budget=token_budget,
    )
    out = [
        {"severity": p.severity, "key": p.path, "message": p.message, "fix": ""}
        for p in check_config(prep.user_config)
        if p.severity != "error"
    ]
    return out + [
        {"severity": x.severity, "key": x.key, "message": x.message, "fix": x.fix} for x in lint(facts)
    ]


def _padding_waste(prep: Prepared) -> float:
    """Padding % of the first epoch's batches, unpacked, as `data inspect` computes it for this config."""
    from tunewise.data.inspect import padding_waste

    d, t = prep.config.data, prep.config.training
    waste = padding_waste(
        list(prep.data.train["length"]),
        int(t.per_device_train_batch_size),
        seed=t.data_seed if t.data_seed is not None else t.seed,
        accumulation=int(t.gradient_accumulation_steps),
        pad_to_length=d.max_seq_length if d.padding == "max_length" else None,
        pad_to_multiple_of=d.pad_to_multiple_of,
    )
    return float(waste["length_grouped" if d.group_by_length else "random"]["waste_percent"])


def plan_summary(prep: Prepared, measure: bool = True) -> dict:
    """The plan as plain data: `tunewise plan --json` prints this, the console view renders it.

    `measure`: run the largest micro-batch's forward to count its activations (`activation_memory`). The plan
    `tunewise train` prints does not: an eager forward there would add its memory to the run's own peak (more
    than a compiled step keeps), where `training.memory_check` tries the real step instead."""
    cfg, plan, data = prep.config, prep.steps.plan, prep.data
    lengths = list(data.train["length"])
    tokens = sum(lengths)
    effective = plan.effective_batch_size
    largest = largest_micro_batch(prep)
    by_method = memory_by_method(prep)
    activations = activation_memory(
        prep, largest if measure else None, by_method[cfg.adapter.method]["total_bytes"]
    )
    memory = (activations["run_bytes"], activations["device_memory_bytes"], activations["out_of_memory"])
    budget = fitting_token_budget(prep, by_method[cfg.adapter.method]["total_bytes"], activations)
    return {
        "model": cfg.model.model_name_or_path,
        "model_dir": str(prep.model_dir),
        "output_dir": cfg.training.output_dir,
        "method": cfg.adapter.method,
        "device": prep.hardware.device_type,
        "world_size": prep.hardware.world_size,  # the processes steps and auto batch keys were resolved for
        "world_size_reason": prep.world_size_reason,
        "format": data.format,
        "train_rows": len(data.train),
        "validation_rows": 0 if data.validation is None else len(data.validation),
        "dropped_no_targets": data.train_report.dropped_no_targets,
        "truncated": data.train_report.truncated,
        "validation_truncated": 0 if data.validation_report is None else data.validation_report.truncated,
        "validation_dropped_no_targets": (
            0 if data.validation_report is None else data.validation_report.dropped_no_targets
        ),
        "skipped_rows": data.load_report.skipped,
        "train_tokens": tokens,
        "mean_tokens_per_example": round(tokens / max(len(lengths), 1), 1),
        "steps_per_epoch": plan.steps_per_epoch,
        "num_epochs": plan.num_epochs,
        "max_steps_overrides": plan.max_steps_overrides,
        "num_train_epochs": cfg.training.num_train_epochs,
        "total_steps": plan.total_steps,
        "warmup_steps": prep.steps.warmup_steps,
        "effective_batch_size": effective,
        "effective_batch_tokens": round(effective * tokens / max(len(lengths), 1)),
        "largest_micro_batch_tokens": largest.tokens if largest is not None else 0,
        "trainable_parameters": prep.trainable_parameters,
        "total_parameters": prep.total_parameters,
        "trainable_percent": round(100 * prep.trainable_parameters / max(prep.total_parameters, 1), 3),
        "precision": cfg.training.precision,
        "learning_rate": cfg.training.learning_rate,
        "model_config_overrides": prep.config_overrides,
        "choices": {
            k: {"value": c.value, "source": c.source, "reason": c.reason}
            for k, c in prep.resolution.choices.items()
        },
        "notes": prep.resolution.notes + prep.notes,
        "lints": plan_lints(prep, memory, budget),
        "memory_by_method": by_method,
        "activations": activations,
    }


def largest_micro_batch(prep: Prepared) -> LargestMicroBatch | None:
    """The run's largest micro-batch on rank 0 (its tokens, padding included), cut as the loop cuts it:
    activation memory follows it (and `training.memory_check` runs it after the first step)."""
    from tunewise.run import loop_settings
    from tunewise.training.loop import LoopState
    from tunewise.training.loop import largest_micro_batch as find

    settings, lengths = loop_settings(prep), list(prep.data.train["length"])
    return find(settings, lengths, LoopState(), 0, prep.hardware.world_size)


def activation_memory(prep: Prepared, largest: LargestMicroBatch | None, static_bytes: int) -> dict:
    """What the largest micro-batch keeps for its backward (models/activations.py: measured eagerly on that very
    micro-batch), the run's total with weights, gradients and optimizer state, and the device's memory."""
    import psutil
    import torch
    from accelerate.utils.memory import clear_device_cache

    from tunewise.models.activations import saved_for_backward
    from tunewise.run import loop_settings
    from tunewise.training.loop import collate_micro_batch, make_collate
    from tunewise.training.loss import CausalLMLoss
    from tunewise.training.memory import catch_out_of_memory

    device, problem = next(prep.model.parameters()).device, None
    if largest is not None and prep.hardware.device_type == "cuda" and device.type == "cpu":
        # `tunewise plan` loads the model on the host; a run trains it on the GPU, where it is measured too.
        _, failure = catch_out_of_memory(lambda: prep.model.to("cuda"))
        if failure is not None:
            problem = f"the weights on the GPU ({failure})"
        device = next(prep.model.parameters()).device
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(prep.config.training.precision)
    if device.type == "cpu" and half is not None:
        half = torch.bfloat16  # the same two bytes; CPU autocast is bf16's
    saved = 0
    # A forward on this process alone would wait for the other ranks' all-gathers under FSDP: not measured.
    sharded = any("FullyShardedDataParallel" in type(m).__name__ for m in prep.model.modules()) or any(
        type(p).__name__ in ("DTensor", "FlatParameter") for p in prep.model.parameters()
    )
    if largest is not None and not sharded and problem is None:
        settings = loop_settings(prep)
        _, batch = collate_micro_batch(
            prep.data.train, largest.ids, make_collate(settings), settings.pad_token_id
        )
        counted, failure = catch_out_of_memory(
            lambda: saved_for_backward(CausalLMLoss(prep.model), batch, half)
        )
        saved = counted or 0
        if failure is not None:
            problem = f"the largest micro-batch's forward ({failure})"
            clear_device_cache(garbage_collection=True)
    if prep.hardware.device_type == "cuda":  # where the run trains, wherever the plan found the model
        device_bytes: int | None = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    elif device.type == "cpu":
        device_bytes = psutil.virtual_memory().total
    else:
        device_bytes = None
    tokens = largest.tokens if largest is not None else 0
    return {
        "largest_micro_batch_bytes": saved,
        "per_token_bytes": round(saved / tokens) if tokens else 0,
        "run_bytes": static_bytes + saved,
        "device_memory_bytes": device_bytes,
        "out_of_memory": problem,  # what ran out of memory while measuring
        "measured": largest is not None and not sharded,
    }


def fitting_token_budget(prep: Prepared, static_bytes: int, activations: dict) -> int | None:
    """The largest token budget (on the pad multiple, at least max_seq_length) whose activations, at the measured
    bytes per token, with weights, gradients and optimizer state fill at most MEMORY_FILL of the device."""
    from tunewise.config.lints import MEMORY_FILL

    per_token, device = activations["per_token_bytes"], activations["device_memory_bytes"]
    if not per_token or not device:
        return None
    d = prep.config.data
    multiple = d.pad_to_multiple_of or 64
    tokens = int((MEMORY_FILL * device - static_bytes) / per_token) // multiple * multiple
    return tokens if tokens >= d.max_seq_length else None


def memory_by_method(prep: Prepared) -> dict[str, dict[str, int]]:
    """Per method: trainable parameters and bytes of weights, gradients, optimizer state (no activations)."""
    from tunewise.config.resolve import choose_torch_dtype
    from tunewise.models.adapters import LoraSettings
    from tunewise.models.adapters import memory_by_method as estimate

    cfg, q = prep.config, prep.config.quantization
    # Fix (test_run_contract.py): each other method in the dtype `torch_dtype: auto` would give it (a full
    # fine-tune keeps fp32 weights), not in this run's: a bf16 LoRA run showed full at half its bytes.
    other_dtypes = (
        {m: choose_torch_dtype(cfg.training.precision, m) for m in ("full", "lora", "qlora")}
        if prep.user_config.model.torch_dtype == "auto"
        else None
    )
    estimates = estimate(
        prep.model_dir,
        LoraSettings(**{k: getattr(cfg.adapter, k) for k in LoraSettings.__dataclass_fields__}),
        prep.optimizer.name,  # the one train builds here, which may not be the one named (a fallback)
        method=cfg.adapter.method,
        torch_dtype=str(cfg.model.torch_dtype),
        bits=4 if q.load_in_4bit is True else 8 if q.load_in_8bit else None,
        double_quant=q.bnb_4bit_use_double_quant,
        trust_remote_code=cfg.model.trust_remote_code,
        other_dtypes=other_dtypes,
    )
    return {method: e.as_dict() for method, e in estimates.items()}


def steps_line(s: dict[str, Any]) -> str:
    """How the optimizer steps were counted: from max_steps (HF: it overrides epochs) or from epochs."""
    total, per_epoch = s["total_steps"], s["steps_per_epoch"]
    if s["max_steps_overrides"]:
        return (
            f"[bold]{total}[/] optimizer steps (max_steps; {per_epoch} per pass over the data, "
            f"so {total / per_epoch:.3g} passes)"
        )
    return f"{per_epoch}/epoch x {s['num_train_epochs']:g} epochs = [bold]{total}[/] optimizer steps"


def print_plan(console: Console, prep: Prepared, measure: bool = True) -> None:
    s = plan_summary(prep, measure)
    console.rule("[bold]plan")
    console.print(
        f"model [bold]{escape(str(s['model']))}[/] ({s['total_parameters']:,} parameters) - "
        f"method [bold]{s['method']}[/], "
        f"trainable [bold]{s['trainable_parameters']:,}[/] ({s['trainable_percent']}%) - device {s['device']}"
    )
    why = f" ({s['world_size_reason']})" if s["world_size_reason"] else ""
    console.print(f"processes: {s['world_size']}{why}", markup=False)  # what the steps below are counted for
    console.print(
        f"data: {s['train_rows']} train / {s['validation_rows']} validation rows ({s['format']}), "
        f"{s['train_tokens']:,} train tokens, {s['mean_tokens_per_example']} per example; "
        f"{s['truncated']} truncated, {s['dropped_no_targets']} dropped (no targets), {s['skipped_rows']} bad rows skipped"
        + (
            f"; validation {s['validation_truncated']} truncated, {s['validation_dropped_no_targets']} dropped"
            if s["validation_rows"]
            else ""
        )
    )
    console.print(
        f"steps: {steps_line(s)}, {s['warmup_steps']} warmup; effective batch {s['effective_batch_size']} "
        f"sequences (~{s['effective_batch_tokens']:,} tokens); largest micro-batch "
        f"{s['largest_micro_batch_tokens']:,} tokens (activation memory follows it)"
    )
    table = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    # Setting names are config paths a user copies: whole on one line; the explanation wraps instead.
    table.add_column("setting", no_wrap=True, min_width=max(map(len, PLAN_KEYS)))
    table.add_column("value", overflow="fold")
    table.add_column("source")
    table.add_column("why", overflow="fold")
    quantized = prep.config.quantization.load_in_4bit is True or prep.config.quantization.load_in_8bit
    for key in PLAN_KEYS:
        if key.startswith("quantization.bnb") and not quantized:
            continue
        choice = prep.resolution.choices.get(key)
        if choice is not None:
            table.add_row(key, Text(str(choice.value)), choice.source, Text(choice.reason))
        else:
            section, name = key.split(".")
            source = "user" if key in prep.resolution.user else "default"
            table.add_row(key, Text(str(getattr(getattr(prep.config, section), name))), source, "")
    if prep.config_overrides:
        table.add_row("model config", str(prep.config_overrides), "user", "dropout overrides")
    console.print(table)
    print_memory(console, s["memory_by_method"], s["method"], prep.optimizer.label)
    print_activations(console, s["activations"], s["largest_micro_batch_tokens"])
    for note in s["notes"]:
        console.print(Text.assemble(("note", "yellow"), ": ", note))
    for item in s["lints"]:
        color = "yellow" if item["severity"] == "warning" else "cyan"
        fix = f" -> {item['fix']}" if item["fix"] else ""
        console.print(f"[{color}]{item['severity']}[/] {item['key']}: ", Text(item["message"] + fix))


def print_memory(console: Console, by_method: dict[str, dict[str, int]], chosen: str, optim: str) -> None:
    table = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    for col in ("method", "trainable", "weights", "gradients", f"{optim} state", "total"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for method, m in by_method.items():
        sizes = [m[k] for k in ("weights_bytes", "gradients_bytes", "optimizer_state_bytes", "total_bytes")]
        row = [method + (" (this run)" if method == chosen else ""), f"{m['trainable_parameters']:,}"]
        table.add_row(
            *row, *(f"{b / 2**20:,.1f} MiB" for b in sizes), style="bold" if method == chosen else ""
        )
    console.print("memory by method (activations below: they grow with the micro-batch's tokens):")
    console.print(table)


def print_activations(console: Console, a: dict, largest_tokens: int) -> None:
    if not a["measured"]:
        console.print(
            "activations: not measured here (`tunewise plan` measures them on the largest micro-batch)"
        )
        return
    if a["out_of_memory"]:
        console.print(f"activations: not measured, out of memory in {a['out_of_memory']}")
        return
    device = f" of the {a['device_memory_bytes'] / 2**30:,.1f} GiB here" if a["device_memory_bytes"] else ""
    console.print(
        f"activations kept for the backward by the largest micro-batch ({largest_tokens:,} tokens; measured "
        f"eagerly, torch_compile keeps less): {a['largest_micro_batch_bytes'] / 2**20:,.1f} MiB, "
        f"{a['per_token_bytes'] / 2**10:,.1f} KiB per token; this run ~{a['run_bytes'] / 2**30:,.2f} GiB with "
        f"weights, gradients and optimizer state{device}, before the backward's temporaries"
    )


def print_eval(console: Console, title: str, metrics: dict) -> None:
    shown = {k: v for k, v in metrics.items() if not k.startswith("_")}
    if not shown:
        console.print(f"[dim]{title}: no validation data[/]")
        return
    parts = [
        f"{k} {v:.2%}" if k in ("exact_match", "json_exact_match") else f"{k} {v:.4f}"
        for k, v in shown.items()
    ]
    console.print(f"[bold]eval {title}[/]: " + ", ".join(parts))


def print_samples(console: Console, samples: list[dict]) -> None:
    for i, s in enumerate(samples, 1):
        console.rule(f"held-out prompt {i}")
        console.print(Text(s["prompt"]))
        for label, style, text in (
            ("expected", "bold", s["reference"]),
            ("before", "bold red", s["before"]),
            ("after", "bold green", s["after"]),
        ):
            console.print(Text(f"{label:<9}", style=style) + Text(text[:300]))
