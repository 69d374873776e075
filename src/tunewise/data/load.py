"""Read training data in any common shape into one normalised `datasets.Dataset`.

The dataset has exactly one of two schemas, plus `source`:

- chat-like:  `messages`: list of {"role": str, "content": str}, roles in system/user/assistant, at least one
  assistant turn, user and assistant content never empty or blank, a system message only as the first turn;
- plain text: `text`: a non-blank str (loss on every token later);
- `source`: where the row came from, for errors and logs downstream. "file:line" for JSONL and CSV (lines count
  from 1, as in an editor); "file:row N" for JSON arrays, Parquet and save_to_disk folders and "row N" for
  in-memory lists (rows count from 0, like `ds[N]`).

Input formats, detected from each file's columns (a CSV file's header; for other files the keys of the first row
that has a format's columns, so a bad first row is a bad row like any other), or forced with `format=`:

    format             columns                          becomes
    text               text                             text
    prompt_completion  prompt, completion               [user: prompt, assistant: completion]
    alpaca             instruction, output, [input]     [user: instruction + "\\n\\n" + input, assistant: output]
                                                         (just the instruction when input is absent or blank)
    chat               messages: [{role, content}]      as is (OpenAI style)
    sharegpt           conversations: [{from, value}]   human -> user, gpt -> assistant, system -> system

Other columns are ignored. For chat-like formats a `system` column, or else the `system_prompt` argument, adds
a leading system message; a row whose conversation already starts with a system message keeps its own.
Values are never coerced: a number where text belongs is a bad row, not a string.

Rows stream one at a time through a generator into `Dataset.from_generator`, which writes Arrow to the cache,
so a million-row JSONL file is never a Python list. The cache is keyed on each file's path, size and mtime, the
options and this module's source, so an edited file or edited loader is read again.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
from collections import Counter
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
import pyarrow
import pyarrow.parquet as pq
from datasets.exceptions import DatasetGenerationError
from datasets.fingerprint import Hasher

FORMATS: dict[str, tuple[str, ...]] = {
    "text": ("text",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "chat": ("messages",),
    "sharegpt": ("conversations",),
}
"""Each input format and the columns it needs."""
OPTIONAL_COLUMNS: dict[str, tuple[str, ...]] = {
    "text": (),
    "prompt_completion": ("system",),
    "alpaca": ("input", "system"),
    "chat": ("system",),
    "sharegpt": ("system",),
}
BAD_ROW_POLICIES = ("error", "skip")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
MAX_SHOWN = 10
"""Problems listed in one error or report; the rest are counted."""

_MESSAGE = {"role": datasets.Value("string"), "content": datasets.Value("string")}
_FEATURES = {
    "messages": datasets.Features({"messages": datasets.List(_MESSAGE), "source": datasets.Value("string")}),
    "text": datasets.Features({"text": datasets.Value("string"), "source": datasets.Value("string")}),
}
_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
_REPORT_FILE = "tunewise_load_report.json"
# Rows normalised by an older version of this file must not come back from the cache.
_CODE_VERSION = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]

Message = dict[str, str]
Rows = Generator[tuple[str, Any], None, None]
"""(source, row) pairs; a row that could not even be parsed arrives as a `_BadRow`."""


class DataError(ValueError):
    """Bad training data or data settings; the message says what, where, and what to do."""


@dataclass(frozen=True)
class LoadReport:
    """What `load_records` kept and dropped, for the CLI to print."""

    kept: int
    """Rows in the returned dataset."""
    skipped: int
    """Bad rows dropped (always 0 under bad_rows="error", which raises instead)."""
    reasons: dict[str, int]
    """Skipped rows counted by reason, e.g. {"wrong type": 2, "invalid JSON": 1}."""
    examples: list[str]
    """The first few problems, each starting with its source ("train.jsonl:7: ...")."""
    format: str
    """Input format; several joined with "+" when files differ (e.g. "alpaca+chat")."""

    def summary(self) -> str:
        """One line per fact, for the CLI."""
        text = f"Loaded {self.kept} rows (format {self.format})"
        if not self.skipped:
            return text + "."
        lines = [f"{text}; skipped {self.skipped} bad rows ({_count_reasons(self.reasons)}):"]
        lines += [f"  {example}" for example in self.examples]
        if rest := self.skipped - len(self.examples):
            lines.append(f"  ... and {rest} more")
        return "\n".join(lines)


def load_records(
    sources: str | Path | Sequence[str | Path] | Sequence[dict[str, Any]],
    *,
    format: str = "auto",
    bad_rows: str = "error",
    system_prompt: str | None = None,
    chat_template: str | None = None,
    cache_dir: str | Path | None = None,
) -> tuple[datasets.Dataset, LoadReport]:
    """Read files (JSONL, JSON, CSV, Parquet, save_to_disk folders) or in-memory rows into one normalised dataset.

    `bad_rows="error"` raises one `DataError` listing the first problems; `"skip"` drops bad rows and counts them
    in the report. A missing or empty file, or one without a single valid row, is an error either way.
    `chat_template` only shapes tokenisation (data/tokenize.py); here, like `system_prompt`, it is refused for
    plain text. `cache_dir` defaults to the `datasets` cache.
    """
    _check_options(format, bad_rows)
    plan = [(item, _input_format(item, format)) for item in _inputs(sources)]
    kind = _output_kind(plan, system_prompt, chat_template)
    scan = _Scan(bad_rows)

    def generate() -> Iterator[dict[str, Any]]:
        return _generate(plan, scan, system_prompt)

    fingerprint = _fingerprint(plan, bad_rows, system_prompt)
    ds = _build(generate, kind, fingerprint, cache_dir)
    report_path = Path(ds.cache_files[0]["filename"]).with_name(_REPORT_FILE)
    if not scan.ran and report_path.exists():  # a cache hit: the generator did not run
        return ds, LoadReport(**json.loads(report_path.read_text()))
    if not scan.ran:  # cached rows without their report: count again, without writing rows
        for _ in generate():
            pass
    report = scan.report("+".join(dict.fromkeys(fmt for _, fmt in plan)))
    report_path.write_text(json.dumps(asdict(report)))
    return ds, report


def detect_format(columns: Iterable[str], *, where: str = "the data") -> str:
    """The one input format whose required columns are all present; a `DataError` if none or several match."""
    present = set(columns)
    matches = [name for name, required in FORMATS.items() if present.issuperset(required)]
    if len(matches) == 1:
        return matches[0]
    verdict = f"match several formats ({', '.join(matches)})" if matches else "match no known format"
    raise DataError(
        f"Cannot tell the format of {where}: its columns {sorted(present)} {verdict}.\n"
        f"Known formats and the columns each needs:\n{_format_table()}\n"
        f"Rename the columns, or set data.format (format= in Python) to one of: {', '.join(FORMATS)}."
    )


def split_train_validation(
    ds: datasets.Dataset,
    validation_split: float | int | None,  # noqa: PYI041 - an int counts rows, a float is a fraction
    seed: int,
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """Hold out a seeded random validation set: a fraction in (0, 1) (rounded up) or a row count; None or 0: none."""
    val_rows = _validation_rows(len(ds), validation_split)
    if val_rows == 0:
        return ds, None
    parts = ds.train_test_split(test_size=val_rows, seed=seed)
    return parts["train"], parts["test"]


# --- options and inputs ---------------------------------------------------------------------------------------


def _check_options(format: str, bad_rows: str) -> None:
    if format != "auto" and format not in FORMATS:
        raise DataError(f"Unknown data format {format!r}; use 'auto' or one of: {', '.join(FORMATS)}.")
    if bad_rows not in BAD_ROW_POLICIES:
        raise DataError(f"Unknown bad_rows policy {bad_rows!r}; use one of: {', '.join(BAD_ROW_POLICIES)}.")


@dataclass(frozen=True)
class _Input:
    name: str
    """How the user named it; prefixes every `source`."""
    rows: Callable[[], Rows]
    """Opens a fresh pass over the rows."""
    fingerprint: str
    header: Callable[[], list[str]] | None = None
    """The column names of a file that declares them (CSV); detection reads them rather than a row."""


def _inputs(sources: str | Path | Sequence[str | Path] | Sequence[dict[str, Any]]) -> list[_Input]:
    items: Sequence[Any] = [sources] if isinstance(sources, str | Path) else sources
    if len(items) == 0:
        raise DataError("No data given: pass at least one file, folder or row.")
    if all(isinstance(item, dict) for item in items):
        return [_Input("in-memory rows", lambda: _read_records(items), Hasher.hash(list(items)))]
    if any(not isinstance(item, str | Path) for item in items):
        kinds = sorted({type(item).__name__ for item in items})
        raise DataError(f"Data sources must all be paths or all be dicts (rows), got a mix of {kinds}.")
    return [_file_input(Path(item), str(item)) for item in items]


def _file_input(path: Path, name: str) -> _Input:
    if not path.exists():
        raise DataError(
            f"{name} does not exist (looked for {path.resolve()}); check the path "
            f"(relative paths start from {Path.cwd()})."
        )
    if path.is_dir():
        stats = [(str(p.relative_to(path)), p.stat()) for p in sorted(path.rglob("*")) if p.is_file()]
        stamp = ";".join(f"{rel}|{st.st_size}|{st.st_mtime_ns}" for rel, st in stats)
        return _Input(name, lambda: _read_saved(path, name), f"{path.resolve()}|{stamp}")
    suffix = path.suffix.lower()
    if suffix not in _SUFFIXES:
        raise DataError(
            f"{name}: unsupported file type {suffix or '(no extension)'!r}; use one of "
            f"{', '.join(_SUFFIXES)}, or a folder written by datasets.Dataset.save_to_disk."
        )
    stat = path.stat()
    if stat.st_size == 0:
        raise DataError(f"{name} is empty (0 bytes); nothing to train on. Check the path or remove it.")
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
    reader = readers[suffix]
    fingerprint = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    header = (lambda: _csv_header(path)) if suffix == ".csv" else None
    return _Input(name, lambda: reader(path, name), fingerprint, header)


def _input_format(item: _Input, format: str) -> str:
    """The forced format, or the one detected from the columns; also rejects inputs without any rows.

    Detection reads a CSV file's header, else the first row that has the columns of some format: a first row
    missing a column is then a bad row (an error or skipped, as bad_rows says), as it would be anywhere else.
    """
    first_keys: list[str] | None = None
    saw_rows = False
    with contextlib.closing(item.rows()) as rows:
        for _, row in rows:
            saw_rows = True
            if item.header is not None:
                return detect_format(item.header(), where=item.name) if format == "auto" else format
            if not isinstance(row, dict):
                continue
            if format != "auto":
                return format
            keys = [key for key in row if isinstance(key, str)]
            if _fits_a_format(keys):
                return detect_format(keys, where=item.name)
            first_keys = keys if first_keys is None else first_keys
    if first_keys is not None:
        return detect_format(
            first_keys, where=f"{item.name} (no row has a format's columns; its first row's)"
        )
    if saw_rows:
        raise DataError(f"{item.name}: no row is an object with named fields; is this the right file?")
    raise DataError(f"{item.name} has no rows; nothing to train on. Check the path or remove it.")


def _fits_a_format(columns: Iterable[str]) -> bool:
    present = set(columns)
    return any(present.issuperset(required) for required in FORMATS.values())


def _output_kind(plan: list[tuple[_Input, str]], system_prompt: str | None, chat_template: str | None) -> str:
    kinds = {"text" if fmt == "text" else "messages" for _, fmt in plan}
    if len(kinds) > 1:
        found = ", ".join(f"{item.name} is {fmt}" for item, fmt in plan)
        raise DataError(
            f"Cannot mix plain text and chat-like data in one dataset ({found}). "
            "Load them separately, or convert the text rows to a chat-like format."
        )
    kind = kinds.pop()
    # Fix (test_data_load.py): a chat template on plain text was ignored without a word (text rows are
    # tokenised as they are), while a system prompt there was an error; both are refused alike now.
    chat_only = [
        name
        for name, value in (("system prompt", system_prompt), ("chat template", chat_template))
        if value is not None
    ]
    if kind == "text" and chat_only:
        keys = " and ".join(f"data.{name.replace(' ', '_')}" for name in chat_only)
        verb = "applies" if len(chat_only) == 1 else "apply"
        raise DataError(
            f"A {' and a '.join(chat_only)} {verb} only to chat-like data, but this data is plain text (format "
            f"text), tokenised as it is; remove {keys} or use a chat-like format."
        )
    return kind


def _fingerprint(plan: list[tuple[_Input, str]], bad_rows: str, system_prompt: str | None) -> str:
    parts = [
        _CODE_VERSION,
        bad_rows,
        system_prompt,
        [(item.name, item.fingerprint, fmt) for item, fmt in plan],
    ]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]


# --- readers: one pass over one input, row by row ------------------------------------------------------------


def _read_records(records: Sequence[Any]) -> Rows:
    for index, record in enumerate(records):
        yield f"row {index}", record


def _read_jsonl(path: Path, name: str) -> Rows:
    with path.open("rb") as lines:  # bytes, so one badly encoded line is one bad row, not a dead file
        for number, raw in enumerate(lines, 1):
            source = f"{name}:{number}"
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield (
                    source,
                    _BadRow("invalid JSON", f"not valid UTF-8 ({e.reason} at byte {e.start} of the line)"),
                )
                continue
            # without the newline, a JSON error's column is on this line, not at the start of the next
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            try:
                yield source, json.loads(line)
            except json.JSONDecodeError as e:
                yield source, _BadRow("invalid JSON", f"invalid JSON: {e.msg} (column {e.colno})")
            except RecursionError:
                yield source, _BadRow("invalid JSON", "invalid JSON: nested too deeply")


def _read_json(path: Path, name: str) -> Rows:
    try:
        # a JSON array is parsed whole; large data belongs in JSONL or Parquet, which stream
        with path.open(encoding="utf-8-sig") as file:
            data = json.load(file)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # one object per line, saved as .json
            yield from _read_jsonl(path, name)
            return
        raise DataError(
            f"{name}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno}). A .json file holds one array of "
            "objects; for one object per line, use JSON Lines (.jsonl)."
        ) from None
    except (UnicodeDecodeError, RecursionError) as e:
        raise DataError(f"{name}: cannot read as JSON ({e}); save it as UTF-8 JSON.") from None
    for index, row in enumerate(_unwrap_json(data, name)):
        yield f"{name}:row {index}", row


def _unwrap_json(data: Any, name: str) -> list[Any]:
    if isinstance(data, list):
        return data
    if isinstance(data, dict) and _fits_a_format(data):  # one row, e.g. {"messages": [...]}, not a wrapper
        return [data]
    if isinstance(data, dict) and len(data) == 1 and isinstance(rows := next(iter(data.values())), list):
        return rows
    got = f"an object with keys {sorted(data)}" if isinstance(data, dict) else _type_name(data)
    raise DataError(
        f'{name}: expected a JSON array of rows, or an object with one key holding it like {{"data": [...]}}; '
        f"got {got}."
    )


def _read_csv(path: Path, name: str) -> Rows:
    with path.open(encoding="utf-8-sig", newline="") as file:
        reader = csv.reader(file, strict=True)  # a stray quote is an error, not silently merged text
        header: list[str] | None = None
        while True:
            start = reader.line_num + 1  # a quoted cell may span lines; a record is where it starts
            try:
                cells = next(reader)
            except StopIteration:
                return
            except (csv.Error, UnicodeDecodeError) as e:
                # the csv module cannot resync after a broken record, so this ends the file
                span = (
                    f", in the record on lines {start}-{reader.line_num}" if reader.line_num > start else ""
                )
                raise DataError(
                    f"{name}:{start}: cannot read CSV ({e}{span}). Fix the file (UTF-8, quoted fields); texts "
                    "over 128 KiB need JSONL or Parquet."
                ) from None
            if not cells:  # a blank line, skipped as csv.DictReader skips it
                continue
            if header is None:
                header = cells
                continue
            yield f"{name}:{start}", _parse_csv_row(header, cells)


def _csv_header(path: Path) -> list[str]:
    """The column names; only called once a pass over the rows has read them without error."""
    with path.open(encoding="utf-8-sig", newline="") as file:
        return next((cells for cells in csv.reader(file, strict=True) if cells), [])


def _parse_csv_row(header: list[str], cells: list[str]) -> dict[str, Any] | _BadRow:
    """A short row lacks its last columns; a conversation in a CSV cell is JSON text."""
    if (extra := len(cells) - len(header)) > 0:
        # csv.DictReader files these under the key None, where they were silently lost
        return _BadRow(
            "extra cells",
            f"has {extra} more cell{'s' if extra > 1 else ''} than the header ({len(header)} columns: "
            f"{', '.join(header)}); is there an unquoted comma in a text? Put texts with commas in double quotes",
        )
    parsed: dict[str, Any] = dict(zip(header, cells))
    for column in ("messages", "conversations"):
        if isinstance(parsed.get(column), str):
            try:
                parsed[column] = json.loads(parsed[column])
            except (json.JSONDecodeError, RecursionError) as e:
                return _BadRow("invalid JSON", f"must hold a JSON array of turns ({e})", column)
    return parsed


def _read_parquet(path: Path, name: str) -> Rows:
    try:
        file = pq.ParquetFile(path)
    except (pyarrow.ArrowException, OSError) as e:
        raise DataError(f"{name}: not a readable Parquet file ({e}).") from None
    index = 0
    for batch in file.iter_batches(batch_size=1000):
        for row in batch.to_pylist():
            yield f"{name}:row {index}", row
            index += 1


def _read_saved(path: Path, name: str) -> Rows:
    if (path / "dataset_dict.json").exists():
        splits = sorted(p.name for p in path.iterdir() if p.is_dir())
        raise DataError(
            f"{name} holds several splits {splits}; point at one split folder, e.g. {Path(name) / splits[0]}."
            if splits
            else f"{name} holds a DatasetDict with no splits."
        )
    if not (path / "state.json").exists():
        raise DataError(
            f"{name} is a folder, but not one written by datasets.Dataset.save_to_disk (no state.json); "
            "pass the data files inside it instead."
        )
    for index, row in enumerate(datasets.load_from_disk(str(path))):
        yield f"{name}:row {index}", row


# --- normalising one row --------------------------------------------------------------------------------------


class _BadRow(Exception):
    """One row's problem: a reason to count, the field, and what is wrong with it."""

    def __init__(self, reason: str, detail: str, field: str = "") -> None:
        super().__init__(detail)
        self.reason, self.detail, self.field = reason, detail, field

    def describe(self, source: str) -> str:
        return f"{source}: field {self.field!r} {self.detail}" if self.field else f"{source}: {self.detail}"


