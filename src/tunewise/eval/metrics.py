"""Evaluation: token-weighted eval loss, perplexity, and task metrics from generation."""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tunewise.data.collate import collate_padded
from tunewise.data.load import DataError
from tunewise.data.tokenize import IGNORE
from tunewise.infer.generate import SamplingSettings, generate
from tunewise.training.progress import Report


def _as_json(text: str) -> object:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return None


def exact_match(prediction: str, reference: str) -> bool:
    return prediction.strip() == reference.strip()


def json_exact_match(prediction: str, reference: str) -> bool:
    """Same JSON value, whatever the whitespace and key order; anything unparsable is a miss.

    A bool matches only a bool (Python's True == 1 would let `1` pass for `true`); JSON has one number
    type, so 1 and 1.0 are the same number.
    """
    expected = _as_json(reference)
    return expected is not None and _same_json(_as_json(prediction.strip()), expected)


def _same_json(a: object, b: object) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_json(a[key], b[key]) for key in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(_same_json, a, b))
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    return type(a) is type(b) and a == b  # strings and null


TASK_METRICS: dict[str, Callable[[str, str], bool]] = {
    "exact_match": exact_match,
    "json_exact_match": json_exact_match,
}


def choose_task_metric(requested: str, references: list[str]) -> str | None:
    if requested == "none":
        return None
    if requested != "auto":
        return requested
    if references and all(isinstance(_as_json(r), (dict, list)) for r in references):
        return "json_exact_match"
    return "exact_match"


def score(metric: str, predictions: list[str], references: list[str]) -> float:
    fn = TASK_METRICS[metric]
    return sum(fn(p, r) for p, r in zip(predictions, references)) / max(len(references), 1)


@torch.no_grad()
def eval_loss(
    loss_module: torch.nn.Module,
    dataset: object,
    batch_size: int,
    pad_id: int,
    device: torch.device,
    report: Report | None = None,
) -> dict:
    """Mean cross-entropy per target token over the whole set, and its perplexity.

    Under torch.distributed each rank takes every world-th batch and the sums are all-reduced. Every rank
    runs the same number of forward passes (a rank short of a batch reruns one and discards it), as
    DDP's buffer broadcast and FSDP's all-gathers in forward need. `report(done, total)` follows this
    rank's forward passes.
    """
    world, rank = _world()
    n = len(dataset)  # type: ignore[arg-type]
    batches = [(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
    mine = batches[rank::world]
    was_training = loss_module.training
    loss_module.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # summed loss, target tokens
    passes = math.ceil(len(batches) / world)
    if report:
        report(0, passes)
    for i in range(passes):
        start, stop = mine[i] if i < len(mine) else batches[0]
        rows = dataset[start:stop]  # type: ignore[index]
        examples = [{"input_ids": x, "labels": y} for x, y in zip(rows["input_ids"], rows["labels"])]
        batch = {k: v.to(device) for k, v in collate_padded(examples, pad_id).items()}
        summed = loss_module(**batch)
        if i < len(mine):
            sums += torch.stack([summed.double(), (batch["targets"] != IGNORE).sum().double()])
        if report:
            report(i + 1, passes)
    loss_module.train(was_training)
    if world > 1:
        torch.distributed.all_reduce(sums)
    total, count = sums.tolist()
    if count == 0:  # a mean over no tokens is undefined; 0 / max(0, 1) reported a perfect loss
        raise DataError(
            f"eval_loss: the {n} evaluation examples hold no target token, so there is no loss to measure; "
            "every validation example needs an answer token left after truncation (data.build_data checks this)"
        )
    loss = total / count
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}


def generate_answers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[list[dict]],
    settings: SamplingSettings,
    batch_size: int,
    chat_template: str | None,
    report: Report | None = None,
) -> list[str]:
    """`generate` for every conversation; under torch.distributed each rank answers every world-th batch.

    The batches are the ones a single process makes (same members, same left padding), so greedy answers
    are the same as there; every rank gets all the answers, in order. `report(done, total)` follows this
    rank's answers.
    """
    world, rank = _world()
    starts = range(0, len(conversations), batch_size)
    total = sum(len(conversations[start : start + batch_size]) for start in starts[rank::world])
    mine: dict[int, list[str]] = {}
    if report:
        report(0, total)
    for start in starts[rank::world]:
        batch = conversations[start : start + batch_size]
        mine[start] = generate(model, tokenizer, batch, settings, batch_size, chat_template)
        if report:
            report(sum(map(len, mine.values())), total)
    if world > 1:
        shares: list[dict[int, list[str]] | None] = [None] * world
        torch.distributed.all_gather_object(shares, mine)
        mine = {start: answers for share in shares if share for start, answers in share.items()}
    return [answer for start in starts for answer in mine[start]]


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0
