"""Loading training data: every format from every file type, every kind of bad row, the split, and properties."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunewise.data.load import (
    DataError,
    LoadReport,
    detect_format,
    load_records,
    split_train_validation,
)


@pytest.fixture(autouse=True)
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Work in tmp_path, so sources read "data.jsonl:2" as a user's would."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def load(sources: Any, **kwargs: Any) -> tuple[datasets.Dataset, LoadReport]:
    """load_records with the Arrow cache kept inside the test's directory."""
    return load_records(sources, cache_dir=Path.cwd() / "cache", **kwargs)


def user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


def assistant(content: str) -> dict[str, str]:
    return {"role": "assistant", "content": content}


def system(content: str) -> dict[str, str]:
    return {"role": "system", "content": content}


def write_jsonl(path: str | Path, rows: list[Any]) -> str:
    Path(path).write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def write_lines(path: str | Path, lines: list[str]) -> str:
    Path(path).write_text("".join(line + "\n" for line in lines))
    return str(path)


def write_csv(path: str, rows: list[dict[str, Any]]) -> str:
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:  # nested values go in as JSON text, the way people put conversations into CSV
            writer.writerow({k: v if isinstance(v, str) else json.dumps(v) for k, v in row.items()})
    return path


def write_parquet(path: str, rows: list[dict[str, Any]]) -> str:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_saved(path: str, rows: list[dict[str, Any]]) -> str:
    datasets.Dataset.from_list(rows).save_to_disk(path)
    return path


def write_json(path: str, rows: list[dict[str, Any]]) -> str:
    Path(path).write_text(json.dumps(rows, indent=2))
    return path


# Each file type: (writer, file name, source of the first and second row).
FILE_TYPES = {
    "jsonl": (write_jsonl, "data.jsonl", ["data.jsonl:1", "data.jsonl:2"]),
    "json": (write_json, "data.json", ["data.json:row 0", "data.json:row 1"]),
    "csv": (write_csv, "data.csv", ["data.csv:2", "data.csv:3"]),  # line 1 is the header
    "parquet": (write_parquet, "data.parquet", ["data.parquet:row 0", "data.parquet:row 1"]),
    "saved": (write_saved, "saved", ["saved:row 0", "saved:row 1"]),
}

