"""`tunewise explain`: every key has an entry, entries are complete, and the required facts are stated."""

from __future__ import annotations

import io
import re

import pytest
from rich.console import Console, RenderableType
from rich.text import Text

from tunewise.config.knowledge import KNOWLEDGE, explain_all, explain_key
from tunewise.config.schema import SECTIONS, all_keys, field_doc
from tunewise.eval.metrics import choose_task_metric


def plain(shown: RenderableType) -> str:
    """What the terminal shows, wide enough that nothing wraps."""
    if isinstance(shown, str):
        return Text.from_markup(shown).plain
    console = Console(width=400, record=True, file=io.StringIO())
    console.print(shown)
    return "\n".join(line.rstrip() for line in console.export_text().splitlines())


def flat(text: str) -> str:
    """Text with line wrapping undone, for substring checks."""
    return re.sub(r"\s+", " ", text)


def test_every_schema_key_has_an_entry() -> None:
    missing = set(all_keys()) - set(KNOWLEDGE)
    assert not missing, f"keys without a knowledge entry: {sorted(missing)}"


def test_every_entry_names_a_schema_key() -> None:
    unknown = set(KNOWLEDGE) - set(all_keys())
    assert not unknown, f"entries for keys that do not exist: {sorted(unknown)}"


@pytest.mark.parametrize("key", sorted(all_keys()))
def test_entry_is_complete(key: str) -> None:
    entry = KNOWLEDGE[key]
    assert entry.section == all_keys()[key]
    assert entry.summary == field_doc(entry.section, key) != ""
    assert "\n" not in entry.summary
    assert entry.what and entry.hf_name and entry.default_why
    assert (
        entry.hf_name == "tunewise"
        or entry.hf_name.startswith("tunewise (")
        or "." in entry.hf_name
        or "(" in entry.hf_name
    )


@pytest.mark.parametrize(
    ("key", "field", "fact"),
    [
        ("lora_alpha", "what", "scales the update like a learning rate"),
        ("lora_alpha", "what", "lora_alpha / r"),
        ("lora_alpha", "what", "lora_alpha / √r with rsLoRA"),
        ("use_rslora", "what", "lora_alpha / √r"),
        ("per_device_train_batch_size", "what", "effective batch = per-device x accumulation x devices"),
        ("gradient_accumulation_steps", "what", "Effective batch = per-device x accumulation x devices"),
        ("warmup_ratio", "what", "warmup steps = ceil(ratio x total steps)"),
        ("top_k", "what", "keeps the k most likely tokens"),
        ("top_p", "what", "keeps the smallest set of tokens whose cumulative probability reaches p"),
        ("max_steps", "what", "max_steps > 0 overrides num_train_epochs"),
        ("weight_decay", "what", "decoupled weight decay"),
        ("weight_decay", "what", "separately from the gradient update"),
        ("weight_decay", "what", "it does NOT save memory"),
        ("precision", "what", "bf16 keeps fp32's exponent range"),
        ("precision", "what", "with less precision"),
        ("precision", "what", "overflows past 65504"),
        (
            "per_device_train_batch_size",
            "interactions",
            "multiples of 8 help tensor cores; odd sizes do not help anything",
        ),
        (
            "max_seq_length",
            "mistakes",
            "A multiple of 8 helps GPU tensor cores; odd sizes do not help anything",
        ),
    ],
)
def test_required_facts(key: str, field: str, fact: str) -> None:
    assert fact in getattr(KNOWLEDGE[key], field)


def test_task_metric_auto_is_explained_as_it_chooses() -> None:
    """The text said "none for plain files", but a plain chat file gets exact_match (JSON answers json_exact_match);
    plain-text data, with no prompt to answer, gets none (test_training_semantics.py)."""
    why = KNOWLEDGE["task_metric"].default_why
    for_json, for_words = (
        choose_task_metric("auto", ['{"n": 1}']),
        choose_task_metric("auto", ["plain words"]),
    )
    assert f"auto: {for_json} when every validation answer is a JSON object or array" in why
    assert f"else {for_words}; none for plain-text data" in why


@pytest.mark.parametrize(
    ("key", "hf_name"),
    [
        ("learning_rate", "TrainingArguments.learning_rate"),
        ("lora_alpha", "LoraConfig.lora_alpha"),
        ("bnb_4bit_quant_type", "BitsAndBytesConfig.bnb_4bit_quant_type"),
        ("top_p", "GenerationConfig.top_p"),
        ("effective_batch_size", "tunewise"),
        ("early_stopping_patience", "EarlyStoppingCallback.early_stopping_patience"),
    ],
)
def test_hf_names(key: str, hf_name: str) -> None:
    assert KNOWLEDGE[key].hf_name == hf_name


def test_typical_ranges_distinguish_full_and_lora() -> None:
    lr = KNOWLEDGE["learning_rate"]
    assert lr.typical_full.startswith("1e-5 to 5e-5") and lr.typical_lora.startswith("1e-4 to 5e-4")
    assert KNOWLEDGE["r"].typical_full == "" and KNOWLEDGE["r"].typical_lora == "8 to 64"


def test_explain_key_renders_every_part() -> None:
    text = plain(explain_key("lora_alpha"))
    assert text.startswith("adapter.lora_alpha  (HF: LoraConfig.lora_alpha)")
    for heading in (
        "What it does",
        "Default: 32",
        "Typical",
        "LoRA / QLoRA: r to 2 x r",
        "Interacts with",
        "Common mistakes",
    ):
        assert heading in text
    assert "scales the update like a learning rate" in flat(text)


def test_explain_key_accepts_dotted_key_and_section() -> None:
    assert explain_key("training.learning_rate") == explain_key("learning_rate")
    listing = plain(explain_key("adapter"))
    assert listing.splitlines()[0] == "adapter"
    assert [line.split()[0] for line in listing.splitlines()[1:]] == list(SECTIONS["adapter"].model_fields)


def test_explain_key_markup_is_escaped() -> None:
    # "[q_proj, v_proj]"-like text must print literally through rich, not vanish as a tag.
    assert "matches" in plain(explain_key("target_modules"))
    for key in KNOWLEDGE:
        shown = explain_key(key)
        assert isinstance(shown, str)
        Text.from_markup(shown)  # raises on broken markup


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("learnin_rate", "learnin_rate: unknown key; did you mean `learning_rate`?"),
        ("data.learning_rate", "data.learning_rate: unknown key; did you mean `training.learning_rate`?"),
        ("lr", "lr: unknown key; did you mean `learning_rate`?"),
        ("xyzzy", "xyzzy: unknown key; `tunewise explain` lists them all"),
    ],
)
def test_explain_unknown_key(key: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        explain_key(key)
    assert str(info.value) == message


def test_explain_all_groups_every_key_by_section() -> None:
    text = plain(explain_all())
    blocks = text.split("\n\n")
    assert [block.splitlines()[0] for block in blocks] == list(SECTIONS)
    for block, (section, cls) in zip(blocks, SECTIONS.items(), strict=True):
        rows = block.splitlines()[1:]
        assert [row.split()[0] for row in rows] == list(cls.model_fields)
        for row, key in zip(rows, cls.model_fields, strict=True):
            assert row.split(None, 1)[1] == field_doc(section, key)
