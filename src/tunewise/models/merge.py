"""Find an adapter's base model, and merge the adapter into it as a plain HF model directory.

An adapter records its base as PEFT's `base_model_name_or_path`: for tunewise runs the local
directory the base was read from (for the embedded model, a cache entry that can be deleted or
moved). A run directory also has `config.yaml` with the `model_name_or_path` the user gave, which
resolves again from anywhere, so it is the fallback.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from peft import PeftModel
from transformers import BitsAndBytesConfig, PreTrainedTokenizerBase

from tunewise.data.tokenize import resolve_chat_template
from tunewise.infer.generate import stop_at_end_of_turn
from tunewise.models.adapters import quantization_config
from tunewise.models.load import (
    ModelLoadError,
    load_model,
    load_tokenizer,
    materialize,
    pad_with_eos,
    resolve_source,
    writing_directory,
)


@dataclass(frozen=True)
class AdapterBase:
    """Where an adapter's base model is, and how its run loaded it."""

    model_dir: Path
    source: str
    """Why this directory: the override, the adapter's record, or the run's config."""
    torch_dtype: str = "float32"
    quantization: BitsAndBytesConfig | None = None
    """As the run loaded the base (None for an adapter without its run's config.yaml)."""
    trust_remote_code: bool = False

    @property
    def bits(self) -> int | None:
        q = self.quantization
        return None if q is None else 4 if q.load_in_4bit else 8


@dataclass(frozen=True)
class MergeResult:
    output_dir: Path
    base: AdapterBase
    notes: list[str] = field(default_factory=list)


def is_adapter(path: Path) -> bool:
    return (path / "adapter_config.json").is_file()


def find_adapter_base(adapter_dir: Path, base: str | None = None) -> AdapterBase:
    """The base model of a PEFT adapter (or run directory); `base` overrides what was recorded."""
    run = run_config(adapter_dir)
    model, q = run.get("model") or {}, run.get("quantization") or {}
    settings: dict[str, Any] = {
        "torch_dtype": model.get("torch_dtype")
        if model.get("torch_dtype") in ("bfloat16", "float16")
        else "float32",
        "quantization": _run_quantization(q),
        "trust_remote_code": bool(model.get("trust_remote_code", False)),
    }
    if base is not None:
        return AdapterBase(materialize(resolve_source(base)), f"--base {base}", **settings)
    recorded = json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if recorded and Path(recorded).is_dir():
        return AdapterBase(Path(recorded), "recorded in adapter_config.json", **settings)
    original = model.get("model_name_or_path")
    if original:
        source = f"model_name_or_path `{original}` from {adapter_dir / 'config.yaml'}"
        return AdapterBase(materialize(resolve_source(str(original))), source, **settings)
    if recorded:  # a hub id, or a path gone with no run config to fall back on
        return AdapterBase(
            materialize(resolve_source(recorded)), "recorded in adapter_config.json", **settings
        )
    raise ModelLoadError(
        f"{adapter_dir}: the adapter records no base model and has no config.yaml; pass --base MODEL"
    )


def run_config(run_dir: Path) -> dict[str, Any]:
    """A run directory's config.yaml ({} if none), read as plain YAML, not through the schema: a run written by
    an older tunewise still merges and answers."""
    path = run_dir / "config.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def _run_quantization(q: dict[str, Any]) -> BitsAndBytesConfig | None:
    compute = q.get("bnb_4bit_compute_dtype")
    return quantization_config(
        q.get("load_in_4bit") is True,
        q.get("load_in_8bit") is True,
        q.get("bnb_4bit_quant_type", "nf4"),
        bool(q.get("bnb_4bit_use_double_quant", True)),
        compute if compute in ("bfloat16", "float16") else "float32",
    )


MERGED_DTYPES = ("float32", "bfloat16", "float16")