# Each format: two input rows (same keys, so every file type can hold them) and what they become.
FORMAT_CASES: dict[str, tuple[list[dict[str, Any]], str, list[Any]]] = {
    "text": ([{"text": "Once upon a time"}, {"text": "The end."}], "text", ["Once upon a time", "The end."]),
    "prompt_completion": (
        [
            {"prompt": "2+2?", "completion": "4", "system": ""},
            {"prompt": "Hi", "completion": "Hello!", "system": "Be brief."},
        ],
        "messages",
        [[user("2+2?"), assistant("4")], [system("Be brief."), user("Hi"), assistant("Hello!")]],
    ),
    "alpaca": (
        [
            {"instruction": "Translate to French.", "input": "cheese", "output": "fromage", "system": ""},
            {"instruction": "Name a colour.", "input": "", "output": "Blue", "system": "Be brief."},
        ],
        "messages",
        [
            [user("Translate to French.\n\ncheese"), assistant("fromage")],
            [system("Be brief."), user("Name a colour."), assistant("Blue")],
        ],
    ),
    "chat": (
        [
            {"messages": [system("S"), user("a"), assistant("b"), user("c"), assistant("d")]},
            {"messages": [user("Q"), assistant("A")]},
        ],
        "messages",
        [[system("S"), user("a"), assistant("b"), user("c"), assistant("d")], [user("Q"), assistant("A")]],
    ),
    "sharegpt": (
        [
            {
                "conversations": [
                    {"from": "system", "value": "S"},
                    {"from": "human", "value": "Hi"},
                    {"from": "gpt", "value": "Yo"},
                ]
            },
            {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
        ],
        "messages",
        [[system("S"), user("Hi"), assistant("Yo")], [user("Q"), assistant("A")]],
    ),
}


@pytest.mark.parametrize("file_type", FILE_TYPES)
@pytest.mark.parametrize("fmt", FORMAT_CASES)
def test_each_format_from_each_file_type(fmt: str, file_type: str) -> None:
    rows, column, expected = FORMAT_CASES[fmt]
    writer, name, sources = FILE_TYPES[file_type]
    ds, report = load(writer(name, rows))
    assert ds.column_names == [column, "source"]
    assert ds[column] == expected
    assert ds["source"] == sources
    assert report == LoadReport(kept=2, skipped=0, reasons={}, examples=[], format=fmt)


def test_in_memory_rows_have_row_sources() -> None:
    ds, report = load([{"prompt": "p0", "completion": "c0"}, {"prompt": "p1", "completion": "c1"}])
    assert ds.to_list() == [
        {"messages": [user("p0"), assistant("c0")], "source": "row 0"},
        {"messages": [user("p1"), assistant("c1")], "source": "row 1"},
    ]
    assert report.format == "prompt_completion"


def test_several_files_of_different_formats_become_one_dataset() -> None:
    alpaca = write_jsonl("a.jsonl", [{"instruction": "I", "output": "O"}])
    pairs = write_csv("b.csv", [{"prompt": "P", "completion": "C"}])
    chat = write_parquet("c.parquet", [{"messages": [user("U"), assistant("A")]}])
    ds, report = load([alpaca, Path(pairs), chat])
    assert ds.to_list() == [
        {"messages": [user("I"), assistant("O")], "source": "a.jsonl:1"},
        {"messages": [user("P"), assistant("C")], "source": "b.csv:2"},
        {"messages": [user("U"), assistant("A")], "source": "c.parquet:row 0"},
    ]
    assert report.format == "alpaca+prompt_completion+chat"


def test_text_and_chat_files_cannot_be_mixed() -> None:
    text = write_jsonl("t.jsonl", [{"text": "x"}])
    chat = write_jsonl("c.jsonl", [{"messages": [user("u"), assistant("a")]}])
    with pytest.raises(
        DataError, match=r"Cannot mix plain text and chat-like data.*t.jsonl is text, c.jsonl is chat"
    ):
        load([text, chat])


def test_system_precedence_row_turn_then_column_then_argument() -> None:
    rows = [
        {"messages": [system("own"), user("u"), assistant("a")], "system": "column"},
        {"messages": [user("u"), assistant("a")], "system": "column"},
        {"messages": [user("u"), assistant("a")], "system": " "},
        {"messages": [user("u"), assistant("a")]},
    ]
    ds, _ = load(rows, system_prompt="argument")
    assert [m[0]["content"] for m in ds["messages"]] == ["own", "column", "argument", "argument"]


def test_system_prompt_is_rejected_for_plain_text() -> None:
    with pytest.raises(DataError, match="system prompt applies only to chat-like data"):
        load([{"text": "x"}], system_prompt="Be nice.")


def test_a_chat_template_is_rejected_for_plain_text_as_a_system_prompt_is() -> None:
    """Text rows are tokenised as they are: a chat template there was silently ignored."""
    with pytest.raises(
        DataError, match="chat template applies only to chat-like data.*remove data.chat_template"
    ):
        load([{"text": "x"}], chat_template="zephyr")
    with pytest.raises(DataError, match="remove data.system_prompt and data.chat_template"):
        load([{"text": "x"}], system_prompt="Be nice.", chat_template="zephyr")
    ds, _ = load([{"prompt": "p", "completion": "c"}], chat_template="zephyr")  # chat-like: fine
    assert len(ds) == 1


def test_json_wrapper_object_and_json_lines_named_json() -> None:
    Path("wrapped.json").write_text(json.dumps({"data": [{"text": "a"}, {"text": "b"}]}))
    write_jsonl("lines.json", [{"text": "c"}, {"text": "d"}])
    ds, _ = load(["wrapped.json", "lines.json"])
    assert ds.to_list() == [
        {"text": "a", "source": "wrapped.json:row 0"},
        {"text": "b", "source": "wrapped.json:row 1"},
        {"text": "c", "source": "lines.json:1"},
        {"text": "d", "source": "lines.json:2"},
    ]


def test_a_json_file_holding_one_row_is_that_row_not_a_wrapper() -> None:
    # {"messages": [...]} has one key holding a list, like the wrapper {"data": [...]}; its key is a format's
    Path("one.json").write_text(json.dumps({"messages": [user("hi"), assistant("yo")]}))
    ds, report = load("one.json")
    assert ds.to_list() == [{"messages": [user("hi"), assistant("yo")], "source": "one.json:row 0"}]
    assert report.format == "chat"


def test_blank_lines_are_skipped_and_line_numbers_stay_true() -> None:
    write_lines("d.jsonl", ["", json.dumps({"text": "a"}), "   ", json.dumps({"text": "b"})])
    ds, _ = load("d.jsonl")
    assert ds["source"] == ["d.jsonl:2", "d.jsonl:4"]


def test_format_can_be_forced_and_settles_ambiguity() -> None:
    rows = [{"text": "full text", "instruction": "I", "output": "O"}]  # e.g. tatsu-lab/alpaca has all three
    with pytest.raises(DataError, match=r"match several formats \(text, alpaca\)"):
        load(rows)
    ds, report = load(rows, format="alpaca")
    assert ds["messages"] == [[user("I"), assistant("O")]]
    assert report.format == "alpaca"


@pytest.mark.parametrize(
    ("columns", "expected"),
    [
        (["text"], "text"),
        (["prompt", "completion", "id"], "prompt_completion"),
        (["instruction", "input", "output"], "alpaca"),
        (["messages", "system"], "chat"),
        (["conversations"], "sharegpt"),
    ],
)
def test_detect_format(columns: list[str], expected: str) -> None:
    assert detect_format(columns) == expected


def test_unknown_columns_error_lists_columns_and_every_format() -> None:
    with pytest.raises(DataError) as error:
        detect_format(["question", "answer"], where="qa.jsonl")
    assert str(error.value) == textwrap.dedent("""\
        Cannot tell the format of qa.jsonl: its columns ['answer', 'question'] match no known format.
        Known formats and the columns each needs:
          text: text
          prompt_completion: prompt, completion (optional: system)
          alpaca: instruction, output (optional: input, system)
          chat: messages (optional: system)
          sharegpt: conversations (optional: system)
        Rename the columns, or set data.format (format= in Python) to one of: \
text, prompt_completion, alpaca, chat, sharegpt.""")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"format": "openai"}, "Unknown data format 'openai'; use 'auto' or one of: text, prompt_completion"),
        ({"bad_rows": "ignore"}, "Unknown bad_rows policy 'ignore'; use one of: error, skip"),
    ],
)
def test_bad_options(kwargs: dict[str, str], message: str) -> None:
    with pytest.raises(DataError, match=message):
        load([{"text": "x"}], **kwargs)


