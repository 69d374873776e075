"""Load a base model, a run directory, an adapter or a merged model for generation."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from tunewise.infer.generate import SamplingSettings, generate
from tunewise.models.load import load_model, load_tokenizer, materialize, resolve_source


@dataclass
class Loaded:
    model: object
    tokenizer: PreTrainedTokenizerBase
    sampling: SamplingSettings


def load_generation_model(name_or_path: str) -> tuple[object, PreTrainedTokenizerBase]:
    path = Path(name_or_path)
    if (path / "adapter_config.json").is_file():
        base = json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
        base_dir = materialize(resolve_source(base))
        tokenizer_dir = path if (path / "tokenizer_config.json").is_file() else base_dir
        model = PeftModel.from_pretrained(load_model(base_dir), path)
        return model, load_tokenizer(tokenizer_dir)
    model_dir = materialize(resolve_source(name_or_path))
    return load_model(model_dir), load_tokenizer(model_dir)


def load_for_chat(name_or_path: str, overrides: list[str]) -> Loaded:
    from tunewise.config.load import load_config

    run_config = Path(name_or_path) / "config.yaml"
    cfg = load_config(run_config if run_config.is_file() else None, overrides)
    g = cfg.generation
    sampling = SamplingSettings(
        g.max_new_tokens, g.do_sample, g.temperature, g.top_p, g.top_k, g.repetition_penalty
    )
    model, tokenizer = load_generation_model(name_or_path)
    return Loaded(model, tokenizer, sampling)


def reply(loaded: Loaded, history: list[dict]) -> str:
    return generate(loaded.model, loaded.tokenizer, [history], loaded.sampling)[0]  # type: ignore[arg-type]


def answer(name_or_path: str, messages: list[dict], overrides: list[str]) -> str:
    return reply(load_for_chat(name_or_path, overrides), messages)
