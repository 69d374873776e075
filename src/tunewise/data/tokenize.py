"""Render normalised rows through the chat template and tokenise them with label masks.

Labels. A conversation is rendered turn by turn: for every assistant turn, the template is applied
to the turns before it with the generation prompt, and to the turns up to and including it. The
text between the two renders is the assistant's turn. Its text up to and including the first EOS
(or, when the template ends turns with another marker, up to the last non-blank character, e.g.
`<|eot_id|>`) is trained. Everything else (system, user, the assistant header, the newline after
the end-of-turn marker) is not. With `train_on_inputs` every token is trained. Plain `text` rows
are trained on every token, with EOS appended.

Tokens. The whole render is tokenised at once, as generation tokenises a conversation it continues
and as TRL tokenises a training row; a token's label is its id when its characters overlap a
trained span, else `IGNORE`. Tokenising each span alone would not give the same tokens: a
SentencePiece tokenizer (Llama-2, Mistral, TinyLlama) starts every piece it tokenises with a word
start `▁` that the whole render lacks there. A token straddling a span's start (SmolLM2 merges the
header's newline with an answer's leading space, `ĊĠ`) carries answer text, so it is trained.
Python ("slow") tokenizers give no character offsets: there the spans are tokenised one by one,
and a row where that differs from the whole render is an error naming the row.

Truncation cuts `max_seq_length` tokens from the right (keep the start) or the left (keep the
end). An example left without a single target token is dropped and counted: it has nothing to
learn and would make an all-masked batch.

Caching. `tokenize_dataset` keys the `datasets` cache on the rows' fingerprint, the tokenizer's
vocabulary and special tokens, the resolved template, the settings and this file's source, so a
second run with the same inputs reads the Arrow cache and changing any of them tokenises again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import datasets
import jinja2
from transformers import PreTrainedTokenizerBase

from tunewise.data.load import DataError

IGNORE = -100
"""Label of a token the loss skips (PyTorch's cross-entropy `ignore_index`)."""
# Rows from which tokenising shows a progress bar: at ~0.6 ms a chat row (SmolLM2's tokenizer, one CPU core),
# 10,000 rows take several seconds.
LONG_TOKENISING_ROWS = 10_000

NAMED_TEMPLATES: dict[str, str] = {
    # ChatML (OpenAI, Qwen, SmolLM2).
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    # Meta-Llama-3-8B-Instruct's tokenizer_config.json.
    "llama3": (
        "{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + "
        "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' %}"
        "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    # HuggingFaceH4/zephyr-7b-beta's; its markers are plain text and turns end with EOS, so it fits any tokenizer.
    "zephyr": (
        "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    ),
}
"""Chat templates `data.chat_template` may name instead of spelling out Jinja."""
_TEMPLATE_TOKENS = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
}
"""Markers a named template needs as single tokens: split into pieces, an end-of-turn marker is no stop token."""
TRUNCATION_SIDES = ("right", "left")
_CODE_VERSION = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


class TemplateError(DataError):
    """The chat template is missing, unknown, or renders in a way prompt and answer cannot be told apart."""


@dataclass(frozen=True)
class TokenizeSettings:
    max_seq_length: int
    """Longest example in tokens; longer ones are cut on `truncation_side`."""
    truncation_side: str = "right"
    """right keeps the start of an over-long example, left keeps its end."""
    train_on_inputs: bool = False
    """Also train on prompts and user turns; plain text always trains on every token."""
    chat_template: str | None = None
    """None: the tokenizer's; a name in NAMED_TEMPLATES; or a Jinja template."""

    def __post_init__(self) -> None:
        if self.truncation_side not in TRUNCATION_SIDES:
            raise DataError(
                f"truncation_side must be one of {TRUNCATION_SIDES}, got {self.truncation_side!r}"
            )
        if self.max_seq_length < 2:
            raise DataError(f"max_seq_length must be at least 2 tokens, got {self.max_seq_length}")


# --- templates ----------------------------------------------------------------------------------------------


def resolve_chat_template(tokenizer: PreTrainedTokenizerBase, chat_template: str | None) -> str:
    """The Jinja text to render with: a named template, the user's Jinja, or the tokenizer's own.

    Checks that a named template's markers are single tokens of this tokenizer. Pass the result, not the
    name, to `apply_chat_template` (transformers reads a bare name as one of the tokenizer's own templates).
    """
    text = _template_text(tokenizer, chat_template)
    missing = [m for m in _TEMPLATE_TOKENS.get(chat_template or "", ()) if not _single_token(tokenizer, m)]
    if missing:
        raise TemplateError(
            f"data.chat_template: {chat_template!r} needs {', '.join(missing)} as single tokens, but the tokenizer "
            f"of {tokenizer.name_or_path or 'this model'} splits them, so the model could not learn to end its "
            "turns. Leave chat_template unset to use the model's own template, or use 'zephyr' (ends turns "
            "with EOS and fits any tokenizer)."
        )
    return text


def _template_text(tokenizer: PreTrainedTokenizerBase, chat_template: str | None) -> str:
    if chat_template is None:
        if not isinstance(tokenizer.chat_template, str):
            raise TemplateError(
                f"the tokenizer of {tokenizer.name_or_path or 'this model'} has no chat template, so chat data "
                f"cannot be rendered; set data.chat_template to one of {', '.join(NAMED_TEMPLATES)} or a Jinja "
                "template (zephyr fits any tokenizer)."
            )
        return tokenizer.chat_template
    if chat_template in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[chat_template]
    if "{{" in chat_template or "{%" in chat_template:
        return chat_template
    raise TemplateError(
        f"data.chat_template: {chat_template!r} is neither a known template ({', '.join(NAMED_TEMPLATES)}) "
        "nor Jinja (no '{{' or '{%'); use a name, paste the template, or leave it unset for the model's own."
    )


def _single_token(tokenizer: PreTrainedTokenizerBase, text: str) -> bool:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) == 1


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict], template: str, gen: bool) -> str:
    return tokenizer.apply_chat_template(  # type: ignore[return-value]
        messages, chat_template=template, tokenize=False, add_generation_prompt=gen
    )