# --- bad rows -------------------------------------------------------------------------------------------------

CHAT_OK = json.dumps({"messages": [user("hi"), assistant("hello")]})


def chat_line(*turns: Any) -> str:
    return json.dumps({"messages": list(turns)})


# (a valid row that fixes the format, a bad row, what is wrong with it, the reason counted)
BAD_ROWS = {
    "malformed json": (
        CHAT_OK,
        '{"messages": [',
        "invalid JSON: Expecting value (column 15)",
        "invalid JSON",
    ),
    "not an object": (
        CHAT_OK,
        "[1, 2]",
        "the row must be an object with the chat columns, got list",
        "not an object",
    ),
    "missing field": (
        CHAT_OK,
        chat_line(user("hi"), {"role": "assistant"}),
        "field 'messages[1].content' is missing",
        "missing field",
    ),
    "null field": (CHAT_OK, '{"messages": null}', "field 'messages' is null", "missing field"),
    "missing column": (CHAT_OK, '{"message": []}', "field 'messages' is missing", "missing field"),
    "content is a number": (
        CHAT_OK,
        chat_line(user("hi"), assistant(42)),  # type: ignore[arg-type]
        "field 'messages[1].content' must be a string, got number (42)",
        "wrong type",
    ),
    "content is a list": (
        CHAT_OK,
        chat_line(user([{"type": "text", "text": "hi"}]), assistant("a")),  # type: ignore[arg-type]
        """field 'messages[0].content' must be a string, got list ([{"type": "text", "text": "hi"}])""",
        "wrong type",
    ),
    "messages is a string": (
        CHAT_OK,
        '{"messages": "hi"}',
        "field 'messages' must be a list of {role, content} objects, got string",
        "wrong type",
    ),
    "turn is not an object": (
        CHAT_OK,
        chat_line("hi", assistant("a")),
        "field 'messages[0]' must be a {role, content} object, got string",
        "wrong type",
    ),
    "empty content": (
        CHAT_OK,
        chat_line(user(""), assistant("a")),
        "field 'messages[0].content' is empty",
        "empty",
    ),
    "blank content": (
        CHAT_OK,
        chat_line(user("q"), assistant(" \n")),
        "field 'messages[1].content' is only whitespace",
        "empty",
    ),
    "empty conversation": (
        CHAT_OK,
        '{"messages": []}',
        "field 'messages' is an empty list",
        "empty",
    ),
    "unknown role": (
        CHAT_OK,
        chat_line(user("q"), {"role": "tool", "content": "{}"}, assistant("a")),
        "field 'messages[1].role' is 'tool'; expected one of system, user, assistant",
        "unknown role",
    ),
    "no assistant turn": (
        CHAT_OK,
        chat_line(system("s"), user("q")),
        "field 'messages' has no assistant turn, so there is nothing to learn",
        "no assistant turn",
    ),
    "late system turn": (
        CHAT_OK,
        chat_line(user("q"), system("s"), assistant("a")),
        "field 'messages[1]' is a system turn; only the first turn may be one",
        "misplaced system",
    ),
    "lone surrogate": (
        CHAT_OK,
        '{"messages": [{"role": "user", "content": "cut \\ud83d"}, {"role": "assistant", "content": "a"}]}',
        "field 'messages[0].content' contains a lone surrogate (broken Unicode escape)",
        "invalid text",
    ),
    "sharegpt unknown speaker": (
        json.dumps({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}),
        json.dumps({"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]}),
        "field 'conversations[1].from' is 'bot'; expected one of human, gpt, system",
        "unknown role",
    ),
    "completion missing": (
        json.dumps({"prompt": "p", "completion": "c"}),
        json.dumps({"prompt": "p"}),
        "field 'completion' is missing",
        "missing field",
    ),
    "alpaca output is a number": (
        json.dumps({"instruction": "i", "output": "o"}),
        json.dumps({"instruction": "i", "output": 3.5}),
        "field 'output' must be a string, got number (3.5)",
        "wrong type",
    ),
    "alpaca input is a list": (
        json.dumps({"instruction": "i", "output": "o"}),
        json.dumps({"instruction": "i", "input": ["a"], "output": "o"}),
        """field 'input' must be a string, got list (["a"])""",
        "wrong type",
    ),
    "empty text": (json.dumps({"text": "t"}), json.dumps({"text": ""}), "field 'text' is empty", "empty"),
    "bad UTF-8": (
        json.dumps({"text": "t"}),
        "\udcff",
        "not valid UTF-8 (invalid start byte at byte 0 of the line)",
        "invalid JSON",
    ),
}


def write_case(good: str, bad: str) -> str:
    # surrogateescape lets a case hold raw bytes that are not UTF-8
    Path("data.jsonl").write_bytes(f"{good}\n{bad}\n{good}\n".encode("utf-8", "surrogateescape"))
    return "data.jsonl"


@pytest.mark.parametrize("case", BAD_ROWS)
def test_bad_row_is_an_error_naming_line_and_field(case: str) -> None:
    good, bad, problem, reason = BAD_ROWS[case]
    with pytest.raises(DataError) as error:
        load(write_case(good, bad))
    assert str(error.value) == (
        f"Bad rows: 1 of 3 (1 {reason}):\n"
        f"  data.jsonl:2: {problem}\n"
        "Fix these rows, or set data.bad_rows: skip (bad_rows='skip' in Python) to drop them and go on."
    )


@pytest.mark.parametrize("case", BAD_ROWS)
def test_bad_row_is_dropped_and_counted_under_skip(case: str) -> None:
    good, bad, problem, reason = BAD_ROWS[case]
    ds, report = load(write_case(good, bad), bad_rows="skip")
    assert ds["source"] == ["data.jsonl:1", "data.jsonl:3"]
    assert report.kept == 2
    assert report.skipped == 1
    assert report.reasons == {reason: 1}
    assert report.examples == [f"data.jsonl:2: {problem}"]
    assert report.summary().splitlines()[1:] == [f"  data.jsonl:2: {problem}"]


def test_many_bad_rows_are_reported_together_with_a_count_of_the_rest() -> None:
    lines = [CHAT_OK] + ["oops"] * 5 + [chat_line(user("q"))] * 20
    with pytest.raises(DataError) as error:
        load(write_lines("many.jsonl", lines))
    message = str(error.value).splitlines()
    assert message[0] == "Bad rows: 25 of 26 (20 no assistant turn, 5 invalid JSON):"
    assert message[1:6] == [
        f"  many.jsonl:{n}: invalid JSON: Expecting value (column 1)" for n in range(2, 7)
    ]
    assert (
        message[6] == "  many.jsonl:7: field 'messages' has no assistant turn, so there is nothing to learn"
    )
    assert message[11] == "  ... and 15 more"
    assert len(message) == 13


def test_bad_csv_cell_names_line_and_column() -> None:
    Path("c.csv").write_text('messages\n"[{""role"": ""user"", ""content"": ""q""}]"\n[oops\n')
    with pytest.raises(DataError) as error:
        load("c.csv")
    assert "  c.csv:2: field 'messages' has no assistant turn" in str(error.value)
    assert "  c.csv:3: field 'messages' must hold a JSON array of turns (Expecting value" in str(error.value)


def test_csv_row_with_more_cells_than_the_header_is_a_bad_row() -> None:
    # an unquoted comma splits a text in two; the second half used to vanish without a word
    Path("c.csv").write_text("prompt,completion\nWhat is 2+2?,It is 4, obviously.\nHi,Hello\n")
    problem = (
        "c.csv:2: has 1 more cell than the header (2 columns: prompt, completion); is there an unquoted "
        "comma in a text? Put texts with commas in double quotes"
    )
    with pytest.raises(DataError) as error:
        load("c.csv")
    assert str(error.value).splitlines()[:2] == ["Bad rows: 1 of 2 (1 extra cells):", f"  {problem}"]
    ds, report = load("c.csv", bad_rows="skip")
    assert ds["source"] == ["c.csv:3"] and report.examples == [problem]
    Path("q.csv").write_text('prompt,completion\nWhat is 2+2?,"It is 4, obviously."\n')
    assert load("q.csv")[0]["messages"][0][1] == assistant("It is 4, obviously.")


def test_csv_records_are_named_by_the_line_they_start_on() -> None:
    Path("m.csv").write_text('prompt,completion\n"line one\nline two",\n\nq,a\n"open\nnever closed,x\n')
    with pytest.raises(DataError) as error:
        load("m.csv")
    assert str(error.value).startswith(
        "m.csv:6: cannot read CSV (unexpected end of data, in the record on lines 6-7)."
    )
    Path("m.csv").write_text('prompt,completion\n"line one\nline two",\n\nq,a\n')
    _, report = load("m.csv", bad_rows="skip")
    assert report.examples == ["m.csv:2: field 'completion' is empty"]


@pytest.mark.parametrize("bad_rows", ["error", "skip"])
def test_a_bad_first_row_is_a_bad_row_not_an_unknown_format(bad_rows: str) -> None:
    write_jsonl("first.jsonl", [{"prompt": "q"}, {"prompt": "p", "completion": "c"}])
    Path("first.csv").write_text("prompt,completion\nq\np,c\n")
    for name, line in [("first.jsonl", 1), ("first.csv", 2)]:
        problem = f"{name}:{line}: field 'completion' is missing"
        if bad_rows == "error":
            with pytest.raises(DataError, match=f"Bad rows: 1 of 2 \\(1 missing field\\):\n  {problem}"):
                load(name)
            continue
        ds, report = load(name, bad_rows="skip")
        assert (len(ds), report.format, report.examples) == (1, "prompt_completion", [problem])


def test_a_file_where_no_row_has_a_formats_columns_shows_the_first_rows() -> None:
    write_jsonl("qa.jsonl", [{"question": "q"}, {"question": "q", "answer": "a"}])
    with pytest.raises(DataError) as error:
        load("qa.jsonl", bad_rows="skip")
    assert str(error.value).startswith(
        "Cannot tell the format of qa.jsonl (no row has a format's columns; its first row's): its columns "
        "['question'] match no known format."
    )


def test_bad_parquet_row_names_row() -> None:
    write_parquet("p.parquet", [{"prompt": "p", "completion": "c"}, {"prompt": "p", "completion": None}])
    _, report = load("p.parquet", bad_rows="skip")
    assert report.examples == ["p.parquet:row 1: field 'completion' is null"]


def test_repeated_loads_of_bad_data_keep_failing() -> None:
    write_case(CHAT_OK, "oops")
    for _ in range(2):  # a failed load must not leave a cache entry that a second load would trust
        with pytest.raises(DataError, match="data.jsonl:2: invalid JSON"):
            load("data.jsonl")


# --- inputs that are always errors ----------------------------------------------------------------------------


def test_missing_file(in_tmp: Path) -> None:
    with pytest.raises(DataError) as error:
        load("nope.jsonl", bad_rows="skip")
    assert str(error.value) == (
        f"nope.jsonl does not exist (looked for {in_tmp / 'nope.jsonl'}); check the path "
        f"(relative paths start from {in_tmp})."
    )


@pytest.mark.parametrize(
    ("content", "name", "message"),
    [
        ("", "e.jsonl", "e.jsonl is empty (0 bytes); nothing to train on. Check the path or remove it."),
        ("\n  \n", "e.jsonl", "e.jsonl has no rows; nothing to train on. Check the path or remove it."),
        ("text\n", "e.csv", "e.csv has no rows; nothing to train on. Check the path or remove it."),
        ("[]", "e.json", "e.json has no rows; nothing to train on. Check the path or remove it."),
        ("oops\n[1]\n", "e.jsonl", "e.jsonl: no row is an object with named fields; is this the right file?"),
        (
            "hello",
            "e.txt",
            "e.txt: unsupported file type '.txt'; use one of .jsonl, .json, .csv, .parquet, or a",
        ),
        ('{"a": 1, "b": [1]}', "e.json", "e.json: expected a JSON array of rows, or an object with one key"),
        (
            '[{"text": "a"},',
            "e.json",
            "e.json:1: invalid JSON: Expecting value (column 16). A .json file holds",
        ),
        ('text\n"quoted"tail\n', "e.csv", "e.csv:2: cannot read CSV (',' expected after '\"')."),
    ],
)
def test_unreadable_files_are_errors_even_under_skip(content: str, name: str, message: str) -> None:
    Path(name).write_text(content)
    with pytest.raises(DataError) as error:
        load(name, bad_rows="skip")
    assert str(error.value).startswith(message)


def test_file_without_a_valid_row_is_an_error_under_skip() -> None:
    good = write_jsonl("good.jsonl", [{"text": "a"}])
    bad = write_jsonl("bad.jsonl", [{"text": ""}, {"text": 1}])
    with pytest.raises(DataError) as error:
        load([good, bad], bad_rows="skip")
    assert str(error.value) == (
        "bad.jsonl has no valid rows (format text); the first problem: bad.jsonl:1: field 'text' is empty. "
        "Is this the right file and format?"
    )


def test_folders_that_save_to_disk_did_not_write() -> None:
    Path("plain").mkdir()
    with pytest.raises(
        DataError, match="plain is a folder, but not one written by datasets.Dataset.save_to_disk"
    ):
        load("plain")
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list([{"text": "a"}])})
    splits.save_to_disk("dict")
    with pytest.raises(DataError, match=r"dict holds several splits \['train'\]; point at one split folder"):
        load("dict")