def _normalise(row: Any, fmt: str, system_prompt: str | None) -> dict[str, Any]:
    if isinstance(row, _BadRow):
        raise row
    if not isinstance(row, dict):
        raise _BadRow(
            "not an object", f"the row must be an object with the {fmt} columns, got {_type_name(row)}"
        )
    if fmt == "text":
        return {"text": _string(row, "text")}
    if fmt == "prompt_completion":
        messages = [_turn("user", _string(row, "prompt")), _turn("assistant", _string(row, "completion"))]
    elif fmt == "alpaca":
        instruction, extra = _string(row, "instruction"), _string(row, "input", optional=True)
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages = [_turn("user", prompt), _turn("assistant", _string(row, "output"))]
    elif fmt == "chat":
        messages = _turns(row, "messages", "role", "content", {role: role for role in ROLES})
    else:
        messages = _turns(row, "conversations", "from", "value", SHAREGPT_ROLES)
    return {"messages": _with_system(messages, row, system_prompt)}


def _turn(role: str, content: str) -> Message:
    return {"role": role, "content": content}


def _string(
    row: dict[str, Any], key: str, label: str = "", *, optional: bool = False, blank_ok: bool = False
) -> str:
    """The string at row[key], checked; an absent optional field is ""."""
    label = label or key
    value = row.get(key)
    if value is None:
        if optional:
            return ""
        raise _BadRow("missing field", "is missing" if key not in row else "is null", label)
    if not isinstance(value, str):
        raise _BadRow("wrong type", f"must be a string, got {_type_name(value)} {_clip(value)}", label)
    if not (optional or blank_ok or value.strip()):
        raise _BadRow("empty", "is empty" if not value else "is only whitespace", label)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # e.g. "\ud83d" from a cut emoji; Arrow cannot store it
        raise _BadRow("invalid text", "contains a lone surrogate (broken Unicode escape)", label) from None
    return value