# Stands in for an opening assistant turn's text to find where that text starts in the render.
_SENTINEL = "TUNEWISEANSWER7f3a"


def _prompt(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], i: int, template: str, full: str
) -> str:
    """What the model sees before assistant turn `i`: the earlier turns with the generation prompt."""
    if i > 0:
        return _render(tokenizer, messages[:i], template, gen=True)
    # An opening assistant turn has no earlier turns to render (transformers refuses an empty
    # conversation). Its answer starts where a stand-in for its text does: searching for the text itself
    # could match inside the template's own markers ("end" inside "<|im_end|>").
    stand_in = _render(tokenizer, [{**messages[0], "content": _SENTINEL}], template, gen=False)
    start = stand_in.find(_SENTINEL)
    if start < 0 or not full.startswith(stand_in[:start]):
        raise TemplateError("the chat template changes the text of an opening assistant turn; cannot find it")
    return stand_in[:start]


def chat_segments(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], template: str | None = None
) -> list[tuple[str, bool]]:
    """Split the rendered conversation into (text, trained) segments that concatenate to the whole render.

    The whole conversation (to its last assistant turn) is rendered once: that is what is tokenised, as TRL and
    generation render it. Assistant turn i starts where the render of the turns before it with the generation
    prompt ends, which must be a prefix of the whole render. It ends where the template's turn ends: where the
    render up to it and the same turns followed by a stand-in user turn part ways (Phi-3's template closes a
    conversation with EOS after its <|end|>, which the next turn does not have), less trailing blanks.

    Fix (test_tokenize.py): each turn's answer ended at the first EOS text in it, so an answer quoting `</s>`
    (an HTML strikethrough) was trained only up to there; and each turn had to extend the last turn's
    terminal render, so every multi-turn row of Phi-3's template stopped the run."""
    template = _template_text(tokenizer, template)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        return []
    whole = _render(tokenizer, messages[: turns[-1] + 1], template, gen=False)
    segments: list[tuple[str, bool]] = []
    done = 0
    for i in turns:
        full = whole if i == turns[-1] else _render(tokenizer, messages[: i + 1], template, gen=False)
        prompt = _prompt(tokenizer, messages, i, template, full)
        if not whole.startswith(prompt) or len(prompt) < done:
            raise TemplateError(
                f"the chat template renders the prompt of assistant turn {i} otherwise than the conversation "
                f"({_divergence(prompt, whole)}), so prompt and answer cannot be told apart; set data.chat_template "
                "to a template that renders growing conversations as growing text"
            )
        trained = _answer(tokenizer, messages, i, template, prompt, full, whole)
        segments += [(whole[done : len(prompt)], False), (trained, True)]
        done = len(prompt) + len(trained)
    segments.append((whole[done:], False))
    return [(text, trained) for text, trained in segments if text]