def test_rows_and_paths_cannot_be_mixed() -> None:
    with pytest.raises(DataError, match="must all be paths or all be dicts"):
        load([{"text": "a"}, "b.jsonl"])
    with pytest.raises(DataError, match="No data given"):
        load([])


# --- caching --------------------------------------------------------------------------------------------------


def test_a_changed_file_is_read_again() -> None:
    write_jsonl("d.jsonl", [{"text": "aaa"}])
    assert load("d.jsonl")[0]["text"] == ["aaa"]
    write_jsonl("d.jsonl", [{"text": "bbb"}])  # same size: only the mtime tells
    assert load("d.jsonl")[0]["text"] == ["bbb"]


def test_a_cache_hit_returns_the_same_rows_and_report() -> None:
    write_lines("d.jsonl", [json.dumps({"text": "a"}), "oops"])
    first, first_report = load("d.jsonl", bad_rows="skip")
    second, second_report = load("d.jsonl", bad_rows="skip")
    assert second.cache_files == first.cache_files
    example = "d.jsonl:2: invalid JSON: Expecting value (column 1)"
    assert second_report == first_report == LoadReport(1, 1, {"invalid JSON": 1}, [example], "text")
    Path(first.cache_files[0]["filename"]).with_name("tunewise_load_report.json").unlink()
    assert load("d.jsonl", bad_rows="skip")[1] == first_report  # recounted when the report went missing