def _turns(
    row: dict[str, Any], column: str, role_key: str, content_key: str, roles: dict[str, str]
) -> list[Message]:
    """A chat or ShareGPT conversation, checked turn by turn; errors name fields as in the input."""
    turns = row.get(column)
    if turns is None:
        raise _BadRow("missing field", "is missing" if column not in row else "is null", column)
    if not isinstance(turns, list):
        shape = f"{{{role_key}, {content_key}}}"
        raise _BadRow("wrong type", f"must be a list of {shape} objects, got {_type_name(turns)}", column)
    if not turns:
        raise _BadRow("empty", "is an empty list", column)
    messages = [
        _turn_at(turn, f"{column}[{i}]", role_key, content_key, roles) for i, turn in enumerate(turns)
    ]
    for i, message in enumerate(messages[1:], 1):
        if message["role"] == "system":
            raise _BadRow(
                "misplaced system", "is a system turn; only the first turn may be one", f"{column}[{i}]"
            )
    if not any(message["role"] == "assistant" for message in messages):
        raise _BadRow("no assistant turn", "has no assistant turn, so there is nothing to learn", column)
    return messages


def _turn_at(turn: Any, label: str, role_key: str, content_key: str, roles: dict[str, str]) -> Message:
    if not isinstance(turn, dict):
        raise _BadRow(
            "wrong type", f"must be a {{{role_key}, {content_key}}} object, got {_type_name(turn)}", label
        )
    name = _string(turn, role_key, f"{label}.{role_key}")
    if name not in roles:
        expected = ", ".join(roles)
        raise _BadRow("unknown role", f"is {name!r}; expected one of {expected}", f"{label}.{role_key}")
    role = roles[name]
    return _turn(role, _string(turn, content_key, f"{label}.{content_key}", blank_ok=role == "system"))


