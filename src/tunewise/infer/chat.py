"""Load a base model, a run directory, an adapter or a merged model for generation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase, set_seed

from tunewise.infer.generate import SamplingSettings, generate
from tunewise.models.load import load_model, load_tokenizer, materialize, resolve_source
from tunewise.models.merge import find_adapter_base, is_adapter


@dataclass
class Loaded:
    model: PreTrainedModel | PeftModel
    tokenizer: PreTrainedTokenizerBase
    sampling: SamplingSettings
    chat_template: str | None = None
    """The run's data.chat_template, so a run answers in the format it trained on."""
    system_prompt: str | None = None
    """The run's data.system_prompt: its examples began with it, so its answers do too."""


def load_generation_model(name_or_path: str) -> tuple[PreTrainedModel | PeftModel, PreTrainedTokenizerBase]:
    """The model to answer with, from any of: a run directory (LoRA/QLoRA or full), a PEFT adapter,
    a merged or other HF model directory, a GGUF file, a hub id or the embedded default.

    An adapter's base is loaded as its run loaded it (dtype, 4/8-bit, from the run's config.yaml),
    so a run answers as the model it trained; a bare adapter gets a float32 base.
    """
    path = Path(name_or_path)
    if is_adapter(path):
        base = find_adapter_base(path)
        model = load_model(
            base.model_dir,
            dtype=base.torch_dtype,
            trust_remote_code=base.trust_remote_code,
            quantization_config=base.quantization,
        )
        tokenizer_dir = path if (path / "tokenizer_config.json").is_file() else base.model_dir
        return PeftModel.from_pretrained(model, path), load_tokenizer(tokenizer_dir, base.trust_remote_code)
    model_dir = materialize(resolve_source(name_or_path))
    return load_model(model_dir), load_tokenizer(model_dir)


# What generate and chat read from a config besides `generation.*`; a --set of anything else would do nothing.
ANSWER_KEYS = ("data.chat_template", "data.system_prompt", "training.seed")


def load_for_chat(name_or_path: str, overrides: list[str]) -> Loaded:
    """The model with the run's generation settings, chat template and system prompt (a run directory's
    config.yaml, else the defaults), `--set` overrides on top. `--set seed=N` makes sampling reproducible."""
    from tunewise.config.load import load_config, override_path
    from tunewise.config.problems import ConfigError, Problem

    run_config = Path(name_or_path) / "config.yaml"
    cfg = load_config(run_config if run_config.is_file() else None, overrides)
    paths = [override_path(item) for item in overrides]
    if ignored := [p for p in paths if not p.startswith("generation.") and p not in ANSWER_KEYS]:
        reads = "generation.*, " + ", ".join(ANSWER_KEYS)
        why = f"does nothing when answering (generate and chat read {reads})"
        raise ConfigError([Problem(path, why, source="--set") for path in ignored])
    g = cfg.generation
    sampling = SamplingSettings(
        g.max_new_tokens, g.do_sample, g.temperature, g.top_p, g.top_k, g.repetition_penalty
    )
    model, tokenizer = load_generation_model(name_or_path)
    # Only a seed given here: a run's config.yaml always holds one, which would make every sample the same.
    if "training.seed" in paths:
        set_seed(cfg.training.seed)
    return Loaded(model, tokenizer, sampling, cfg.data.chat_template, cfg.data.system_prompt)


def reply(loaded: Loaded, history: list[dict]) -> str:
    model = loaded.model  # a PeftModel generates as its base model does
    if loaded.system_prompt and history[0]["role"] != "system":  # as the training rows got it (data/load.py)
        history = [{"role": "system", "content": loaded.system_prompt}, *history]
    answers = generate(model, loaded.tokenizer, [history], loaded.sampling, 1, loaded.chat_template)  # type: ignore[arg-type]
    return answers[0]


def answer(name_or_path: str, messages: list[dict], overrides: list[str]) -> str:
    return reply(load_for_chat(name_or_path, overrides), messages)