def merge_adapter(
    adapter_dir: Path, output_dir: Path, base: str | None = None, dtype: str = "float32"
) -> MergeResult:
    """Write base + adapter as one model (safetensors, tokenizer, generation config): merged in float32, saved
    in `dtype` (half the size in bfloat16 or float16, rounded once after the merge).

    The output directory appears whole or not at all: it is written beside it under a temporary name and renamed
    at the end, so an interrupted merge leaves nothing that could pass for a model, nor blocks a second try.
    """
    adapter_dir, output_dir = Path(adapter_dir), Path(output_dir)
    if dtype not in MERGED_DTYPES:
        raise ModelLoadError(f"--dtype {dtype}: choose one of {', '.join(MERGED_DTYPES)}")
    if not is_adapter(adapter_dir):
        if (adapter_dir / "config.json").is_file():
            raise ModelLoadError(f"{adapter_dir} is a full model (a `method: full` run?): nothing to merge")
        raise ModelLoadError(
            f"{adapter_dir} has no adapter_config.json: give a run directory or a PEFT adapter"
        )
    if output_dir.exists() and not output_dir.is_dir():
        raise ModelLoadError(f"--output {output_dir} is a file; give a new directory")
    if output_dir.exists() and any(output_dir.iterdir()):
        raise ModelLoadError(f"--output {output_dir} is not empty; give a new directory")
    found = find_adapter_base(adapter_dir, base)
    notes = [f"base model {found.model_dir} ({found.source})"]
    if found.bits:
        notes.append(
            f"the adapter was trained on a {found.bits}-bit base; merging de-quantises it: the base is "
            "loaded unquantised in float32 and the adapter merged into those full-precision weights"
        )
    model = load_model(found.model_dir, dtype="float32", trust_remote_code=found.trust_remote_code)
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    data = run_config(adapter_dir).get("data") or {}
    tokenizer = _run_tokenizer(adapter_dir, found, data.get("chat_template"), notes)
    # Before the system prompt joins the template: its text holds no end-of-turn marker.
    stop_at_end_of_turn(merged, tokenizer)
    if data.get("system_prompt"):
        notes.append(open_with_system_prompt(tokenizer, data["system_prompt"]))
    try:
        with writing_directory(output_dir) as tmp:
            merged.to(getattr(torch, dtype)).save_pretrained(tmp)  # config (its dtype too), safetensors
            tokenizer.save_pretrained(tmp)
    except OSError as exc:  # disk full, no permission, a parent that is a file
        raise ModelLoadError(f"--output {output_dir}: cannot write the merged model there ({exc})") from exc
    return MergeResult(output_dir, found, notes)


def _run_tokenizer(
    adapter_dir: Path, found: AdapterBase, chat_template: str | None, notes: list[str]
) -> PreTrainedTokenizerBase:
    """The tokenizer the adapter trained with: the run's own (it carries the run's chat template), else the base's
    with the run's `data.chat_template` set as the run set it (run.py `prepare`). A checkpoint-N directory holds
    config.yaml but no tokenizer, and the base's own template is not the one the run trained on. Either way it
    gets the pad token the run's saved tokenizer has, so the merge pads as the run did."""
    if (adapter_dir / "tokenizer_config.json").is_file():
        tokenizer = load_tokenizer(adapter_dir, found.trust_remote_code)
    else:
        tokenizer = load_tokenizer(found.model_dir, found.trust_remote_code)
        if chat_template:
            tokenizer.chat_template = resolve_chat_template(tokenizer, chat_template)
            notes.append(
                f"chat template: data.chat_template {_clip(chat_template)} from {adapter_dir / 'config.yaml'}"
            )
    pad_with_eos(tokenizer)
    return tokenizer


def _clip(text: str) -> str:
    return repr(text) if len(text) <= 40 else repr(text[:37] + "...")


def open_with_system_prompt(tokenizer: PreTrainedTokenizerBase, system_prompt: str) -> str:
    """Make the tokenizer's chat template open a conversation that has no system message with the run's
    `data.system_prompt`, as the training rows were opened (data/load.py), so vLLM or any `apply_chat_template`
    prompt the merged model (or a full fine-tune's run directory) as `tunewise generate` prompts the run. Returns
    the note that says so."""
    template = tokenizer.chat_template
    if not isinstance(template, str):  # none, or several named ones
        return (
            f"the run's data.system_prompt {_clip(system_prompt)} is not in the saved tokenizer (it has no single "
            "chat template): send it as the first, system message when serving"
        )
    tokenizer.chat_template = default_system_block(system_prompt) + template
    return (
        f"the saved tokenizer's chat template opens conversations without a system message with the run's "
        f"data.system_prompt {_clip(system_prompt)}, as training did"
    )


def default_system_block(system_prompt: str) -> str:
    """Jinja that puts `system_prompt` first in `messages` unless a system message is there; prepended to a chat
    template. The prompt is a Jinja string literal: JSON's escapes (quote, backslash, control characters) are
    Jinja's too, and a `%}` or `{{` inside a literal is text, not syntax."""
    # Non-ASCII as it is: Jinja would read an emoji's JSON escape (\ud83d\ude00) as two lone surrogates.
    literal = json.dumps(system_prompt, ensure_ascii=False)
    return (
        "{%- if not messages or messages[0]['role'] != 'system' %}"
        f"{{%- set messages = [{{'role': 'system', 'content': {literal}}}] + messages %}}"
        "{%- endif %}"
    )
