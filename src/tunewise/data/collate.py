"""Turn tokenised examples into model batches: padded, or packed without padding.

Labels are shifted here, per example (`targets[t]` is the token position t must predict), so a
packed row never asks the last token of one example to predict the first token of the next.

Packing flattens the examples of a micro-batch into a single row whose `position_ids` restart at 0
for every example and passes no attention mask: transformers then builds a block-diagonal causal
mask from the position ids (sdpa and eager on CPU, flash-attention varlen on GPU), so no example
attends to another. A batch stays N examples, exactly as without packing, so steps per epoch and
every other count keep their Hugging Face meaning; only the pad tokens disappear.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import torch

from tunewise.data.tokenize import IGNORE


def shifted_targets(labels: Sequence[int]) -> list[int]:
    return list(labels[1:]) + [IGNORE]


def _round_up(n: int, multiple: int | None) -> int:
    return n if not multiple else -(-n // multiple) * multiple


def collate_padded(
    examples: Sequence[dict],
    pad_token_id: int,
    *,
    padding_side: str = "right",
    pad_to_length: int | None = None,
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    width = _round_up(pad_to_length or max(len(e["input_ids"]) for e in examples), pad_to_multiple_of)
    ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    targets = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        cols = slice(0, n) if padding_side == "right" else slice(width - n, width)
        ids[row, cols] = torch.tensor(example["input_ids"])
        targets[row, cols] = torch.tensor(shifted_targets(example["labels"]))
        mask[row, cols] = 1
    return {"input_ids": ids, "attention_mask": mask, "targets": targets}


def collate_packed(
    examples: Sequence[dict], pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    ids: list[int] = []
    targets: list[int] = []
    positions: list[int] = []
    for example in examples:
        n = len(example["input_ids"])
        ids += example["input_ids"]
        targets += shifted_targets(example["labels"])
        positions += range(n)
    extra = _round_up(len(ids), pad_to_multiple_of) - len(ids)
    if extra:  # a filler "example" of pad id 0, positions restarting, nothing to learn
        ids += [0] * extra
        targets += [IGNORE] * extra
        positions += range(extra)
    as_row = lambda values: torch.tensor(values, dtype=torch.long).unsqueeze(0)  # noqa: E731
    return {"input_ids": as_row(ids), "position_ids": as_row(positions), "targets": as_row(targets)}


def batch_indices(
    lengths: Sequence[int], batch_size: int, *, shuffle: bool, seed: int, group_by_length: bool
) -> list[list[int]]:
    """Index lists, one per micro-batch, for one epoch.

    With `group_by_length`, indices are shuffled, cut into mega-batches of 50 batches, each sorted by
    length and re-cut into batches, and the batches shuffled: similar lengths share a batch while the
    order stays random (the same scheme as HF's LengthGroupedSampler).
    """
    order = list(range(len(lengths)))
    rng = random.Random(seed)
    if shuffle:
        rng.shuffle(order)
    if group_by_length:
        mega = batch_size * 50
        grouped: list[int] = []
        for start in range(0, len(order), mega):
            grouped += sorted(order[start : start + mega], key=lambda i: -lengths[i])
        order = grouped
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if group_by_length and shuffle:
        rng.shuffle(batches)
    return batches


def iterate_batches(
    dataset: Sequence[dict] | object, batches: list[list[int]], collate: object
) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    for indices in batches:
        rows = dataset[indices]  # type: ignore[index]  # datasets returns a dict of columns
        examples = [dict(zip(rows, values)) for values in zip(*rows.values())]
        yield indices, collate(examples)  # type: ignore[operator]