# --- validation split -----------------------------------------------------------------------------------------


@pytest.fixture
def hundred() -> datasets.Dataset:
    return load([{"text": f"row {i}"} for i in range(100)])[0]


@pytest.mark.parametrize(("split", "val_rows"), [(0.1, 10), (0.25, 25), (0.001, 1), (7, 7), (99, 99)])
def test_split_sizes_and_disjoint(hundred: datasets.Dataset, split: float, val_rows: int) -> None:
    train, val = split_train_validation(hundred, split, seed=0)
    assert val is not None
    assert (len(train), len(val)) == (100 - val_rows, val_rows)
    assert set(train["text"]).isdisjoint(val["text"])
    assert set(train["text"]) | set(val["text"]) == set(hundred["text"])


def test_split_is_deterministic_per_seed(hundred: datasets.Dataset) -> None:
    val = split_train_validation(hundred, 0.2, seed=1)[1]
    again = split_train_validation(hundred, 0.2, seed=1)[1]
    other = split_train_validation(hundred, 0.2, seed=2)[1]
    assert val is not None and again is not None and other is not None
    assert val["source"] == again["source"]
    assert set(val["source"]) != set(other["source"])


@pytest.mark.parametrize("split", [None, 0, 0.0])
def test_no_split(hundred: datasets.Dataset, split: float | None) -> None:
    train, val = split_train_validation(hundred, split, seed=0)
    assert val is None
    assert train["text"] == hundred["text"]


