"""bench/cpu_layouts.py's layouts: token-budget rows (tunewise's `pack_within`) run largest first."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import pytest


def test_token_layouts_pack_each_row_and_run_the_largest_first(bench_script: Callable[[str], object]) -> None:
    layouts = bench_script("cpu_layouts")
    window = [
        {"input_ids": [5 + i] * n, "labels": [5 + i] * n, "length": n} for i, n in enumerate([3, 9, 4, 6])
    ]
    # Rows of at most 10 tokens: 9 alone, then 4 + 6 (drawn order), then 3; the row with the most tokens first.
    rows = layouts.micro_batches("tokens10", window, pad_id=0)  # type: ignore[attr-defined]
    assert [b["input_ids"][0].tolist() for b in rows] == [[7] * 4 + [8] * 6, [6] * 9, [5] * 3]
    # Rows of 2 examples keep their order unless asked: [3, 9] (12 tokens) then [4, 6] (10), either way here,
    # so the small pair goes first to tell the orders apart.
    small_first = [window[2], window[3], window[0], window[1]]
    drawn = layouts.micro_batches("segments2", small_first, pad_id=0)  # type: ignore[attr-defined]
    largest = layouts.micro_batches("segments2", small_first, pad_id=0, largest_first=True)  # type: ignore[attr-defined]
    assert [b["input_ids"].shape[1] for b in drawn] == [10, 12]
    assert [b["input_ids"].shape[1] for b in largest] == [12, 10]


def test_layout_names(bench_script: Callable[[str], object]) -> None:
    layouts = bench_script("cpu_layouts")
    assert layouts.layout_name("tokens768") == "tokens768"  # type: ignore[attr-defined]
    for bad in ("tokens", "tokens0", "tokens-5", "segments3"):
        with pytest.raises(argparse.ArgumentTypeError, match="tokensN"):
            layouts.layout_name(bad)  # type: ignore[attr-defined]
