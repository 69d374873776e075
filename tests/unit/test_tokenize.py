"""Chat templates and label masks: trained tokens are exactly the assistant turns, end-of-turn included."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import ByT5Tokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

import tunewise.data.tokenize as tokenize_module
from tunewise.data.build import build_data
from tunewise.data.collate import collate_padded
from tunewise.data.load import DataError, load_records
from tunewise.data.tokenize import (
    IGNORE,
    NAMED_TEMPLATES,
    TemplateError,
    TokenizeSettings,
    chat_segments,
    encode_row,
    tokenize_dataset,
)
from tunewise.testing import (
    SPECIAL,
    build_tiny_sentencepiece_tokenizer,
    build_tiny_tokenizer,
    tiny_chat_rows,
)

SYSTEM_DEFAULT = (  # SmolLM2's template: a default system turn when the conversation has none
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are helpful<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


def assistant(content: str) -> dict[str, str]:
    return {"role": "assistant", "content": content}


def system(content: str) -> dict[str, str]:
    return {"role": "system", "content": content}


MULTI_TURN = [
    system("Answer in one word."),
    user("Colour of the sky?"),
    assistant("Blue."),
    user("And grass?"),
    assistant("Green, mostly."),
]


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerBase:
    return build_tiny_tokenizer()


def trained_runs(tokenizer: PreTrainedTokenizerBase, ids: list[int], labels: list[int]) -> list[str]:
    """Decoded text of each maximal run of positions whose label is not IGNORE."""
    runs: list[list[int]] = []
    for i, label in enumerate(labels):
        if label == IGNORE:
            continue
        assert label == ids[i], "a trained label is the token itself"
        if runs and i > 0 and labels[i - 1] != IGNORE:
            runs[-1].append(ids[i])
        else:
            runs.append([ids[i]])
    return [tokenizer.decode(run, clean_up_tokenization_spaces=False) for run in runs]


def encode(tokenizer: PreTrainedTokenizerBase, messages: list[dict], **settings: Any) -> dict:
    return encode_row(
        {"messages": messages}, tokenizer, TokenizeSettings(**{"max_seq_length": 4096, **settings})
    )


def answers(messages: list[dict], end: str) -> list[str]:
    return [m["content"] + end for m in messages if m["role"] == "assistant"]


# --- labels match the template -----------------------------------------------------------------------------


def test_single_turn_trains_exactly_the_answer_and_its_end_of_turn(tok: PreTrainedTokenizerBase) -> None:
    messages = [user("reverse: a b"), assistant("b a")]
    row = encode(tok, messages)
    assert trained_runs(tok, row["input_ids"], row["labels"]) == ["b a<|im_end|>"]
    assert tok.decode(row["input_ids"]) == tok.apply_chat_template(messages, tokenize=False)
    assert row["num_targets"] == len(tok("b a<|im_end|>", add_special_tokens=False)["input_ids"])


def test_multi_turn_with_system_trains_every_assistant_turn_and_nothing_else(
    tok: PreTrainedTokenizerBase,
) -> None:
    row = encode(tok, MULTI_TURN)
    assert trained_runs(tok, row["input_ids"], row["labels"]) == [
        "Blue.<|im_end|>",
        "Green, mostly.<|im_end|>",
    ]
    assert tok.decode(row["input_ids"]) == tok.apply_chat_template(MULTI_TURN, tokenize=False)


def test_segments_concatenate_to_the_render_and_split_after_end_of_turn(tok: PreTrainedTokenizerBase) -> None:
    segments = chat_segments(tok, MULTI_TURN)
    assert "".join(text for text, _ in segments) == tok.apply_chat_template(MULTI_TURN, tokenize=False)
    assert [text for text, trained in segments if trained] == answers(MULTI_TURN, "<|im_end|>")
    assert segments[-1] == (
        "\n",
        False,
    )  # the newline after the last end-of-turn is the template's, not learnt


def test_default_system_prompt_and_an_opening_assistant_turn(tok: PreTrainedTokenizerBase) -> None:
    messages = [assistant("Hi, ask me."), user("Sky?"), assistant("Blue.")]
    row = encode(tok, messages, chat_template=SYSTEM_DEFAULT)
    assert trained_runs(tok, row["input_ids"], row["labels"]) == ["Hi, ask me.<|im_end|>", "Blue.<|im_end|>"]
    assert tok.decode(row["input_ids"]).startswith("<|im_start|>system\nYou are helpful<|im_end|>")


@pytest.mark.parametrize("content", ["end", "d", "im_"])
def test_an_opening_answer_is_found_where_it_starts_not_inside_a_marker(
    tok: PreTrainedTokenizerBase, content: str
) -> None:
    # "end" is also the text just before the end of "<|im_end|>"; a search for it from the right found that
    row = encode(tok, [assistant(content), user("ok")])
    assert trained_runs(tok, row["input_ids"], row["labels"]) == [content + "<|im_end|>"]


def test_train_on_inputs_trains_every_token(tok: PreTrainedTokenizerBase) -> None:
    row = encode(tok, MULTI_TURN, train_on_inputs=True)
    assert row["labels"] == row["input_ids"]


def test_plain_text_trains_every_token_and_ends_with_eos(tok: PreTrainedTokenizerBase) -> None:
    row = encode_row({"text": "hello"}, tok, TokenizeSettings(64))
    assert row["input_ids"] == tok("hello", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert row["labels"] == row["input_ids"]
    assert row["num_targets"] == len(row["input_ids"]) - 1


# --- named and explicit templates --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "render", "trained"),
    [
        (
            "chatml",
            "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nA b<|im_end|>\n",
            ["A b<|im_end|>"],
        ),
        ("zephyr", "<|user|>\nQ<|im_end|>\n<|assistant|>\nA b<|im_end|>\n", ["A b<|im_end|>"]),
    ],
)
def test_named_templates_render_and_label_exactly(
    tok: PreTrainedTokenizerBase, name: str, render: str, trained: list[str]
) -> None:
    row = encode(tok, [user("Q"), assistant("A b")], chat_template=name)
    assert tok.decode(row["input_ids"]) == render
    assert trained_runs(tok, row["input_ids"], row["labels"]) == trained


def test_llama3_template_with_a_tokenizer_that_has_its_markers() -> None:
    tok = build_tiny_tokenizer()
    markers = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok.add_special_tokens({"additional_special_tokens": markers})
    tok.bos_token = "<|begin_of_text|>"
    tokenize_module.resolve_chat_template(tok, "llama3")  # markers are single tokens: no error
    row = encode(tok, [system("Be brief."), user("Q"), assistant("  A b  ")], chat_template="llama3")
    assert tok.decode(row["input_ids"]).startswith(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>"
    )
    assert trained_runs(tok, row["input_ids"], row["labels"]) == ["A b<|eot_id|>"]  # the template trims


def test_named_template_whose_markers_the_tokenizer_splits_is_an_error(tok: PreTrainedTokenizerBase) -> None:
    with pytest.raises(TemplateError, match=r"llama3.*<\|start_header_id\|>.*<\|eot_id\|>.*zephyr"):
        tokenize_module.resolve_chat_template(tok, "llama3")


def test_explicit_jinja_template(tok: PreTrainedTokenizerBase) -> None:
    template = (
        "{% for m in messages %}{{ '### ' + m['role'] + ': ' + m['content'] + eos_token + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### assistant: ' }}{% endif %}"
    )
    row = encode(tok, MULTI_TURN, chat_template=template)
    assert trained_runs(tok, row["input_ids"], row["labels"]) == answers(MULTI_TURN, "<|im_end|>")


def test_end_of_turn_that_is_not_eos_is_trained_up_to_the_last_non_blank(
    tok: PreTrainedTokenizerBase,
) -> None:
    template = (
        "{% for m in messages %}{{ '[' + m['role'] + '] ' + m['content'] + ' [end]\n\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '[assistant] ' }}{% endif %}"
    )
    row = encode(tok, MULTI_TURN, chat_template=template)
    assert trained_runs(tok, row["input_ids"], row["labels"]) == answers(MULTI_TURN, " [end]")


def chatml_with(last_assistant: str = "", closing: str = "") -> str:
    """ChatML whose last assistant turn opens with `last_assistant` and whose finished render ends with `closing`."""
    return (
        "{% for m in messages %}{% if m['role'] == 'assistant' and loop.last %}"
        "{{ '<|im_start|>assistant\n" + last_assistant + "' + m['content'] + '<|im_end|>\n' }}"
        "{% else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% else %}{{ '"
        + closing
        + "' }}{% endif %}"
    )


def test_a_template_that_closes_a_finished_conversation_trains_each_turn_to_its_end_marker(
    tok: PreTrainedTokenizerBase,
) -> None:
    # Phi-3's template ends a finished conversation with EOS after the last <|end|>, which a continuing one does not
    # have: every multi-turn row stopped the run, and a single turn trained the closing EOS too.
    template = chatml_with(closing="<|endoftext|>")
    for messages in (MULTI_TURN, [user("reverse: a b"), assistant("b a")]):
        row = encode(tok, messages, chat_template=template)
        assert trained_runs(tok, row["input_ids"], row["labels"]) == answers(messages, "<|im_end|>")
        assert tok.decode(row["input_ids"]).endswith("<|im_end|>\n<|endoftext|>")


def test_an_answer_quoting_the_end_of_turn_marker_is_trained_whole(tok: PreTrainedTokenizerBase) -> None:
    # The answer ended at the first end-of-turn text in it: the rest, and the real end of the turn, went untrained.
    messages = [user("How does ChatML end a turn?"), assistant("With <|im_end|>, then a newline.")]
    row = encode(tok, messages)
    assert trained_runs(tok, row["input_ids"], row["labels"]) == answers(messages, "<|im_end|>")


def test_a_template_that_renders_its_last_turn_otherwise_trains_each_turn_as_the_whole_render_has_it(
    tok: PreTrainedTokenizerBase,
) -> None:
    # Qwen3 writes an empty <think> block into the last assistant turn only: earlier turns read the same in every
    # render, the last as the whole conversation renders it.
    row = encode(tok, MULTI_TURN, chat_template=chatml_with(last_assistant="<think>\n\n</think>\n\n"))
    assert trained_runs(tok, row["input_ids"], row["labels"]) == [
        "Blue.<|im_end|>",
        "<think>\n\n</think>\n\nGreen, mostly.<|im_end|>",
    ]


@pytest.mark.parametrize("value", ["chatml2", "my template"])
def test_unknown_template_name_is_an_error_listing_the_names(
    tok: PreTrainedTokenizerBase, value: str
) -> None:
    with pytest.raises(TemplateError, match="chatml, llama3, zephyr"):
        tokenize_module.resolve_chat_template(tok, value)
    assert issubclass(TemplateError, DataError)  # the CLI reports it as a user error, not a traceback


def test_tokenizer_without_a_template_is_an_error_naming_the_fix() -> None:
    tok = build_tiny_tokenizer()
    tok.chat_template = None
    with pytest.raises(TemplateError, match="no chat template.*data.chat_template"):
        encode(tok, [user("Q"), assistant("A")])
    assert trained_runs(tok, **_ids(encode(tok, [user("Q"), assistant("A")], chat_template="zephyr"))) == [
        "A<|im_end|>"
    ]


def _ids(row: dict) -> dict:
    return {"ids": row["input_ids"], "labels": row["labels"]}


def test_template_that_does_not_grow_by_prefixes_is_an_error_naming_the_row(
    tok: PreTrainedTokenizerBase,
) -> None:
    counting = "{{ messages|length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    rows = datasets.Dataset.from_list([{"messages": MULTI_TURN, "source": "chats.jsonl:3"}])
    with pytest.raises(TemplateError, match=r"chats.jsonl:3: .*assistant turn 2"):
        tokenize_dataset(rows, tok, TokenizeSettings(64, chat_template=counting))


GEMMA_LIKE = (  # Gemma's template refuses a system turn, as Mistral's refuses turns that do not alternate
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for m in messages %}{% set r = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{{ '<start_of_turn>' + r + '\n' + m['content'] + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def test_a_row_the_template_refuses_is_an_error_naming_the_row_and_the_templates_words(
    tok: PreTrainedTokenizerBase,
) -> None:
    rows = datasets.Dataset.from_list(
        [
            {"messages": MULTI_TURN[1:], "source": "chats.jsonl:1"},
            {"messages": MULTI_TURN, "source": "chats.jsonl:2"},
        ]
    )
    with pytest.raises(TemplateError) as error:  # a DataError: the CLI prints it, no traceback
        tokenize_dataset(rows, tok, TokenizeSettings(256, chat_template=GEMMA_LIKE))
    assert str(error.value).startswith(
        "chats.jsonl:2: the chat template refuses this conversation: System role not supported. Many templates"
    )
    with pytest.raises(
        TemplateError, match=r"chats.jsonl:1: the chat template is not valid Jinja \(its line 1"
    ):
        tokenize_dataset(rows, tok, TokenizeSettings(256, chat_template="{% for m in messages %}"))


# --- tokens: the whole render, tokenised once -------------------------------------------------------------


def render(tokenizer: PreTrainedTokenizerBase, messages: list[dict], template: str, gen: bool = False) -> str:
    return tokenizer.apply_chat_template(  # type: ignore[return-value]
        messages, chat_template=template, tokenize=False, add_generation_prompt=gen
    )


def test_sentencepiece_rows_are_the_whole_render_and_train_exactly_the_answers() -> None:
    # Tokenised alone, every answer began with a word start "▁" the whole render does not have there: the model
    # learnt to open answers with a space, and later turns' prompts differed from what generation feeds it.
    tok = build_tiny_sentencepiece_tokenizer()
    zephyr = NAMED_TEMPLATES["zephyr"]  # TinyLlama-1.1B-Chat's
    for messages in [[user("Hi"), assistant("Hello")], MULTI_TURN, MULTI_TURN[1:]]:
        row = encode(tok, messages, chat_template="zephyr")
        assert row["input_ids"] == tok(render(tok, messages, zephyr), add_special_tokens=False)["input_ids"]
        assert trained_runs(tok, row["input_ids"], row["labels"]) == answers(messages, "</s>")
        for i, message in enumerate(messages):
            if message["role"] == "assistant":  # each answer follows exactly the prompt generation would feed
                prompt = tok(render(tok, messages[:i], zephyr, gen=True), add_special_tokens=False)[
                    "input_ids"
                ]
                assert row["input_ids"][: len(prompt)] == prompt
                assert row["labels"][len(prompt) - 1] == IGNORE != row["labels"][len(prompt)]
    tokens = tok.convert_ids_to_tokens(
        encode(tok, [user("Hi"), assistant("Hello")], chat_template="zephyr")["input_ids"]
    )
    assert tokens.count("▁") == 1 and tokens[0] == "▁"  # a word start opens the text, and no answer


def tokenizer_merging_newline_and_space() -> PreTrainedTokenizerFast:
    """The tiny tokenizer plus SmolLM2's merge of a newline and a space into one token, `ĊĠ`."""
    vocab = {token: i for i, token in enumerate(SPECIAL + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    core = Tokenizer(models.BPE(vocab=vocab | {"ĊĠ": len(vocab)}, merges=[("Ċ", "Ġ")]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tiny = build_tiny_tokenizer()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, chat_template=tiny.chat_template, **tiny.special_tokens_map
    )


def test_a_token_straddling_the_start_of_an_answer_is_trained() -> None:
    tok = tokenizer_merging_newline_and_space()
    messages = [user("Q"), assistant("  two")]
    row = encode(tok, messages)
    assert (
        row["input_ids"]
        == tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
    )
    # the header's newline and the answer's first space are one token: it carries answer text, so it is learnt
    assert trained_runs(tok, row["input_ids"], row["labels"]) == ["\n  two<|im_end|>"]
    assert trained_runs(tok, **_ids(encode(tok, [user("Q"), assistant("two")]))) == ["two<|im_end|>"]


def test_a_python_tokenizer_is_tokenised_turn_by_turn_where_that_is_the_whole_render() -> None:
    tok = ByT5Tokenizer()  # bytes, no character offsets; "</s>" swallows the whitespace around it
    template = (
        "{% for m in messages %}{{ '[' + m['role'] + '] ' + m['content'] + ' [end]\n\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '[assistant] ' }}{% endif %}"
    )
    row = encode(tok, MULTI_TURN, chat_template=template)
    assert row["input_ids"] == tok(render(tok, MULTI_TURN, template), add_special_tokens=False)["input_ids"]
    assert trained_runs(tok, row["input_ids"], row["labels"]) == answers(MULTI_TURN, " [end]")
    rows = datasets.Dataset.from_list([{"messages": MULTI_TURN, "source": "chats.jsonl:7"}])
    with pytest.raises(
        TemplateError, match=r"chats.jsonl:7: .*ByT5Tokenizer.*no character offsets.*fast tokenizer"
    ):
        tokenize_dataset(rows, tok, TokenizeSettings(256, chat_template="zephyr"))


# --- truncation and dropping -------------------------------------------------------------------------------


def test_truncation_right_keeps_the_start_and_left_keeps_the_end(tok: PreTrainedTokenizerBase) -> None:
    full = encode(tok, MULTI_TURN)
    n = full["length"]
    right = encode(tok, MULTI_TURN, max_seq_length=n - 5)
    left = encode(tok, MULTI_TURN, max_seq_length=n - 5, truncation_side="left")
    assert right["input_ids"] == full["input_ids"][: n - 5] and right["labels"] == full["labels"][: n - 5]
    assert left["input_ids"] == full["input_ids"][5:] and left["labels"] == full["labels"][5:]
    assert right["full_length"] == left["full_length"] == n
    assert right["length"] == left["length"] == n - 5
    assert left["num_targets"] == full["num_targets"]  # the cut came from the system prompt
    # the cut took the last answer's final "y.<|im_end|>" and the untrained newline after it
    assert right["num_targets"] == full["num_targets"] - 4


def test_examples_without_targets_are_dropped_and_counted(
    tok: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    short = tiny_chat_rows(5, seed=3, max_words=3)
    max_len = max(encode(tok, row["messages"])["length"] for row in short)  # every short row fits
    long_prompt = [user("x" * max_len), assistant("yes")]  # its answer starts after max_len tokens
    ds, _ = load_records([{"messages": long_prompt}, *short], cache_dir=tmp_path)
    kept, report = tokenize_dataset(ds, tok, TokenizeSettings(max_len))
    assert (report.rows, report.truncated, report.dropped_no_targets) == (6, 1, 1)
    assert len(kept) == 5 and min(kept["num_targets"]) > 0
    batch = collate_padded(list(kept), tok.pad_token_id)  # no batch can be all-masked, so no NaN loss
    assert int((batch["targets"] != IGNORE).sum()) == sum(kept["num_targets"])
    # Left truncation keeps the answer of the same row:
    kept, report = tokenize_dataset(ds, tok, TokenizeSettings(max_len, truncation_side="left"))
    assert (report.truncated, report.dropped_no_targets, len(kept)) == (1, 0, 6)


def test_a_validation_set_that_truncation_empties_is_an_error_naming_it(
    tok: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    # it went on as an empty set, whose loss over no tokens read as a perfect 0.0
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in tiny_chat_rows(4, seed=3, max_words=2)))
    val = tmp_path / "val.jsonl"
    val.write_text(json.dumps({"messages": [user("a long question " * 10), assistant("answer")]}) + "\n")
    with pytest.raises(DataError) as error:
        build_data(
            dataset=str(train),
            validation_file=str(val),
            validation_split=None,
            format="auto",
            bad_rows="error",
            system_prompt=None,
            data_seed=0,
            tokenizer=tok,
            settings=TokenizeSettings(48),
        )
    assert str(error.value) == (
        f"data: no validation example ({val}) has a target token left after truncation to max_seq_length=48 "
        "(truncation_side right); raise data.max_seq_length, or set data.truncation_side: left (keeps each "
        "example's end, where its answer is)"
    )


def test_bad_settings_are_errors() -> None:
    with pytest.raises(DataError, match="truncation_side"):
        TokenizeSettings(64, truncation_side="middle")


# --- caching -----------------------------------------------------------------------------------------------


def counting_encode_row(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    real: Callable[..., dict] = tokenize_module.encode_row

    def counted(*args: Any, **kwargs: Any) -> dict:
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(tokenize_module, "encode_row", counted)
    return calls


def test_second_run_reads_the_cache_and_changed_settings_tokenise_again(
    tok: PreTrainedTokenizerBase, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in tiny_chat_rows(12, seed=4)))
    calls = counting_encode_row(monkeypatch)

    def tokenise(**changes: Any) -> list[list[int]]:
        ds, _ = load_records(path, cache_dir=tmp_path / "cache")  # a fresh load, as a second run does
        kept, _ = tokenize_dataset(
            ds, build_tiny_tokenizer(), TokenizeSettings(**{"max_seq_length": 64, **changes})
        )
        return kept["input_ids"]

    first = tokenise()
    assert calls[0] == 12
    assert tokenise() == first and calls[0] == 12  # cache hit: not one row encoded
    tokenise(max_seq_length=32)
    assert calls[0] == 24
    tokenise(chat_template="zephyr")
    assert calls[0] == 36
    tokenise(chat_template="zephyr")
    assert calls[0] == 36


def test_tokenizer_fingerprint_ignores_padding_state_but_not_the_vocabulary() -> None:
    tok = build_tiny_tokenizer()
    before = tokenize_module.tokenizer_fingerprint(tok)
    tok(["a", "bbb"], padding=True, truncation=True, max_length=2)  # what generate() leaves behind
    assert tokenize_module.tokenizer_fingerprint(tok) == before
    tok.add_special_tokens({"additional_special_tokens": ["<|new|>"]})
    assert tokenize_module.tokenizer_fingerprint(tok) != before


# --- the real SmolLM2 tokenizer ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm() -> PreTrainedTokenizerBase:
    from tunewise.models.load import load_tokenizer, materialize, resolve_source

    return load_tokenizer(materialize(resolve_source("smollm2-135m-instruct")))


def smollm_conversations(tmp_path: Path) -> list[list[dict]]:
    from tunewise.data.build import builtin_files

    train, _ = builtin_files("builtin:json_extract")
    ds, _ = load_records(train, cache_dir=tmp_path)
    return ds["messages"][:200] + [r["messages"] for r in tiny_chat_rows(50)] + [MULTI_TURN, MULTI_TURN[1:]]


@pytest.mark.smollm
def test_smollm2_labels_are_exactly_the_assistant_turns(
    smollm: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    for messages in smollm_conversations(tmp_path):
        row = encode(smollm, messages)
        assert trained_runs(smollm, row["input_ids"], row["labels"]) == answers(messages, "<|im_end|>")
    # Without a system turn, SmolLM2's template adds its own, which is never trained:
    row = encode(smollm, MULTI_TURN[1:])
    assert smollm.decode(row["input_ids"]).startswith("<|im_start|>system\nYou are a helpful AI assistant")


@pytest.mark.smollm
def test_smollm2_tokens_are_the_whole_render_and_a_token_straddling_an_answer_is_trained(
    smollm: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    def ours_and_whole(messages: list[dict]) -> tuple[dict, list[int]]:
        whole = smollm(smollm.apply_chat_template(messages, tokenize=False), add_special_tokens=False)
        return encode(smollm, messages), whole["input_ids"]

    for row, whole in map(ours_and_whole, smollm_conversations(tmp_path)):
        assert row["input_ids"] == whole
    # An answer starting with whitespace is where the whole render's tokens leave the generation prompt's:
    # the header's newline merges with it (`Ċ` + `ĠĠtwo` -> `ĊĠ` + `Ġtwo`). That token carries answer
    # text, so it is trained, newline and all.
    straddling = []
    for answer in [" two", "  two spaces", "\t tab", "\n\nx", "plain"]:
        messages = [user("Q"), assistant(answer)]
        row, whole = ours_and_whole(messages)
        assert row["input_ids"] == whole
        prompt = smollm.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
        prompt_ids = smollm(prompt, add_special_tokens=False)["input_ids"]
        [trained] = trained_runs(smollm, row["input_ids"], row["labels"])
        if row["input_ids"][: len(prompt_ids)] == prompt_ids:
            assert trained == answer + "<|im_end|>"
        else:
            assert trained == "\n" + answer + "<|im_end|>"
            straddling.append(answer)
    assert straddling == ["  two spaces", "\t tab", "\n\nx"]


@pytest.mark.smollm
def test_smollm2_eos_targets_survive_padding_when_pad_is_eos(smollm: PreTrainedTokenizerBase) -> None:
    assert smollm.pad_token_id == smollm.eos_token_id  # SmolLM2 ships pad == eos == <|im_end|>
    examples = [encode(smollm, MULTI_TURN), encode(smollm, [user("Q"), assistant("A")])]
    for side in ("right", "left"):
        batch = collate_padded(examples, smollm.pad_token_id, padding_side=side)
        eos_targets = int((batch["targets"] == smollm.eos_token_id).sum())
        assert eos_targets == 3  # two turns + one turn, every end-of-turn learnt despite the padding


def test_a_long_tokenising_shows_a_bar_and_leaves_the_bars_as_they_were(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    tok = build_tiny_tokenizer()
    rows = datasets.Dataset.from_list(tiny_chat_rows(5, seed=2))
    enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # as the CLI does
    try:
        monkeypatch.setattr(tokenize_module, "LONG_TOKENISING_ROWS", 6)
        short = tokenize_module.encode_dataset(rows, tok, TokenizeSettings(64))
        assert "tokenising" not in capsys.readouterr().err
        monkeypatch.setattr(tokenize_module, "LONG_TOKENISING_ROWS", 5)
        long = tokenize_module.encode_dataset(rows, tok, TokenizeSettings(64))
        shown = capsys.readouterr().err
        assert "tokenising" in shown and "5/5" in shown
        assert not datasets.is_progress_bar_enabled()
        assert long["input_ids"] == short["input_ids"]
    finally:
        if enabled:
            datasets.enable_progress_bars()