@pytest.mark.parametrize(
    ("split", "message"),
    [
        (100, "validation_split=100 takes 100 of 100 rows for validation, leaving none to train on"),
        (0.9999, "validation_split=0.9999 takes 100 of 100 rows for validation, leaving none to train on"),
        (1.0, "validation_split=1.0 must be a fraction between 0 and 1, or a whole number of rows"),
        (-3, "validation_split=-3 must not be negative"),
        (True, "validation_split must be a fraction in (0, 1) or a row count, got True"),
        ("0.1", "validation_split must be a fraction in (0, 1) or a row count, got '0.1'"),
    ],
)
def test_degenerate_splits_are_errors(hundred: datasets.Dataset, split: Any, message: str) -> None:
    with pytest.raises(DataError) as error:
        split_train_validation(hundred, split, seed=0)
    assert str(error.value).startswith(message)


# --- properties -----------------------------------------------------------------------------------------------

ROLES = {"system", "user", "assistant"}


def assert_normalised(ds: datasets.Dataset) -> None:
    """The promise every consumer relies on, checked row by row."""
    assert ds.column_names in (["messages", "source"], ["text", "source"])
    for row in ds:
        assert isinstance(row["source"], str) and row["source"]
        if "text" in row:
            assert isinstance(row["text"], str) and row["text"].strip()
            continue
        roles = [turn["role"] for turn in row["messages"]]
        assert set(roles) <= ROLES and "assistant" in roles
        assert "system" not in roles[1:]
        for turn in row["messages"]:
            assert isinstance(turn["content"], str)
            assert turn["role"] == "system" or turn["content"].strip()


