"""From the `data:` settings to tokenised train and validation sets."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import datasets
from transformers import PreTrainedTokenizerBase

from tunewise.config.schema import BUILTIN_PREFIX
from tunewise.data.load import DataError, LoadReport, load_records, split_train_validation
from tunewise.data.tokenize import TokenizeReport, TokenizeSettings, tokenize_dataset


@dataclass
class DataBundle:
    train: datasets.Dataset  # tokenised
    validation: datasets.Dataset | None  # tokenised
    validation_rows: datasets.Dataset | None  # normalised rows, for generation and metrics
    format: str
    load_report: LoadReport
    train_report: TokenizeReport
    validation_report: TokenizeReport | None


def builtin_files(spec: str) -> tuple[list[Path], list[Path]]:
    """Train and validation files of a dataset shipped inside the package."""
    name = spec.removeprefix(BUILTIN_PREFIX)
    root = Path(str(resources.files("tunewise") / "builtin" / name))
    if not (root / "train.jsonl").is_file():
        available = sorted(p.name for p in root.parent.iterdir() if p.is_dir())
        raise DataError(f"data.dataset: no built-in dataset `{name}`; available: {', '.join(available)}")
    return [root / "train.jsonl"], [root / "validation.jsonl"]


def _as_list(value: str | list[str] | None) -> list[str]:
    return [] if value is None else [value] if isinstance(value, str) else list(value)


def resolve_files(dataset: str | list[str], validation_file: str | list[str] | None) -> tuple[list, list]:
    train: list = []
    validation: list = _as_list(validation_file)
    for spec in _as_list(dataset):
        if spec.startswith(BUILTIN_PREFIX):
            t, v = builtin_files(spec)
            train += t
            validation = validation or v
        else:
            train.append(spec)
    return train, validation


def build_data(
    *,
    dataset: str | list[str],
    validation_file: str | list[str] | None,
    validation_split: float | None,
    format: str,
    bad_rows: str,
    system_prompt: str | None,
    data_seed: int,
    tokenizer: PreTrainedTokenizerBase,
    settings: TokenizeSettings,
    max_eval_samples: int | None = None,
) -> DataBundle:
    train_files, validation_files = resolve_files(dataset, validation_file)
    chat = {"system_prompt": system_prompt, "chat_template": settings.chat_template}  # refused for plain text
    rows, report = load_records(train_files, format=format, bad_rows=bad_rows, **chat)
    if validation_files and validation_split:
        raise DataError("data: set validation_file (or a built-in dataset) or validation_split, not both")
    if validation_files:
        val_rows, _ = load_records(validation_files, format=format, bad_rows=bad_rows, **chat)
    else:
        rows, val_rows = split_train_validation(rows, validation_split, data_seed)
    if val_rows is not None and max_eval_samples:
        val_rows = val_rows.select(range(min(max_eval_samples, len(val_rows))))
    train, train_report = tokenize_dataset(rows, tokenizer, settings)
    _check_targets_left(train, "training", "", settings)
    validation, val_report = (
        (None, None) if val_rows is None else tokenize_dataset(val_rows, tokenizer, settings)
    )
    if validation is not None:
        where = (
            ", ".join(map(str, validation_files))
            or f"the data.validation_split rows of {', '.join(map(str, train_files))}"
        )
        _check_targets_left(validation, "validation", where, settings)
    return DataBundle(train, validation, val_rows, report.format, report, train_report, val_report)


def _check_targets_left(tokens: datasets.Dataset, split: str, where: str, settings: TokenizeSettings) -> None:
    """An empty validation set would score a perfect loss of 0 over no tokens; an empty train set, train nothing."""
    if len(tokens) > 0:
        return
    also = (
        ", or set data.truncation_side: left (keeps each example's end, where its answer is)"
        if settings.truncation_side == "right"
        else ""
    )
    raise DataError(
        f"data: no {split} example{f' ({where})' if where else ''} has a target token left after truncation to "
        f"max_seq_length={settings.max_seq_length} (truncation_side {settings.truncation_side}); "
        f"raise data.max_seq_length{also}"
    )
