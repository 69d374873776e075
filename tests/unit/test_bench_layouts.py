"""bench/cpu_layouts.py's token-budget rows hold the window's examples once each, within the budget."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


def load_layouts(monkeypatch: pytest.MonkeyPatch) -> object:
    # Loading the script asks for huge pages through the environment unless the variable is already set.
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "0")
    path = Path(__file__).parents[2] / "bench" / "cpu_layouts.py"
    spec = importlib.util.spec_from_file_location("cpu_layouts", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_token_rows_first_fit_longest_first(monkeypatch: pytest.MonkeyPatch) -> None:
    layouts = load_layouts(monkeypatch)
    window = [{"id": i, "length": n} for i, n in enumerate([300, 120, 480, 60, 250, 200, 90, 510])]
    rows = layouts.token_rows(window, 512)
    lengths = [[e["length"] for e in row] for row in rows]
    # Longest first: 510, 480, 300 and 250 each open a row (none fits beside an earlier one); 200 joins 300,
    # 120 and 90 join 250, and 60 fits nowhere (the fullest rows have 510, 480, 500 and 460).
    assert lengths == [[510], [480], [300, 200], [250, 120, 90], [60]]
    assert sorted(e["id"] for row in rows for e in row) == list(range(8))
    assert all(sum(row) <= 512 for row in lengths)


def test_token_rows_give_an_overlong_example_its_own_row(monkeypatch: pytest.MonkeyPatch) -> None:
    layouts = load_layouts(monkeypatch)
    rows = layouts.token_rows([{"length": 700}, {"length": 100}, {"length": 50}], 512)
    assert [[e["length"] for e in row] for row in rows] == [[700], [100, 50]]


def test_layout_names(monkeypatch: pytest.MonkeyPatch) -> None:
    layouts = load_layouts(monkeypatch)
    assert layouts.layout_name("tokens768") == "tokens768"
    for bad in ("tokens", "tokens0", "tokens-5", "segments3"):
        with pytest.raises(Exception, match="tokensN"):
            layouts.layout_name(bad)