def _answer(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict],
    i: int,
    template: str,
    prompt: str,
    full: str,
    whole: str,
) -> str:
    """The trained text of assistant turn i, from `len(prompt)` on: its rendered answer and end-of-turn marker."""
    start = len(prompt)
    # The whole render goes on after any but the last assistant turn: it serves as the continuing render there.
    if whole != full:
        going_on = whole
    else:
        continued = [*messages[: i + 1], {"role": "user", "content": _USER_SENTINEL}]
        going_on = _render(tokenizer, continued, template, gen=False)
    turn_end = _turn_end(tokenizer, full, going_on, start)
    answer = full[start:turn_end].rstrip()
    if whole.startswith(full[:turn_end]) and _holds(answer, messages[i]):
        return answer
    # A template that renders a turn otherwise when it is the last one (Qwen3 writes an empty <think> block into
    # the last only): the answer found by its text in the whole render, up to the template's end-of-turn marker.
    found = _answer_by_text(whole, start, messages[i], end_of_turn_marker(tokenizer, template))
    if found is None:
        raise TemplateError(
            f"the chat template renders assistant turn {i} otherwise when it is the last turn than within the "
            f"conversation ({_divergence(full[:turn_end], whole)}), and its text is not in the conversation's "
            "render, so its answer cannot be found"
        )
    return found


def _holds(answer: str, message: dict) -> bool:
    """Whether a rendered answer holds its message's text (templates may trim it)."""
    content = message.get("content")
    return bool(answer) and (not isinstance(content, str) or content.strip() in answer)


def _answer_by_text(whole: str, start: int, message: dict, marker: str) -> str | None:
    """From `start`, through the message's text where it next appears in `whole`, and `marker` if it follows."""
    content = message.get("content")
    if not isinstance(content, str):
        return None
    text = content.strip()
    at = whole.find(text, start)
    if at < 0:
        return None
    end = at + len(text)
    rest = whole[end:]
    gap = len(rest) - len(rest.lstrip())
    if marker and rest.startswith(marker, gap):
        end += gap + len(marker)
    return whole[start:end] or None


def end_of_turn_marker(tokenizer: PreTrainedTokenizerBase, template: str) -> str:
    """The text a template ends an assistant turn with (`<|im_end|>`, `<|end|>`, `</s>`), "" if none: what
    follows a stand-in answer both where the conversation ends and where a user turn comes next."""
    turns = [{"role": "user", "content": _USER_SENTINEL}, {"role": "assistant", "content": _SENTINEL}]
    try:
        ended = _render(tokenizer, turns, template, gen=False)
        continued = _render(tokenizer, [*turns, turns[0]], template, gen=False)
    except jinja2.TemplateError:
        return ""
    ended, continued = (t[t.find(_SENTINEL) + len(_SENTINEL) :] for t in (ended, continued))
    return ended[: _turn_end(tokenizer, ended, continued, 0)].rstrip()


# Stands in for a user turn after an assistant turn, to find where the template ends that assistant turn.
_USER_SENTINEL = "TUNEWISEUSER7f3a"


