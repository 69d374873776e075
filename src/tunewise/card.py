"""The run directory's README.md: a model card written from the run's own config and numbers.

PEFT's `save_pretrained` writes a template card of empty fields; this one replaces it with what the run knows:
the base model, method, data, the settings that shaped training, evaluation before and after, and how to use
the result (including the chat template and system prompt it was trained with, which a server must repeat).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from tunewise.run import Prepared


def model_card(prep: Prepared, summary: dict[str, Any], output_dir: Path) -> str:
    method, model = prep.config.adapter.method, prep.config.model.model_name_or_path
    front = {
        "base_model": model,
        "library_name": "transformers" if method == "full" else "peft",
        "pipeline_tag": "text-generation",
        "tags": ["tunewise", method],
    }
    about = (
        f"Fine-tuned with tunewise from `{model}`: {_method(prep)}, on "
        f"{_data(prep)}. `config.yaml` holds every resolved setting (`tunewise train config.yaml` reruns it); "
        "`metrics.jsonl` the loss curve; `summary.json` these numbers."
    )
    lines = [
        f"---\n{yaml.safe_dump(front, sort_keys=False)}---",
        f"\n# {output_dir.name}\n",
        about,
        "\n## Evaluation\n",
        *_evaluation(summary),
        "\n## Training\n",
        *_training(prep, summary),
        "\n## Use\n",
        *_usage(prep, output_dir),
    ]
    return "\n".join(lines) + "\n"


def _training(prep: Prepared, summary: dict[str, Any]) -> list[str]:
    t, d = prep.config.training, prep.config.data
    steps = f"{summary['total_steps']} optimizer steps ({summary['stop_reason']})"
    batch = f"{prep.steps.plan.effective_batch_size} sequences each"
    took = f"{summary['tokens']:,} tokens in {summary['train_seconds']:.0f} s on {prep.hardware.device_type}"
    warmup = prep.steps.warmup_steps
    rate = (
        f"learning rate {t.learning_rate:g}, {t.lr_scheduler_type} schedule, warmup {warmup} step"
        + "s" * (warmup != 1)
    )
    loss_on = "every token" if d.train_on_inputs else "completions only"
    return [
        f"- {steps} of {batch}, {took}",
        f"- {rate}, {prep.optimizer.label}, weight decay {t.weight_decay:g}, precision {t.precision}",
        f"- max_seq_length {d.max_seq_length}, packing {'on' if d.packing else 'off'}, loss on {loss_on}",
    ]


def _method(prep: Prepared) -> str:
    a = prep.config.adapter
    if a.method == "full":
        return f"full fine-tuning ({prep.trainable_parameters:,} parameters)"
    targets = a.target_modules if isinstance(a.target_modules, str) else ", ".join(a.target_modules)
    extras = [name for name, on in (("rsLoRA", a.use_rslora), ("DoRA", a.use_dora)) if on]
    kind = "QLoRA (4-bit base)" if a.method == "qlora" else "LoRA"
    return (
        f"{kind} r {a.r}, lora_alpha {a.lora_alpha:g}, dropout {a.lora_dropout:g} on {targets}"
        + (f" ({', '.join(extras)})" if extras else "")
        + f", {prep.trainable_parameters:,} trainable parameters"
    )


def _data(prep: Prepared) -> str:
    d = prep.config.data
    files = d.dataset if isinstance(d.dataset, str) else ", ".join(d.dataset)
    held_out = prep.data.validation
    return f"`{files}` ({len(prep.data.train):,} training rows, {prep.data.format}" + (
        f"; {len(held_out):,} held out)" if held_out is not None else ")"
    )


def _evaluation(summary: dict[str, Any]) -> list[str]:
    before, after = summary.get("eval_before") or {}, summary.get("eval_after") or {}
    if not after:
        return ["No validation data: nothing was measured before and after training."]
    rows = ["| metric | before | after |", "|---|---|---|"]
    for key in after:
        shown = [_value(key, side.get(key)) for side in (before, after)]
        rows.append(f"| {key} | {shown[0]} | {shown[1]} |")
    return rows


def _value(key: str, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if key.startswith("eval_") else f"{100 * value:.1f}%"


def _usage(prep: Prepared, output_dir: Path) -> list[str]:
    d, here = prep.config.data, str(output_dir)
    lines = [
        "```bash",
        f'tunewise generate --model {here} "your prompt"',
    ]
    if prep.config.adapter.method != "full":
        lines.append(f"tunewise merge {here} --output {here}-merged   # one model any tool loads")
    lines += ["```", ""]
    template = f"`data.chat_template: {d.chat_template}`" if d.chat_template else "the base tokenizer's own"
    lines.append(
        f"Conversations were rendered with {template} chat template; this directory's tokenizer carries it, so "
        "`apply_chat_template` (and servers that call it) format prompts as training did."
    )
    if d.system_prompt:
        merged = (
            ", and this directory's chat template opens a conversation without a system message with it"
            if prep.config.adapter.method == "full"
            else ", and `tunewise merge` builds it into the merged chat template"
        )
        lines.append(
            f"\nEvery training conversation began with the system prompt {json.dumps(d.system_prompt)}: send it "
            f"first when serving elsewhere (`tunewise generate` and `chat` do{merged})."
        )
    return lines
