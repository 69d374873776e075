"""`tunewise data inspect`: the numbers on small synthetic data, then the command on the tiny model."""

from __future__ import annotations

import json
import random
from pathlib import Path

import datasets
import pytest
import yaml
from transformers import PreTrainedTokenizerBase
from typer.testing import CliRunner

from tunewise.cli import app
from tunewise.data.inspect import (
    Batching,
    Span,
    batch_cost,
    example_segments,
    histogram,
    inspect_rows,
    length_stats,
    padding_waste,
    percentile,
    recommend_max_seq_length,
    summarise,
    target_span,
    trains_at,
    truncation_at,
)
from tunewise.data.load import load_records
from tunewise.data.tokenize import TokenizeSettings, encode_row
from tunewise.testing import build_tiny_tokenizer, tiny_chat_rows
from tunewise.training.loop import LoopSettings, epoch_windows


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerBase:
    return build_tiny_tokenizer()


# --- pure numbers ------------------------------------------------------------------------------------------


def test_percentiles_are_nearest_rank() -> None:
    values = list(range(100, 0, -1))  # 1..100, unsorted
    assert [percentile(values, p) for p in (50, 90, 99, 100)] == [50, 90, 99, 100]
    assert percentile([7], 99) == 7
    assert length_stats([1, 2, 3, 10]) == {"min": 1, "p50": 2, "p90": 10, "p99": 10, "max": 10, "mean": 4.0}


def test_histogram_bins_are_equal_width_and_count_everything() -> None:
    assert histogram([10, 11, 12, 20], bins=2) == [
        {"low": 10, "high": 15, "count": 3},
        {"low": 16, "high": 21, "count": 1},
    ]
    rng = random.Random(0)
    lengths = [rng.randint(1, 999) for _ in range(10)] + list(range(50, 500))
    bins = histogram(lengths)
    assert len(bins) <= 12 and sum(b["count"] for b in bins) == len(lengths)
    assert bins[0]["low"] == min(lengths) and bins[-1]["low"] <= max(lengths) <= bins[-1]["high"]


def test_recommended_length_is_p99_rounded_up_to_64() -> None:
    assert recommend_max_seq_length(list(range(1, 101))) == (
        128,
        "p99 of token lengths (99) rounded up to a multiple of 64",
    )
    assert recommend_max_seq_length([64] * 99 + [5000])[0] == 64
    assert recommend_max_seq_length([65] * 100)[0] == 128


def test_truncation_counts_cut_tokens_and_examples_left_without_targets() -> None:
    spans = [Span(10, 5, 9), Span(20, 15, 19), Span(30, 2, 3)]
    assert truncation_at(spans, 16, "right") == {
        "truncated": 2,
        "truncated_percent": 66.67,
        "tokens_cut": 4 + 14,
        "dropped": 0,
    }
    assert truncation_at(spans, 12, "right")["dropped"] == 1  # the answer at 15 is cut away
    assert truncation_at(spans, 12, "left")["dropped"] == 1  # the answer at 2-3 is cut away
    assert truncation_at([Span(5, -1, -1)], 100, "right")["dropped"] == 1  # nothing to learn at any length


def test_trains_at_follows_encode_row_for_both_sides(tok: PreTrainedTokenizerBase) -> None:
    rows = tiny_chat_rows(6, seed=2) + [
        {"messages": [{"role": "user", "content": "x" * 60}, {"role": "assistant", "content": "y"}]}
    ]
    for row in rows:
        span = target_span(encode_row(row, tok, TokenizeSettings(4096))["labels"])
        for max_len in (8, 30, 50, 70, 90):
            for side in ("right", "left"):
                truncated = encode_row(row, tok, TokenizeSettings(max_len, truncation_side=side))
                assert trains_at(span, max_len, side) == (truncated["num_targets"] > 0), (max_len, side)


def test_batch_cost_padded_packed_and_fixed_length() -> None:
    lengths, batches = [2, 4, 6, 8], [[0, 1], [2, 3]]
    assert batch_cost(lengths, batches) == {"tokens": 24, "padding": 4, "waste_percent": 16.67}
    assert batch_cost(lengths, batches, packed=True) == {"tokens": 20, "padding": 0, "waste_percent": 0.0}
    assert batch_cost(lengths, batches, packed=True, pad_to_multiple_of=8)["padding"] == 4  # 6->8, 14->16
    assert batch_cost(lengths, batches, pad_to_length=10) == {
        "tokens": 40,
        "padding": 20,
        "waste_percent": 50.0,
    }
    assert batch_cost(lengths, batches, pad_to_multiple_of=8)["tokens"] == 2 * 8 + 2 * 8