KEYS = st.sampled_from(
    ["text", "prompt", "completion", "instruction", "input", "output", "system"]
    + ["messages", "conversations", "role", "content", "from", "value"]
)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.sampled_from(["user", "assistant", "system", "human", "gpt", "tool", "", " "])
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(KEYS | st.text(max_size=3), inner, max_size=4)
    ),
    max_leaves=12,
)
ROW_DICTS = st.dictionaries(KEYS | st.text(max_size=4), JSON_VALUES, max_size=5)
RAW_LINES = st.binary(max_size=20).filter(lambda b: b"\n" not in b)
PROPERTY_SETTINGS = settings(
    max_examples=60,
    deadline=None,
    # the autouse in_tmp fixture is not shared between examples: each one loads from its own TemporaryDirectory
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def load_lines(lines: list[bytes], bad_rows: str, format: str = "auto") -> datasets.Dataset | None:
    """Write lines to a fresh JSONL file and load them; None for a clean DataError."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "p.jsonl"
        path.write_bytes(b"".join(line + b"\n" for line in lines))
        try:
            ds, report = load_records(path, format=format, bad_rows=bad_rows, cache_dir=Path(tmp) / "cache")
        except DataError:
            return None
        assert_normalised(ds)
        assert report.kept == len(ds)
        return ds


@PROPERTY_SETTINGS
@given(data=st.data(), fmt=st.sampled_from(list(FORMAT_CASES)), bad_rows=st.sampled_from(["error", "skip"]))
def test_random_rows_load_clean_or_fail_clean(data: st.DataObject, fmt: str, bad_rows: str) -> None:
    # valid rows among the random ones, so that detection passes and the random rows reach row validation
    valid = st.sampled_from(FORMAT_CASES[fmt][0])
    lines = data.draw(
        st.lists((valid | ROW_DICTS).map(lambda row: json.dumps(row).encode()) | RAW_LINES, max_size=6)
    )
    load_lines(lines, bad_rows, format=data.draw(st.sampled_from(["auto", fmt])))


CHAT_LIKE = [fmt for fmt in FORMAT_CASES if fmt != "text"]


@st.composite
def mutated(draw: st.DrawFn, row: dict[str, Any]) -> dict[str, Any]:
    """A valid row with one value somewhere inside it replaced by random JSON, or a key dropped."""
    row = json.loads(json.dumps(row))
    node: Any = row
    while True:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        key = draw(st.sampled_from(keys))
        if isinstance(node[key], dict | list) and node[key] and draw(st.booleans()):
            node = node[key]
            continue
        if isinstance(node, dict) and draw(st.booleans()):
            del node[key]
        else:
            node[key] = draw(JSON_VALUES)
        return row


@PROPERTY_SETTINGS
@given(data=st.data(), fmt=st.sampled_from(CHAT_LIKE), bad_rows=st.sampled_from(["error", "skip"]))
def test_mutated_rows_never_break_the_schema(data: st.DataObject, fmt: str, bad_rows: str) -> None:
    valid_rows, _, expected = FORMAT_CASES[fmt]
    picks = data.draw(st.lists(st.integers(0, len(valid_rows) - 1), min_size=1, max_size=4))
    rows = [
        data.draw(mutated(valid_rows[i]) if data.draw(st.booleans()) else st.just(valid_rows[i]))
        for i in picks
    ]
    ds = load_lines([json.dumps(row).encode() for row in rows], bad_rows)
    if ds is None:
        return
    by_line = {
        int(source.rsplit(":", 1)[1]): messages for source, messages in zip(ds["source"], ds["messages"])
    }
    for line, (i, row) in enumerate(zip(picks, rows, strict=True), 1):
        if row == valid_rows[i]:  # a valid row is never dropped and always comes out the same
            assert by_line[line] == expected[i]
    if bad_rows == "error":
        assert len(ds) == len(rows)


# --- scale ----------------------------------------------------------------------------------------------------

# Measured on the dev box, as anonymous memory (RssAnon: heap and Arrow buffers; the memory-mapped Arrow cache is
# page cache and does not count): the load grows it by ~3 MB at 100k rows and ~6 MB at 1M; a Python list of just the
# parsed JSON rows costs ~44 MB at 100k. 20 MB lies between.
MAX_ANON_GROWTH_MB = 20

MEASURE = """
import sys, threading, time
from tunewise.data.load import load_records

def anon_mb():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssAnon:")) / 1024

before = peak = anon_mb()
loading = True

def watch():  # a list of all rows would stay until the load ends, so sampling cannot miss it
    global peak
    while loading:
        peak = max(peak, anon_mb())
        time.sleep(0.005)

watcher = threading.Thread(target=watch)
watcher.start()
ds, report = load_records(sys.argv[1], cache_dir=sys.argv[2])
loading = False
watcher.join()
print(len(ds), report.kept, ds[-1]["source"], round(peak - before))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RssAnon from Linux /proc")
@pytest.mark.parametrize("rows", [100_000, pytest.param(1_000_000, marks=pytest.mark.slow)])
def test_large_jsonl_streams_without_a_python_list_of_rows(in_tmp: Path, rows: int) -> None:
    with open("big.jsonl", "w") as file:
        file.writelines(f'{{"prompt": "question {i}", "completion": "answer {i}"}}\n' for i in range(rows))
    result = subprocess.run(  # a fresh process, so the memory measured is this load's alone
        [sys.executable, "-c", MEASURE, "big.jsonl", str(in_tmp / "cache")],
        capture_output=True,
        text=True,
        check=True,
    )
    loaded, kept, last_source, grown_mb = result.stdout.split()
    assert (int(loaded), int(kept), last_source) == (rows, rows, f"big.jsonl:{rows}")
    assert int(grown_mb) < MAX_ANON_GROWTH_MB