def _turn_end(tokenizer: PreTrainedTokenizerBase, full: str, continued: str, start: int) -> int:
    """Where the render ending at an assistant turn and the one continuing it part ways, at a token boundary.

    Characters alone can agree into a marker: Phi-3's closing `<|endoftext|>` and the next turn's `<|user|>`
    share `<|`, which would train the closing token. So where `full` is not a prefix of `continued`, the split is
    the first differing token of their texts from `start` (a template boundary, so both tokenise alike there)."""
    if continued.startswith(full):  # most templates (ChatML, Llama 3): the turn ends where `full` does
        return len(full)
    shared = _common_prefix(full, continued)
    if not tokenizer.is_fast:
        return shared
    ours = tokenizer(full[start:], add_special_tokens=False, return_offsets_mapping=True)
    theirs = tokenizer(continued[start:], add_special_tokens=False)["input_ids"]
    differ = _common_prefix(ours["input_ids"], theirs)
    return start + ours["offset_mapping"][differ][0] if differ < len(ours["input_ids"]) else len(full)


def _common_prefix(a: Sequence, b: Sequence) -> int:
    n = min(len(a), len(b))
    return next((k for k in range(n) if a[k] != b[k]), n)


def _divergence(part: str, whole: str) -> str:
    """Where `part` stops being a prefix of `whole`, quoted: what a template-error message shows."""
    k = _common_prefix(part, whole)
    return f"at character {k}: {part[k : k + 40]!r} against {whole[k : k + 40]!r}"


# --- encoding -----------------------------------------------------------------------------------------------


def encode_chat(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], settings: TokenizeSettings
) -> tuple[list[int], list[int]]:
    """Token ids of the whole render and their labels (`IGNORE` outside trained segments)."""
    segments = chat_segments(tokenizer, messages, settings.chat_template)
    text = "".join(piece for piece, _ in segments)
    if settings.train_on_inputs:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids, list(ids)
    if not tokenizer.is_fast:  # a Python tokenizer ignores return_offsets_mapping without a word
        return _encode_segments(tokenizer, segments, text)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoded["input_ids"]
    return ids, _labels(ids, encoded["offset_mapping"], _trained_spans(segments))


def _trained_spans(segments: list[tuple[str, bool]]) -> list[tuple[int, int]]:
    """Character [start, end) of each trained segment in the render."""
    spans, start = [], 0
    for text, trained in segments:
        if trained:
            spans.append((start, start + len(text)))
        start += len(text)
    return spans


def _labels(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """A token's id where its characters overlap a trained span, else IGNORE; offsets and spans ascend."""
    labels = [IGNORE] * len(ids)
    span = 0
    for i, (start, end) in enumerate(offsets):
        while span < len(spans) and spans[span][1] <= start:
            span += 1
        # a token of no characters (an added word start) counts as one at its position
        if span < len(spans) and spans[span][0] < max(end, start + 1):
            labels[i] = ids[i]
    return labels


def _encode_segments(
    tokenizer: PreTrainedTokenizerBase, segments: list[tuple[str, bool]], text: str
) -> tuple[list[int], list[int]]:
    """Without character offsets: each segment tokenised alone, kept only where that is the whole render's."""
    ids: list[int] = []
    labels: list[int] = []
    for piece_text, trained in segments:
        piece = tokenizer(piece_text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if trained else [IGNORE] * len(piece)
    if ids != tokenizer(text, add_special_tokens=False)["input_ids"]:
        raise TemplateError(
            f"the tokenizer of {tokenizer.name_or_path or 'this model'} ({type(tokenizer).__name__}) is a Python "
            "one, which gives no character offsets, and it tokenises this conversation differently as a whole "
            "than turn by turn (a SentencePiece one, say, starts each piece with a word start), so its trained "
            "tokens cannot be placed. Use the model's fast tokenizer (a tokenizer.json file)."
        )
    return ids, labels


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str) -> tuple[list[int], list[int]]:
    """Plain text, trained on every token; EOS appended so the model learns where a document ends."""
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
    """One normalised row -> input_ids, labels, length, full_length (before truncation), num_targets."""
    try:
        if row.get("messages"):
            ids, labels = encode_chat(tokenizer, row["messages"], settings)
        else:
            ids, labels = encode_text(tokenizer, row["text"])
    except TemplateError as e:
        raise TemplateError(f"{row.get('source', 'a row')}: {e}") from None
    except jinja2.TemplateError as e:
        raise TemplateError(f"{row.get('source', 'a row')}: {_jinja_problem(e)}") from None
    full_length = len(ids)
    ids, labels = truncate(ids, labels, settings.max_seq_length, settings.truncation_side)
    return {
        "input_ids": ids,
        "labels": labels,
        "length": len(ids),
        "full_length": full_length,
        # labels[0] is never a target: targets are labels shifted left by one (collate.shifted_targets)
        "num_targets": sum(label != IGNORE for label in labels[1:]),
    }


def _jinja_problem(error: jinja2.TemplateError) -> str:
    if isinstance(error, jinja2.TemplateSyntaxError):
        return (
            f"the chat template is not valid Jinja (its line {error.lineno}: {error.message}); "
            "fix data.chat_template or leave it unset for the model's own."
        )
    # raise_exception(...) in the template, or a template that cannot render this row's data
    return (
        f"the chat template refuses this conversation: {error.message or type(error).__name__}. Many templates "
        "(Gemma's, Mistral's) take no system turn or need user and assistant turns to alternate: fix or drop "
        "the row, unset data.system_prompt if it added the system turn, or set data.chat_template to a "
        "template that accepts it."
    )


# --- datasets -----------------------------------------------------------------------------------------------


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of what decides the ids: vocabulary, merges, normaliser, special tokens, added tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # The leading "truncation"/"padding" state changes whenever someone calls the tokenizer
        # with padding=True (generation does); it never changes our ids, so it must not bust the cache.
        text = backend.to_str()
        _, key, rest = text.partition('"added_tokens"')
        vocab = key + rest if key else text
    else:
        vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    specials = json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str)
    return hashlib.sha256(f"{type(tokenizer).__name__}|{specials}|{vocab}".encode()).hexdigest()[:32]


