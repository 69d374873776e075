"""`tunewise data inspect`: what the data looks like to the model, before any training.

The numbers come from pure functions over per-example spans (token length, first and last trained
position), so they are tested on synthetic lengths; `inspect_rows` tokenises once, without
truncation, through the same cached `encode_dataset` a run uses, and simulates every truncation,
batching and padding choice from the spans. Batches are those of the loop's first epoch
(`batch_indices` with the run's data seed), so the padding numbers are what a run would pay.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import datasets
from rich.console import Console
from rich.table import Table
from rich.text import Text
from transformers import PreTrainedTokenizerBase

from tunewise.data.collate import (
    batch_indices,
    batch_tensor_tokens,
    group_window_by_length,
    pack_within,
    round_up,
)
from tunewise.data.tokenize import IGNORE, TokenizeSettings, encode_dataset

RECOMMEND_PERCENTILE = 99
RECOMMEND_MULTIPLE = 64
"""Recommended max_seq_length: the 99th percentile of lengths rounded up to a multiple of 64 (a round size
that keeps 99% of examples whole and tensor shapes friendly to GPU kernels, which tile by 8-128)."""
CONFIG_SUFFIXES = (".yaml", ".yml")
_STYLES = {"prompt": "dim", "trained": "bold green", "cut": "strike red"}


class Span(NamedTuple):
    """One tokenised example, untruncated: what truncation at any length does to it follows from these."""

    length: int
    first_target: int
    """Index of the first label that is a target (>= 1, as labels[0] never is), or -1 if none."""
    last_target: int
    """Index of the last label that is a target, or -1 if none."""


def target_span(labels: Sequence[int]) -> Span:
    trained = [i for i, label in enumerate(labels) if i > 0 and label != IGNORE]
    return Span(len(labels), trained[0], trained[-1]) if trained else Span(len(labels), -1, -1)


# --- pure statistics ----------------------------------------------------------------------------------------


def percentile(values: Sequence[int], p: float) -> int:
    """Nearest-rank percentile: the smallest value with at least p% of values at or below it."""
    ordered = sorted(values)
    return ordered[max(math.ceil(p / 100 * len(ordered)), 1) - 1]


def length_stats(lengths: Sequence[int]) -> dict[str, float]:
    return {
        "min": min(lengths),
        "p50": percentile(lengths, 50),
        "p90": percentile(lengths, 90),
        "p99": percentile(lengths, 99),
        "max": max(lengths),
        "mean": round(sum(lengths) / len(lengths), 1),
    }


def histogram(lengths: Sequence[int], bins: int = 12) -> list[dict[str, int]]:
    """Equal-width bins from the shortest to the longest length; `low` and `high` are inclusive."""
    low, high = min(lengths), max(lengths)
    width = max(math.ceil((high - low + 1) / bins), 1)
    counts = [0] * math.ceil((high - low + 1) / width)
    for n in lengths:
        counts[(n - low) // width] += 1
    return [
        {"low": low + i * width, "high": low + (i + 1) * width - 1, "count": c} for i, c in enumerate(counts)
    ]


def recommend_max_seq_length(lengths: Sequence[int]) -> tuple[int, str]:
    """(value, reason): the 99th percentile rounded up to a multiple of 64."""
    p99 = percentile(lengths, RECOMMEND_PERCENTILE)
    value = round_up(p99, RECOMMEND_MULTIPLE)
    return value, (
        f"p{RECOMMEND_PERCENTILE} of token lengths ({p99}) rounded up to a multiple of {RECOMMEND_MULTIPLE}"
    )


def trains_at(span: Span, max_len: int, side: str) -> bool:
    """Whether the example keeps a target after truncation (the rule `encode_row`'s num_targets follows)."""
    if span.first_target < 0:
        return False
    if side == "right":
        return span.first_target <= max_len - 1
    return span.last_target >= max(1, span.length - max_len + 1)


def truncation_at(spans: Sequence[Span], max_len: int, side: str) -> dict[str, Any]:
    cut = [s.length - max_len for s in spans if s.length > max_len]
    return {
        "truncated": len(cut),
        "truncated_percent": _percent(len(cut), len(spans)),
        "tokens_cut": sum(cut),
        "dropped": sum(not trains_at(s, max_len, side) for s in spans),
    }


def batch_cost(
    lengths: Sequence[int],
    batches: Sequence[Sequence[int]],
    *,
    packed: bool = False,
    pad_to_length: int | None = None,
    pad_to_multiple_of: int | None = None,
) -> dict[str, Any]:
    """Tokens in the batch tensors of one epoch, how many are padding, and that as a % (the waste)."""
    total = sum(
        batch_tensor_tokens(
            [lengths[i] for i in batch],
            packed=packed,
            pad_to_length=pad_to_length,
            pad_to_multiple_of=pad_to_multiple_of,
        )
        for batch in batches
    )
    padding = total - sum(lengths[i] for batch in batches for i in batch)
    return {"tokens": total, "padding": padding, "waste_percent": _percent(padding, total)}


def padding_waste(
    lengths: Sequence[int],
    batch_size: int,
    *,
    seed: int,
    accumulation: int = 1,
    pad_to_length: int | None = None,
    pad_to_multiple_of: int | None = None,
    max_tokens_per_micro_batch: int | None = None,
) -> dict[str, dict[str, Any]]:
    """One epoch's padding with random batches, length-grouped batches, and packed random batches.

    With `accumulation` above 1, padded micro-batches are regrouped by length within each optimizer step,
    as the loop does (`group_window_by_length`); with a token budget, packed ones are re-cut within each
    step into rows of at most that many tokens (`pack_within`), each rounded up to `pad_to_multiple_of`."""
    randomly = batch_indices(lengths, batch_size, shuffle=True, seed=seed, group_by_length=False)
    grouped = batch_indices(
        lengths,
        batch_size,
        shuffle=True,
        seed=seed,
        group_by_length=True,
        group_size=batch_size * accumulation,
    )
    rows = randomly
    if max_tokens_per_micro_batch:
        steps = [randomly[i : i + accumulation] for i in range(0, len(randomly), accumulation)]
        rows = [
            r
            for step in steps
            for r in pack_within(step, lengths, max_tokens_per_micro_batch, pad_to_multiple_of)
        ]
    packed = batch_cost(lengths, rows, packed=True, pad_to_multiple_of=pad_to_multiple_of)
    randomly, grouped = (_grouped_in_steps(b, lengths, accumulation) for b in (randomly, grouped))
    return {
        "random": batch_cost(
            lengths, randomly, pad_to_length=pad_to_length, pad_to_multiple_of=pad_to_multiple_of
        ),
        "length_grouped": batch_cost(
            lengths, grouped, pad_to_length=pad_to_length, pad_to_multiple_of=pad_to_multiple_of
        ),
        "packed": packed,
    }


def _grouped_in_steps(batches: list[list[int]], lengths: Sequence[int], accumulation: int) -> list[list[int]]:
    steps = [batches[i : i + accumulation] for i in range(0, len(batches), accumulation)]
    return [b for step in steps for b in group_window_by_length(step, lengths)]


@dataclasses.dataclass(frozen=True)
class Batching:
    """The `data:`/`training:` settings that decide how examples are batched and padded, as plain values."""

    batch_size: int = 8
    accumulation: int = 1  # micro-batches per optimizer step
    padding: str = "longest"
    pad_to_multiple_of: int | None = None
    group_by_length: bool = False
    packing: bool = False
    seed: int = 42
    max_tokens_per_micro_batch: int | None = None  # packed rows re-cut by tokens within each step

    @property
    def strategy(self) -> str:
        return "packed" if self.packing else "length_grouped" if self.group_by_length else "random"


def kept_lengths(spans: Sequence[Span], max_len: int, side: str) -> list[int]:
    """Lengths after truncation of the examples that still train (the others are dropped)."""
    return [min(s.length, max_len) for s in spans if trains_at(s, max_len, side)]


def _waste(spans: Sequence[Span], max_len: int, side: str, batching: Batching) -> dict[str, dict[str, Any]]:
    return padding_waste(
        kept_lengths(spans, max_len, side),
        batching.batch_size,
        seed=batching.seed,
        accumulation=batching.accumulation,
        pad_to_length=max_len if batching.padding == "max_length" else None,
        pad_to_multiple_of=batching.pad_to_multiple_of,
        max_tokens_per_micro_batch=batching.max_tokens_per_micro_batch,
    )


def at_length(spans: Sequence[Span], max_len: int, side: str, batching: Batching) -> dict[str, Any]:
    """Truncation at `max_len` from `side`, and one epoch's batch tokens with the configured batching."""
    cost = _waste(spans, max_len, side, batching)[batching.strategy]
    return {
        "max_seq_length": max_len,
        **truncation_at(spans, max_len, side),
        "batch_tokens": cost["tokens"],
        "padding_tokens": cost["padding"],
    }


def summarise(spans: Sequence[Span], max_seq_length: int, side: str, batching: Batching) -> dict[str, Any]:
    """Every number `data inspect` shows, from the untruncated spans."""
    full = [s.length for s in spans]
    recommended, reason = recommend_max_seq_length(full)
    return {
        "lengths": length_stats(full),
        "histogram": histogram(full),
        "configured": at_length(spans, max_seq_length, side, batching),
        "recommended": {**at_length(spans, recommended, side, batching), "reason": reason},
        "padding": {
            "batch_size": batching.batch_size,
            "padding": batching.padding,
            "pad_to_multiple_of": batching.pad_to_multiple_of,
            "max_tokens_per_micro_batch": batching.max_tokens_per_micro_batch,
            "configured_strategy": batching.strategy,
            **_waste(spans, max_seq_length, side, batching),
        },
    }


def _percent(part: int, whole: int) -> float:
    return round(100 * part / whole, 2) if whole else 0.0


# --- examples -----------------------------------------------------------------------------------------------


def example_segments(
    tokenizer: PreTrainedTokenizerBase, ids: Sequence[int], labels: Sequence[int], max_len: int, side: str
) -> list[dict[str, str]]:
    """Runs of tokens decoded as text, each `prompt`, `trained` (label is a target) or `cut` (truncated away)."""
    first_kept = max(len(ids) - max_len, 0) if side == "left" else 0
    kinds = [
        "cut" if not first_kept <= i < first_kept + max_len else "prompt" if label == IGNORE else "trained"
        for i, label in enumerate(labels)
    ]
    segments: list[dict[str, str]] = []
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or kinds[i] != kinds[start]:
            text = tokenizer.decode(list(ids[start:i]), clean_up_tokenization_spaces=False)
            segments.append({"kind": kinds[start], "text": str(text)})
            start = i
    return segments


# --- from rows and from the command line --------------------------------------------------------------------


def inspect_rows(
    rows: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    settings: TokenizeSettings,
    batching: Batching,
    examples: int = 2,
) -> dict[str, Any]:
    """Tokenise `rows` untruncated (cached) and summarise them; `examples` rows are rendered too."""
    untruncated = dataclasses.replace(settings, max_seq_length=sys.maxsize)
    tokens = encode_dataset(rows, tokenizer, untruncated)
    spans = [target_span(labels) for batch in tokens.iter(batch_size=1024) for labels in batch["labels"]]
    shown = tokens.select(range(min(examples, len(tokens))))
    return {
        "rows": len(rows),
        **summarise(spans, settings.max_seq_length, settings.truncation_side, batching),
        "examples": [
            {
                "source": row.get("source", f"row {i}"),
                "segments": example_segments(
                    tokenizer,
                    row["input_ids"],
                    row["labels"],
                    settings.max_seq_length,
                    settings.truncation_side,
                ),
            }
            for i, row in enumerate(shown)
        ],
    }


def inspect_target(
    target: str | Path, overrides: Sequence[str] = (), model: str | None = None
) -> dict[str, Any]:
    """`tunewise data inspect TARGET`: a YAML config (its training data) or a data file with default settings."""
    from tunewise.config.load import load_config
    from tunewise.config.resolve import probe_hardware, resolve_static
    from tunewise.data.build import resolve_files
    from tunewise.data.load import load_records
    from tunewise.models.load import load_tokenizer, materialize, resolve_source

    is_config = Path(target).suffix.lower() in CONFIG_SUFFIXES
    cfg = load_config(target if is_config else None, list(overrides))
    if not is_config:
        cfg.data.dataset = str(target)
    if model:
        cfg.model.model_name_or_path = model
    cfg = resolve_static(cfg, probe_hardware()).config  # an `auto` batch size becomes a number
    d, t = cfg.data, cfg.training
    files, _ = resolve_files(d.dataset, None)
    rows, report = load_records(
        files,
        format=d.format,
        bad_rows=d.bad_rows,
        system_prompt=d.system_prompt,
        chat_template=d.chat_template,
    )
    tokenizer = load_tokenizer(
        materialize(resolve_source(cfg.model.model_name_or_path)), cfg.model.trust_remote_code
    )
    settings = TokenizeSettings(d.max_seq_length, d.truncation_side, d.train_on_inputs, d.chat_template)
    batching = Batching(
        batch_size=int(t.per_device_train_batch_size),
        accumulation=int(t.gradient_accumulation_steps),
        padding=d.padding,
        pad_to_multiple_of=d.pad_to_multiple_of,
        group_by_length=d.group_by_length,
        packing=d.packing,
        seed=int(t.data_seed if t.data_seed is not None else t.seed),
        max_tokens_per_micro_batch=t.max_tokens_per_micro_batch,
    )
    return {
        "source": ", ".join(str(f) for f in files),
        "format": report.format,
        "skipped_rows": report.skipped,
        "model": cfg.model.model_name_or_path,
        "chat_template": d.chat_template or "the tokenizer's",
        **inspect_rows(rows, tokenizer, settings, batching),
    }


# --- printing -----------------------------------------------------------------------------------------------


def print_inspection(console: Console, result: dict[str, Any]) -> None:
    skipped = f", {result['skipped_rows']} bad rows skipped" if result.get("skipped_rows") else ""
    # Paths, the model's name and a pasted Jinja template (`[/INST]`) are text, not Rich markup.
    console.print(
        Text.assemble(
            (f"{result['rows']} rows", "bold"),
            f" from {result.get('source', 'rows')} (format {result.get('format', '?')}{skipped}); tokenizer "
            f"of {result.get('model', '?')}, chat template: {result.get('chat_template', '?')}",
        )
    )
    _print_lengths(console, result)
    _print_lengths_table(console, result)
    _print_padding(console, result["padding"])
    _print_examples(console, result["examples"])


def _print_lengths(console: Console, result: dict[str, Any]) -> None:
    stats = result["lengths"]
    console.print(
        "\n[bold]Token lengths[/] (before truncation): " + ", ".join(f"{k} {v}" for k, v in stats.items())
    )
    bins, limit = result["histogram"], result["configured"]["max_seq_length"]
    widest = max(b["count"] for b in bins)
    label_width = len(f"{bins[-1]['low']}-{bins[-1]['high']}")
    for b in bins:
        bar = "█" * round(40 * b["count"] / widest)
        span = f"{b['low']}-{b['high']}"
        colour = "red" if b["high"] > limit else "cyan"  # red: some of these are truncated
        console.print(f"  {span:>{label_width}} │[{colour}]{bar}[/] {b['count']}")


def _print_lengths_table(console: Console, result: dict[str, Any]) -> None:
    configured, recommended = result["configured"], result["recommended"]
    table = Table(title="max_seq_length", title_justify="left")
    table.add_column("")
    table.add_column(f"configured {configured['max_seq_length']}", justify="right")
    table.add_column(f"recommended {recommended['max_seq_length']}", justify="right")
    rows = [
        ("examples truncated", lambda r: f"{r['truncated']} ({r['truncated_percent']}%)"),
        ("tokens cut", lambda r: str(r["tokens_cut"])),
        ("examples dropped (no target left)", lambda r: str(r["dropped"])),
        ("tokens per epoch (batch tensors)", lambda r: str(r["batch_tokens"])),
        ("of which padding", lambda r: str(r["padding_tokens"])),
    ]
    for name, cell in rows:
        table.add_row(name, cell(configured), cell(recommended))
    console.print()
    console.print(table)
    console.print(f"  recommended: {recommended['reason']}")
    if recommended["max_seq_length"] != configured["max_seq_length"]:
        tokens = recommended["batch_tokens"] - configured["batch_tokens"]
        truncated = recommended["truncated"] - configured["truncated"]
        console.print(
            f"  switching from {configured['max_seq_length']} to {recommended['max_seq_length']}: "
            f"{tokens:+} batch tokens per epoch ({_percent(tokens, configured['batch_tokens']):+}%), "
            f"{truncated:+} examples truncated"
        )


def _print_padding(console: Console, padding: dict[str, Any]) -> None:
    table = Table(
        title=f"Padding per epoch, batch size {padding['batch_size']}, padding {padding['padding']}"
        + (f", multiple of {padding['pad_to_multiple_of']}" if padding["pad_to_multiple_of"] else ""),
        title_justify="left",
    )
    for column in ("batches", "tokens", "padding", "waste"):
        table.add_column(column, justify="left" if column == "batches" else "right")
    for name in ("random", "length_grouped", "packed"):
        row = padding[name]
        mark = " (configured)" if name == padding["configured_strategy"] else ""
        table.add_row(
            name.replace("_", "-") + mark, str(row["tokens"]), str(row["padding"]), f"{row['waste_percent']}%"
        )
    console.print()
    console.print(table)


def _print_examples(console: Console, examples: list[dict[str, Any]]) -> None:
    legend = Text(" ").join(Text(kind, style) for kind, style in _STYLES.items())
    for example in examples:
        console.print(Text.assemble("\n", (f"Example {example['source']}", "bold"), "  [", legend, "]"))
        text = Text()
        for segment in example["segments"]:
            text.append(segment["text"], style=_STYLES[segment["kind"]])
        console.print(text)