def _with_system(messages: list[Message], row: dict[str, Any], system_prompt: str | None) -> list[Message]:
    system = _string(row, "system", optional=True)
    if messages[0]["role"] == "system":
        return messages
    system = system if system.strip() else system_prompt or ""
    return [_turn("system", system), *messages] if system else messages


def _type_name(value: Any) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "bool", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _clip(value: Any, width: int = 40) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return f"({text[: width - 3]}...)" if len(text) > width else f"({text})"


# --- the pass: generate rows, count problems, raise or report -------------------------------------------------


@dataclass
class _Scan:
    bad_rows: str
    kept: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    ran: bool = False

    @property
    def skipped(self) -> int:
        return sum(self.reasons.values())

    def add(self, source: str, problem: _BadRow) -> None:
        self.reasons[problem.reason] += 1
        if len(self.examples) < MAX_SHOWN:
            self.examples.append(problem.describe(source))

    def report(self, format: str) -> LoadReport:
        return LoadReport(self.kept, self.skipped, dict(self.reasons), list(self.examples), format)


def _generate(
    plan: list[tuple[_Input, str]], scan: _Scan, system_prompt: str | None
) -> Iterator[dict[str, Any]]:
    scan.ran = True
    scan.kept, scan.reasons, scan.examples = 0, Counter(), []
    for item, fmt in plan:
        kept_before, first_problem = scan.kept, ""
        for source, row in item.rows():
            try:
                example = _normalise(row, fmt, system_prompt)
            except _BadRow as problem:
                scan.add(source, problem)
                first_problem = first_problem or problem.describe(source)
                continue
            scan.kept += 1
            if scan.bad_rows == "skip" or not scan.skipped:  # under "error" the rows are moot after a bad one
                yield {**example, "source": source}
        if scan.kept == kept_before and scan.bad_rows == "skip":
            raise DataError(
                f"{item.name} has no valid rows (format {fmt}); the first problem: {first_problem}. "
                "Is this the right file and format?"
            )
    if scan.skipped and scan.bad_rows == "error":
        raise DataError(_bad_rows_message(scan))


