"""A config problem, the one error that carries them all, and the words problems are told in.

Shared by the reading of a config (config/load.py), its cross-field rules (config/rules.py), the resolution of
`auto` values and the lints, so that every problem reads alike: the config path, what is wrong, what to do.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

Severity = Literal["error", "warning", "info"]

# Names other fine-tuning tools use for our keys (HF's example scripts, axolotl, LLaMA-Factory, litgpt,
# torchtune, TRL), so a habit from elsewhere gets a pointer to the right key rather than a bare "unknown key"
# or a near spelling of another one (`train_file` is closer to `validation_file` than to `dataset`).
ALIASES = {
    "train_file": "dataset",
    "dataset_name": "dataset",
    "datasets": "dataset",
    "data_path": "dataset",
    "data_files": "dataset",
    "eval_file": "validation_file",
    "eval_dataset": "validation_file",
    "lora_rank": "r",
    "lora_target": "target_modules",
    "lora_target_linear": "target_modules",
    "cutoff_len": "max_seq_length",
    "block_size": "max_seq_length",
    "template": "chat_template",
    "train_batch_size": "per_device_train_batch_size",
    "eval_batch_size": "per_device_eval_batch_size",
    "num_steps": "max_steps",
    "total_steps": "max_steps",
    "num_warmup_steps": "warmup_steps",
    "mixed_precision": "precision",
    "gradient_clipping": "max_grad_norm",
    "clip_grad_norm": "max_grad_norm",
    "quant_type": "bnb_4bit_quant_type",
    "lr": "learning_rate",
    "lora_r": "r",
    "rank": "r",
    "alpha": "lora_alpha",
    "epochs": "num_train_epochs",
    "num_epochs": "num_train_epochs",
    "batch_size": "per_device_train_batch_size",
    "micro_batch_size": "per_device_train_batch_size",
    "global_batch_size": "effective_batch_size",
    "grad_accum": "gradient_accumulation_steps",
    "gradient_accumulation": "gradient_accumulation_steps",
    "max_length": "max_seq_length",
    "sequence_len": "max_seq_length",
    "base_model": "model_name_or_path",
    "model_name": "model_name_or_path",
    "dtype": "torch_dtype",
    "lora_target_modules": "target_modules",
    "scheduler": "lr_scheduler_type",
    "lr_scheduler": "lr_scheduler_type",
    "optimizer": "optim",
    "grad_clip": "max_grad_norm",
    "sample_packing": "packing",
    "val_set_size": "validation_split",
}


@dataclass(frozen=True)
class Problem:
    path: str
    """Dotted config path (`training.learning_rate`), or file:line for a YAML syntax error."""
    message: str
    """What is wrong and what to do, in one line."""
    severity: Severity = "error"
    source: str = ""
    """Where the value came from: `train.yaml:7`, `--set`, or empty when unknown (a dict, a default)."""

    def __str__(self) -> str:
        where = f"  [{self.source}]" if self.source else ""
        return f"{self.path}: {self.message}{where}"


class ConfigError(ValueError):
    """Every problem found in a config, raised once."""

    def __init__(self, problems: Sequence[Problem], origin: str = "") -> None:
        order = {"error": 0, "warning": 1, "info": 2}
        self.problems = sorted(problems, key=lambda p: order[p.severity])
        errors = sum(p.severity == "error" for p in self.problems)
        head = f"invalid config{f' {origin}' if origin else ''} ({errors} error{'s' * (errors != 1)}):"
        lines = [f"  {'' if p.severity == 'error' else p.severity + ': '}{p}" for p in self.problems]
        super().__init__("\n".join([head, *lines]))


# ---------------------------------------------------------------------------------------- did you mean


def suggest(name: Any, candidates: Iterable[str]) -> str | None:
    """The closest candidate to `name` (known aliases from other tools first), or None."""
    candidates = list(candidates)
    name = str(name)
    if ALIASES.get(name) in candidates:
        return ALIASES[name]
    matches = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return matches[0] if matches else None


def num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


def show(value: Any) -> str:
    """A value as a YAML user would write it, shortened."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
