"""Render normalised rows through the chat template and tokenise them with label masks.

A conversation is rendered turn by turn: for every assistant turn, the template is applied to the
turns before it with the generation prompt, and to the turns up to and including it. The text
between the two renders is the assistant's turn; its tokens up to and including the end-of-turn
token are trained (label = token id), everything else gets -100. Segments are tokenised one by one
and concatenated, so the label boundaries are exact whatever the tokenizer merges.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import datasets
from transformers import PreTrainedTokenizerBase

IGNORE = -100

# Used for plain `text` rows when a tokenizer has no chat template and a row must be rendered.
FALLBACK_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + eos_token + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


class TemplateError(ValueError):
    """The chat template renders in a way we cannot split into prompt and answer."""


@dataclass(frozen=True)
class TokenizeSettings:
    max_seq_length: int
    truncation_side: str = "right"
    train_on_inputs: bool = False
    chat_template: str | None = None


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict], template: str | None, gen: bool) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=gen
    )


def chat_segments(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], template: str | None = None
) -> list[tuple[str, bool]]:
    """Split the rendered conversation into (text, is_assistant_output) segments."""
    segments: list[tuple[str, bool]] = []
    done = ""
    eot = tokenizer.eos_token or ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], template, gen=True)
        full = _render(tokenizer, messages[: i + 1], template, gen=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise TemplateError(
                "the chat template does not render conversations as growing prefixes, so prompt and answer "
                "cannot be told apart; set data.chat_template to a template that does"
            )
        answer = full[len(prompt) :]
        end = answer.find(eot) + len(eot) if eot and eot in answer else len(answer.rstrip())
        segments += [(prompt[len(done) :], False), (answer[:end], True)]
        done = prompt + answer[:end]
        trailing = answer[end:]
        if trailing:
            segments.append((trailing, False))
            done += trailing
    return [(text, trained) for text, trained in segments if text]


def encode_chat(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], settings: TokenizeSettings
) -> tuple[list[int], list[int]]:
    ids: list[int] = []
    labels: list[int] = []
    for text, trained in chat_segments(tokenizer, messages, settings.chat_template):
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if (trained or settings.train_on_inputs) else [IGNORE] * len(piece)
    return ids, labels


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str) -> tuple[list[int], list[int]]:
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids = ids + [tokenizer.eos_token_id]
    return ids, list(ids)


def truncate(ids: list[int], labels: list[int], max_len: int, side: str) -> tuple[list[int], list[int]]:
    if len(ids) <= max_len:
        return ids, labels
    if side == "left":
        return ids[-max_len:], labels[-max_len:]
    return ids[:max_len], labels[:max_len]


def encode_row(row: dict, tokenizer: PreTrainedTokenizerBase, settings: TokenizeSettings) -> dict:
    if row.get("messages"):
        ids, labels = encode_chat(tokenizer, row["messages"], settings)
    else:
        ids, labels = encode_text(tokenizer, row["text"])
    full_length = len(ids)
    ids, labels = truncate(ids, labels, settings.max_seq_length, settings.truncation_side)
    return {
        "input_ids": ids,
        "labels": labels,
        "length": len(ids),
        "full_length": full_length,
        "num_targets": sum(label != IGNORE for label in labels[1:]),
    }


def fingerprint(ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, settings: TokenizeSettings) -> str:
    """Cache key for tokenised data: the rows, the tokenizer, the template and the settings."""
    parts = {
        "rows": ds._fingerprint,
        "tokenizer": tokenizer.name_or_path,
        "vocab": len(tokenizer),
        "template": settings.chat_template or tokenizer.chat_template,
        "eos": tokenizer.eos_token,
        "settings": settings.__dict__,
        "version": 1,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class TokenizeReport:
    rows: int
    truncated: int
    dropped_no_targets: int


def tokenize_dataset(
    ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, settings: TokenizeSettings
) -> tuple[datasets.Dataset, TokenizeReport]:
    """Tokenise every row (cached by fingerprint); drop rows left with nothing to learn."""
    keep = [c for c in ("source",) if c in ds.column_names]
    tokens = ds.map(
        encode_row,
        fn_kwargs={"tokenizer": tokenizer, "settings": settings},
        remove_columns=[c for c in ds.column_names if c not in keep],
        new_fingerprint=fingerprint(ds, tokenizer, settings),
        desc="tokenising",
    )
    truncated = sum(f > n for f, n in zip(tokens["full_length"], tokens["length"]))
    # An example with no target tokens (e.g. its answer was cut away) would add a NaN or zero
    # loss to its batch; drop it here and report the count.
    kept = tokens.filter(lambda n: n > 0, input_columns="num_targets", desc="dropping rows without targets")
    return kept, TokenizeReport(
        rows=len(tokens), truncated=truncated, dropped_no_targets=len(tokens) - len(kept)
    )
