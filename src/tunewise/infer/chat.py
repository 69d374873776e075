"""Load a base model, a run directory, an adapter or a merged model for generation."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase, set_seed

from tunewise.config.problems import ConfigError, Problem
from tunewise.config.schema import SECTIONS
from tunewise.data.tokenize import resolve_chat_template
from tunewise.infer.generate import SamplingSettings, generate, render_prompt
from tunewise.models.load import load_model, load_tokenizer, materialize, resolve_source
from tunewise.models.merge import find_adapter_base, is_adapter, run_config


@dataclass
class Loaded:
    model: PreTrainedModel | PeftModel
    tokenizer: PreTrainedTokenizerBase
    sampling: SamplingSettings
    chat_template: str
    """The Jinja text prompts are rendered with: the run's data.chat_template, so a run answers in the format it
    trained on, else the tokenizer's own."""
    system_prompt: str | None = None
    """The run's data.system_prompt: its examples began with it, so its answers do too."""
    warnings: list[Problem] = field(default_factory=list)
    """What in the run's config.yaml bears on the answers but does nothing: keys this version does not know,
    sampling settings greedy decoding ignores."""


def load_generation_model(
    name_or_path: str, trust_remote_code: bool | None = None
) -> tuple[PreTrainedModel | PeftModel, PreTrainedTokenizerBase]:
    """The model to answer with, from any of: a run directory (LoRA/QLoRA or full), a PEFT adapter,
    a merged or other HF model directory, a GGUF file, a hub id or the embedded default.

    An adapter's base is loaded as its run loaded it (dtype, 4/8-bit, from the run's config.yaml),
    so a run answers as the model it trained; a bare adapter gets a float32 base. `trust_remote_code`
    None means what the directory's config.yaml says (a run's model.trust_remote_code), else False.
    """
    path = Path(name_or_path)
    if is_adapter(path):
        base = find_adapter_base(path)
        trust = base.trust_remote_code if trust_remote_code is None else trust_remote_code
        model = load_model(
            base.model_dir,
            dtype=base.torch_dtype,
            trust_remote_code=trust,
            quantization_config=base.quantization,
        )
        tokenizer_dir = path if (path / "tokenizer_config.json").is_file() else base.model_dir
        return PeftModel.from_pretrained(model, path), load_tokenizer(tokenizer_dir, trust)
    if trust_remote_code is None:  # a full fine-tune's run directory of a custom-code model says so
        trust_remote_code = bool((run_config(path).get("model") or {}).get("trust_remote_code", False))
    model_dir = materialize(resolve_source(name_or_path))
    model = load_model(model_dir, trust_remote_code=trust_remote_code)
    return model, load_tokenizer(model_dir, trust_remote_code)


# What generate and chat read from a config besides `generation.*`; a --set of anything else would do nothing.
ANSWER_KEYS = ("data.chat_template", "data.system_prompt", "training.seed", "model.trust_remote_code")


def load_for_chat(name_or_path: str, overrides: list[str]) -> Loaded:
    """The model with the run's generation settings, chat template and system prompt (a run directory's
    config.yaml, else the defaults), `--set` overrides on top. `--set seed=N` makes sampling reproducible.

    Everything that can fail before the first answer fails here: the config, the model, the chat template and
    its rendering of the first prompt, so `chat` never breaks off a conversation for them."""
    from tunewise.config.load import override_path, read_config

    run_config = Path(name_or_path) / "config.yaml"
    # Tolerant of the run's own keys, which another tunewise version may have written, not of the user's --set.
    cfg, problems = read_config(
        run_config if run_config.is_file() else None, overrides, unknown_keys="warning"
    )
    paths = [override_path(item) for item in overrides]
    if ignored := [p for p in paths if not p.startswith("generation.") and p not in ANSWER_KEYS]:
        reads = "generation.*, " + ", ".join(ANSWER_KEYS)
        why = f"does nothing when answering (generate and chat read {reads})"
        raise ConfigError([Problem(path, why, source="--set") for path in ignored])
    warnings = [p for p in problems if p.severity == "warning" and _bears_on_answering(p.path)]
    # A --set that does nothing is an error, as above: `--set temperature=0.7` alone decodes greedily.
    if idle := [p for p in warnings if p.source == "--set"]:
        raise ConfigError([replace(p, severity="error") for p in idle])
    g = cfg.generation
    sampling = SamplingSettings(
        g.max_new_tokens, g.do_sample, g.temperature, g.top_p, g.top_k, g.repetition_penalty
    )
    # The run's config.yaml (read above) or the --set decides, for any directory or hub id.
    model, tokenizer = load_generation_model(name_or_path, cfg.model.trust_remote_code)
    template = resolve_chat_template(tokenizer, cfg.data.chat_template)
    # The first prompt rendered once now: a template that refuses it (a role it does not take) fails here, before
    # `chat` asks for a prompt, rather than after the user typed one.
    render_prompt(tokenizer, opening([{"role": "user", "content": "hi"}], cfg.data.system_prompt), template)
    # Only a seed given here: a run's config.yaml always holds one, which would make every sample the same.
    if "training.seed" in paths:
        set_seed(cfg.training.seed)
    return Loaded(model, tokenizer, sampling, template, cfg.data.system_prompt, warnings)


def _bears_on_answering(path: str) -> bool:
    """A key generate and chat read, or one this version does not know (it may have been meant for them)."""
    section, _, key = path.partition(".")
    known = section in SECTIONS and key in SECTIONS[section].model_fields
    return path.startswith("generation.") or path in ANSWER_KEYS or not known


def opening(history: list[dict], system_prompt: str | None) -> list[dict]:
    """The conversation as training rows began: the run's system prompt first, unless it has its own
    (data/load.py)."""
    if system_prompt and history[0]["role"] != "system":
        return [{"role": "system", "content": system_prompt}, *history]
    return history


def reply(loaded: Loaded, history: list[dict]) -> str:
    model = loaded.model  # a PeftModel generates as its base model does
    conversation = opening(history, loaded.system_prompt)
    answers = generate(model, loaded.tokenizer, [conversation], loaded.sampling, 1, loaded.chat_template)  # type: ignore[arg-type]
    return answers[0]


def answer(name_or_path: str, messages: list[dict], overrides: list[str]) -> str:
    return reply(load_for_chat(name_or_path, overrides), messages)