def fingerprint(ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, settings: TokenizeSettings) -> str:
    """Cache key for tokenised data: the rows, the tokenizer, the template, the settings and this code."""
    template = (
        resolve_chat_template(tokenizer, settings.chat_template) if "messages" in ds.column_names else None
    )
    parts = [ds._fingerprint, tokenizer_fingerprint(tokenizer), template, asdict(settings), _CODE_VERSION]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class TokenizeReport:
    rows: int
    """Rows tokenised."""
    truncated: int
    """Rows longer than max_seq_length, cut on truncation_side."""
    dropped_no_targets: int
    """Rows dropped because truncation left them no trained token."""


def encode_dataset(
    ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, settings: TokenizeSettings
) -> datasets.Dataset:
    """`encode_row` over every row, through the `datasets` cache; keeps `source`, drops nothing."""
    key = fingerprint(ds, tokenizer, settings)  # also checks the template before the first row
    with _progress_bar(len(ds) >= LONG_TOKENISING_ROWS):
        return ds.map(
            encode_row,
            fn_kwargs={"tokenizer": tokenizer, "settings": settings},
            remove_columns=[c for c in ds.column_names if c != "source"],
            new_fingerprint=key,
            desc="tokenising",
        )


@contextmanager
def _progress_bar(shown: bool) -> Iterator[None]:
    """`datasets`' own bar for this map only (the CLI turns them off), where tokenising takes a while; a map
    served from the cache shows none."""
    was = datasets.is_progress_bar_enabled()
    if shown and not was:
        datasets.enable_progress_bars()
    try:
        yield
    finally:
        if not was:
            datasets.disable_progress_bars()


def tokenize_dataset(
    ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, settings: TokenizeSettings
) -> tuple[datasets.Dataset, TokenizeReport]:
    """Tokenise every row (cached); drop rows left with nothing to learn, so no batch is all-masked."""
    tokens = encode_dataset(ds, tokenizer, settings)
    truncated = sum(f > n for f, n in zip(tokens["full_length"], tokens["length"]))
    kept = tokens.filter(
        _has_targets,
        input_columns="num_targets",
        new_fingerprint=f"{tokens._fingerprint}-kept",
        desc="dropping rows without targets",
    )
    return kept, TokenizeReport(
        rows=len(tokens), truncated=truncated, dropped_no_targets=len(tokens) - len(kept)
    )


def _has_targets(num_targets: Any) -> bool:
    return bool(num_targets > 0)