def test_padding_waste_random_vs_grouped_vs_packed() -> None:
    rng = random.Random(0)
    lengths = [rng.randint(10, 500) for _ in range(400)]
    waste = padding_waste(lengths, 8, seed=1)
    assert waste["packed"]["padding"] == 0 and waste["packed"]["tokens"] == sum(lengths)
    assert waste["length_grouped"]["padding"] < waste["random"]["padding"] / 5
    assert waste["random"]["tokens"] - waste["random"]["padding"] == sum(lengths)


def test_padding_waste_counts_the_regrouping_within_each_step_as_the_loop_does() -> None:
    rng = random.Random(0)
    lengths = [rng.randint(10, 500) for _ in range(400)]
    alone, in_steps = padding_waste(lengths, 2, seed=1), padding_waste(lengths, 2, seed=1, accumulation=4)
    assert in_steps["random"]["padding"] < alone["random"]["padding"] / 2.5  # 11,089 against 32,279
    assert in_steps["packed"] == alone["packed"]
    once = {"total_steps": 1, "batches_per_epoch": 1, "max_steps_overrides": False, "logging_steps": 1}
    never = {"eval_steps": None, "save_steps": None, "max_grad_norm": None}
    settings = LoopSettings(
        per_device_batch_size=2, gradient_accumulation_steps=4, data_seed=1, pad_token_id=0, **once, **never
    )
    run_batches = [b for w in epoch_windows(settings, lengths, epoch=0, rank=0, world=1) for b in w]
    assert in_steps["random"] == batch_cost(lengths, run_batches)  # what a run pays


def test_summary_compares_configured_and_recommended_lengths() -> None:
    spans = [Span(n, 1, n - 1) for n in range(2, 201)] + [
        Span(1000, 900, 999)
    ]  # an answer deep in a long one
    summary = summarise(spans, 512, "right", Batching(batch_size=4, seed=0))
    assert summary["lengths"]["p99"] == 199 and summary["lengths"]["max"] == 1000
    configured, recommended = summary["configured"], summary["recommended"]
    assert recommended["max_seq_length"] == 256
    assert (configured["truncated"], configured["tokens_cut"], configured["dropped"]) == (1, 488, 1)
    assert (recommended["truncated"], recommended["tokens_cut"], recommended["dropped"]) == (1, 744, 1)
    assert summary["padding"]["configured_strategy"] == "random"
    kept = list(range(2, 201))  # the long one is dropped at either length
    assert (
        summary["padding"]["packed"]["tokens"]
        == sum(kept)
        == configured["batch_tokens"] - configured["padding_tokens"]
    )
    fixed = summarise(spans, 512, "right", Batching(batch_size=4, padding="max_length", seed=0))
    assert fixed["configured"]["batch_tokens"] == 199 * 512  # every kept example padded to the full length
    assert fixed["recommended"]["batch_tokens"] == 199 * 256


# --- examples ----------------------------------------------------------------------------------------------


def test_example_segments_mark_trained_and_cut_tokens(tok: PreTrainedTokenizerBase) -> None:
    row = encode_row(tiny_chat_rows(1, seed=1)[0], tok, TokenizeSettings(4096))
    ids, labels = row["input_ids"], row["labels"]
    render = tok.decode(ids)
    whole = example_segments(tok, ids, labels, 4096, "right")
    assert [s["kind"] for s in whole] == ["prompt", "trained", "prompt"]
    assert "".join(s["text"] for s in whole) == render and whole[1]["text"].endswith("<|im_end|>")
    right = example_segments(tok, ids, labels, len(ids) - 3, "right")
    assert [s["kind"] for s in right] == ["prompt", "trained", "cut"]
    assert right[-1]["text"] == tok.decode(ids[-3:])
    left = example_segments(tok, ids, labels, len(ids) - 3, "left")
    assert [s["kind"] for s in left] == ["cut", "prompt", "trained", "prompt"] and left[0][
        "text"
    ] == tok.decode(ids[:3])


def test_inspect_rows_on_tiny_data(tok: PreTrainedTokenizerBase, tmp_path: Path) -> None:
    rows = tiny_chat_rows(20, seed=5)
    ds, _ = load_records(rows, cache_dir=tmp_path)
    lengths = [encode_row(r, tok, TokenizeSettings(4096))["length"] for r in rows]
    max_len = sorted(lengths)[15]
    assert sum(n > max_len for n in lengths) > 0
    result = inspect_rows(ds, tok, TokenizeSettings(max_len), Batching(batch_size=4))
    assert result["rows"] == 20
    assert result["lengths"]["max"] == max(lengths) and result["lengths"]["min"] == min(lengths)
    assert result["configured"]["truncated"] == sum(n > max_len for n in lengths)
    assert result["configured"]["tokens_cut"] == sum(max(n - max_len, 0) for n in lengths)
    assert [e["source"] for e in result["examples"]] == ["row 0", "row 1"]
    json.dumps(result)  # --json prints it as is


# --- the command -------------------------------------------------------------------------------------------


@pytest.fixture
def datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    return tmp_path / "hf-cache"