def _bad_rows_message(scan: _Scan) -> str:
    lines = [f"Bad rows: {scan.skipped} of {scan.skipped + scan.kept} ({_count_reasons(scan.reasons)}):"]
    lines += [f"  {example}" for example in scan.examples]
    if rest := scan.skipped - len(scan.examples):
        lines.append(f"  ... and {rest} more")
    lines.append(
        "Fix these rows, or set data.bad_rows: skip (bad_rows='skip' in Python) to drop them and go on."
    )
    return "\n".join(lines)


def _count_reasons(reasons: dict[str, int]) -> str:
    return ", ".join(f"{count} {reason}" for reason, count in sorted(reasons.items(), key=lambda kv: -kv[1]))


def _build(
    generate: Callable[[], Iterator[dict[str, Any]]],
    kind: str,
    fingerprint: str,
    cache_dir: str | Path | None,
) -> datasets.Dataset:
    try:
        return datasets.Dataset.from_generator(
            generate,
            features=_FEATURES[kind],
            cache_dir=None if cache_dir is None else str(cache_dir),
            fingerprint=fingerprint,
        )
    except DatasetGenerationError as e:  # datasets wraps what the generator raises
        if isinstance(e.__cause__, DataError):
            raise e.__cause__ from None
        raise


def _format_table() -> str:
    rows = []
    for name, required in FORMATS.items():
        optional = OPTIONAL_COLUMNS[name]
        rows.append(
            f"  {name}: {', '.join(required)}" + (f" (optional: {', '.join(optional)})" if optional else "")
        )
    return "\n".join(rows)


def _validation_rows(total: int, validation_split: float | int | None) -> int:  # noqa: PYI041
    if validation_split is None:
        return 0
    if isinstance(validation_split, bool) or not isinstance(validation_split, int | float):
        raise DataError(
            f"validation_split must be a fraction in (0, 1) or a row count, got {validation_split!r}."
        )
    if validation_split == 0:
        return 0
    if isinstance(validation_split, float):
        if not 0 < validation_split < 1:
            raise DataError(
                f"validation_split={validation_split} must be a fraction between 0 and 1, "
                "or a whole number of rows (an int)."
            )
        val_rows = math.ceil(validation_split * total)
    elif validation_split < 0:
        raise DataError(f"validation_split={validation_split} must not be negative.")
    else:
        val_rows = validation_split
    if val_rows >= total:
        raise DataError(
            f"validation_split={validation_split} takes {val_rows} of {total} rows for validation, leaving none "
            "to train on; lower it or add data."
        )
    return val_rows
