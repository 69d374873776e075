"""Turn tokenised examples into model batches: padded, or packed without padding.

Labels are shifted here, per example (`targets[t]` is the token position t must predict), so a
packed row never asks the last token of one example to predict the first token of the next.

Packing flattens the examples of a micro-batch into a single row whose `position_ids` restart at 0
for every example and passes no attention mask, leaving the model to keep the examples apart. With
`attn_implementation: sdpa` tunewise's `models.fast.varlen_sdpa` attends within each example (torch's
flash varlen kernel on GPU, a per-example loop on CPU: cost sum(L_i^2)); with eager attention
transformers builds a block-diagonal causal mask from the position ids (cost (sum L_i)^2), and
flash_attention_2 takes the boundaries from them, in models that hand the position ids on. Not all do:
Bloom and MPT (ALiBi, any attention) and OPT under eager build a mask causal across the whole row, so
their examples would see each other; `training.loss.packing_problem` measures this when a run is
prepared and refuses packing there. A batch stays N examples, exactly as without packing, so steps per
epoch and every other count keep their Hugging Face meaning; only the pad tokens disappear.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from transformers.trainer_pt_utils import get_length_grouped_indices

from tunewise.data.tokenize import IGNORE

PADDING_SIDES = ("right", "left")


def shifted_targets(labels: Sequence[int]) -> list[int]:
    """`targets[t]` = the label of token t + 1; the last token predicts nothing."""
    return list(labels[1:]) + [IGNORE]


def round_up(n: int, multiple: int | None) -> int:
    return n if not multiple else -(-n // multiple) * multiple


def padded_width(
    longest: int, pad_to_length: int | None = None, pad_to_multiple_of: int | None = None
) -> int:
    """Columns of a padded batch: its longest example (or `pad_to_length`), rounded up to the multiple."""
    return round_up(max(pad_to_length or 0, longest), pad_to_multiple_of)


def batch_tensor_tokens(
    sizes: Sequence[int],
    *,
    packed: bool,
    pad_to_length: int | None = None,
    pad_to_multiple_of: int | None = None,
) -> int:
    """Tokens in the input tensor of a micro-batch of examples of `sizes` tokens, padding included."""
    if packed:
        return round_up(sum(sizes), pad_to_multiple_of)
    return len(sizes) * padded_width(max(sizes, default=0), pad_to_length, pad_to_multiple_of)


def collate_padded(
    examples: Sequence[dict],
    pad_token_id: int,
    *,
    padding_side: str = "right",
    pad_to_length: int | None = None,
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """Pad to one width; pads get attention_mask 0 and target IGNORE, whatever `pad_token_id` is.

    Targets come from the labels alone, never from comparing ids with the pad id, so a pad id equal to
    EOS (SmolLM2) cannot hide the EOS targets. Left padding also returns `position_ids` counting from 0
    at each example's first real token, as generation does, so positions do not depend on the padding.
    """
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}")
    width = padded_width(max(len(e["input_ids"]) for e in examples), pad_to_length, pad_to_multiple_of)
    ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    targets = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        cols = slice(0, n) if padding_side == "right" else slice(width - n, width)
        ids[row, cols] = torch.tensor(example["input_ids"])
        targets[row, cols] = torch.tensor(shifted_targets(example["labels"]))
        mask[row, cols] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "targets": targets}
    if padding_side == "left":
        batch["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    return batch


def collate_packed(
    examples: Sequence[dict], pad_to_multiple_of: int | None = None, pad_token_id: int = 0
) -> dict[str, torch.Tensor]:
    """All examples in one row, `position_ids` restarting at 0 for each, no attention mask (see the module doc)."""
    ids: list[int] = []
    targets: list[int] = []
    positions: list[int] = []
    for example in examples:
        n = len(example["input_ids"])
        ids += example["input_ids"]
        targets += shifted_targets(example["labels"])
        positions += range(n)
    extra = round_up(len(ids), pad_to_multiple_of) - len(ids)
    if extra:  # a filler "example": its positions restart, so nothing attends to it; nothing to learn
        ids += [pad_token_id] * extra
        targets += [IGNORE] * extra
        positions += range(extra)
    columns = {"input_ids": ids, "position_ids": positions, "targets": targets}
    return {name: torch.tensor(values, dtype=torch.long).unsqueeze(0) for name, values in columns.items()}


def batch_indices(
    lengths: Sequence[int],
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    group_by_length: bool,
    group_size: int | None = None,
) -> list[list[int]]:
    """Index lists, one per micro-batch, for one epoch: the (shuffled) order cut into batches of `batch_size`.

    With `group_by_length` the order is HF's LengthGroupedSampler's, from transformers' own
    `get_length_grouped_indices` (random by design, drawn from `seed`): mega-batches of min(N // (4 x group),
    50) groups of `group_size` examples (default `batch_size`; HF's group is one optimizer step's examples), each
    sorted longest first and kept in order, the longest example swapped to the very front so a batch too large for
    memory fails at step 1.
    """
    if group_by_length and lengths:
        # Fix (test_collate_packing.py): a hand-written copy always took mega-batches of 50 and then shuffled the
        # batches, grouping a small dataset much more tightly than HF, whose scheme the docs promised.
        generator = torch.Generator().manual_seed(seed)
        order = get_length_grouped_indices(list(lengths), group_size or batch_size, generator=generator)
    else:
        order = list(range(len(lengths)))
        if shuffle:
            random.Random(seed).shuffle(order)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def group_window_by_length(batches: list[list[int]], lengths: Sequence[int]) -> list[list[int]]:
    """The examples of one accumulation window, regrouped by length across its padded micro-batches.

    Each micro-batch keeps its size and takes the next run of the window's examples sorted longest
    first, which needs the fewest pad tokens. Which examples share an optimizer step is unchanged, and
    so is the step's gradient: every micro-batch's loss is divided by the window's target count.
    """
    position = {i: p for p, i in enumerate(i for b in batches for i in b)}
    longest_first = sorted(position, key=lambda i: (-lengths[i], position[i]))
    groups, start = [], 0
    for batch in batches:
        groups.append(sorted(longest_first[start : start + len(batch)], key=position.__getitem__))
        start += len(batch)
    return groups


def pack_within(
    batches: list[list[int]], lengths: Sequence[int], max_tokens: int, pad_to_multiple_of: int | None = None
) -> list[list[int]]:
    """The examples of one accumulation window re-cut into packed rows of at most `max_tokens` tokens,
    counting the pads that round a row up to `pad_to_multiple_of`.

    First-fit decreasing: each example, longest first, joins the first row with room for it or opens a
    new one, so the window needs few rows; an example that does not fit alone has a row of its own. Each
    row keeps the drawn order. Which examples form the step, and so its gradient, is unchanged (every
    micro-batch's loss is divided by the window's target count); only the number of micro-batches varies.
    A window with no examples (a rank's empty share under DDP) stays one empty micro-batch.
    """
    drawn = [i for b in batches for i in b]
    position = {i: p for p, i in enumerate(drawn)}
    rows: list[list[int]] = []
    used: list[int] = []
    for i in sorted(drawn, key=lambda i: (-lengths[i], position[i])):
        fits = (r for r, n in enumerate(used) if round_up(n + lengths[i], pad_to_multiple_of) <= max_tokens)
        row = next(fits, None)
        if row is None:
            rows.append([i])
            used.append(lengths[i])
        else:
            rows[row].append(i)
            used[row] += lengths[i]
    return [sorted(r, key=position.__getitem__) for r in rows] or [[]]


def largest_first(batches: list[list[int]], lengths: Sequence[int]) -> list[list[int]]:
    """The micro-batches of one accumulation window, the one with the most tokens first (ties as drawn).

    The step's gradient is the same in any order. On CPU, where glibc's heap keeps what it freed for
    reuse (`training/host_memory.py`), the largest micro-batch first sizes the heap once and the smaller
    ones reuse its blocks; a larger one after smaller ones finds them cut up and grows the heap past
    what is live (packed micro-batches of 2, fp32: 0.15 GiB lower peak RSS, docs/performance.md).
    """
    return sorted(batches, key=lambda b: -sum(lengths[i] for i in b))


def iterate_batches(
    dataset: Any, batches: list[list[int]], collate: Callable[[list[dict]], dict[str, torch.Tensor]]
) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    """(indices, collated batch) for each index list; `dataset[indices]` is a dict of columns, as in `datasets`."""
    for indices in batches:
        rows = dataset[indices]
        examples = [dict(zip(rows, values)) for values in zip(*rows.values())]
        yield indices, collate(examples)