def test_cli_inspects_a_file_with_a_model_and_overrides(
    tiny_model_dir: Path, chat_files: tuple[Path, Path], tmp_path: Path, datasets_cache: Path
) -> None:
    train, _ = chat_files
    args = [
        "data",
        "inspect",
        str(train),
        "--model",
        str(tiny_model_dir),
        "--set",
        "max_seq_length=48",
        "--json",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    tok = build_tiny_tokenizer()
    lengths = [
        encode_row(json.loads(line), tok, TokenizeSettings(4096))["length"]
        for line in train.read_text().splitlines()
    ]
    assert (out["rows"], out["format"], out["model"]) == (64, "chat", str(tiny_model_dir))
    assert out["configured"]["max_seq_length"] == 48
    assert out["configured"]["truncated"] == sum(n > 48 for n in lengths)
    assert out["lengths"]["p99"] == percentile(lengths, 99)
    assert out["recommended"]["max_seq_length"] == -(-percentile(lengths, 99) // 64) * 64
    assert out["padding"]["batch_size"] == 8

    text = CliRunner().invoke(app, args[:-1])
    assert text.exit_code == 0, text.output
    for expected in (
        "64 rows",
        "format chat",
        "Token lengths",
        "p99",
        "recommended",
        "length-grouped",
        "Example",
        "train.jsonl:1",
        "trained",
    ):
        assert expected in " ".join(text.stdout.split()), expected  # rich wraps lines at 80 columns here


def test_cli_inspects_a_config(tiny_config: dict, tmp_path: Path, datasets_cache: Path) -> None:
    tiny_config["data"].update({"packing": True, "max_seq_length": 64})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tiny_config))
    result = CliRunner().invoke(app, ["data", "inspect", str(path), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["rows"] == 64 and out["configured"]["max_seq_length"] == 64
    assert out["padding"]["configured_strategy"] == "packed"
    assert out["configured"]["padding_tokens"] == out["padding"]["packed"]["padding"] == 0


def test_cli_reports_a_missing_file_as_a_user_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["data", "inspect", str(tmp_path / "nope.jsonl"), "--model", str(tiny_model_dir)]
    )
    assert result.exit_code == 2
    assert "does not exist" in result.output


def test_padded_rows_of_a_token_budget_cost_what_the_loop_cuts() -> None:
    """With max_tokens_per_micro_batch, packed rows are re-cut within each step and each is rounded up to
    pad_to_multiple_of: the packed cost is that of the loop's own windows, not of one row per micro-batch."""
    lengths = [70, 70, 70, 70]
    whole = padding_waste(lengths, 4, seed=1, pad_to_multiple_of=64)["packed"]
    cut = padding_waste(lengths, 4, seed=1, pad_to_multiple_of=64, max_tokens_per_micro_batch=192)["packed"]
    assert whole == {"tokens": 320, "padding": 40, "waste_percent": 12.5}  # 280 -> 320
    assert cut == {"tokens": 384, "padding": 104, "waste_percent": 27.08}  # two rows of 140 -> 192
    rng = random.Random(0)
    lengths = [rng.randint(10, 500) for _ in range(400)]
    once = {"total_steps": 1, "batches_per_epoch": 1, "max_steps_overrides": False, "logging_steps": 1}
    never = {"eval_steps": None, "save_steps": None, "max_grad_norm": None}
    budget = {"packing": True, "max_tokens_per_micro_batch": 1024, "pad_to_multiple_of": 64}
    settings = LoopSettings(
        per_device_batch_size=2,
        gradient_accumulation_steps=4,
        data_seed=1,
        pad_token_id=0,
        **once,
        **never,
        **budget,
    )
    run_batches = [b for w in epoch_windows(settings, lengths, epoch=0, rank=0, world=1) for b in w]
    waste = padding_waste(
        lengths, 2, seed=1, accumulation=4, pad_to_multiple_of=64, max_tokens_per_micro_batch=1024
    )
    assert waste["packed"] == batch_cost(lengths, run_batches, packed=True, pad_to_multiple_of=64)


def test_the_inspection_prints_paths_and_templates_as_text(
    tok: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    """Rich markup ate `[v2]` in a path and raised on a pasted template's `[/INST]`."""
    from rich.console import Console

    from tunewise.data.inspect import print_inspection

    ds, _ = load_records(tiny_chat_rows(8, seed=5), cache_dir=tmp_path)
    result = inspect_rows(ds, tok, TokenizeSettings(64), Batching(batch_size=4))
    template = "{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    result |= {"source": "data/train[v2].jsonl", "model": "runs/[best]", "chat_template": template}
    console = Console(record=True, width=300)
    print_inspection(console, result)
    first = console.export_text().splitlines()[0]
    assert (
        first
        == f"8 rows from data/train[v2].jsonl (format ?); tokenizer of runs/[best], chat template: {template}"
    )
