"""Evaluation under torch.distributed: each rank a share of the batches; the same results as one process. And
no loss over no target tokens."""

from __future__ import annotations

import datasets
import pytest
import torch

from tunewise.data.load import DataError
from tunewise.data.tokenize import IGNORE, TokenizeSettings, encode_row
from tunewise.eval import metrics
from tunewise.infer.generate import SamplingSettings, prompt_messages
from tunewise.testing import build_tiny_model, build_tiny_tokenizer, tiny_chat_rows
from tunewise.training.loss import CausalLMLoss


class Counting(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, **batch: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.inner(**batch)


def test_ranks_split_the_batches_and_their_sums_add_up_to_one_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tok = build_tiny_tokenizer()
    rows = [encode_row(r, tok, TokenizeSettings(128)) for r in tiny_chat_rows(5, seed=4)]
    dataset = datasets.Dataset.from_list(rows)
    loss = CausalLMLoss(build_tiny_model(len(tok), seed=0))
    cpu = torch.device("cpu")
    single = metrics.eval_loss(loss, dataset, 2, tok.pad_token_id, cpu)  # 3 batches: 2, 2, 1 rows

    shares: list[list[float]] = []
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t: shares.append(t.tolist()))
    calls = []
    for rank in (0, 1):
        monkeypatch.setattr(metrics, "_world", lambda rank=rank: (2, rank))
        counting = Counting(loss)
        metrics.eval_loss(counting, dataset, 2, tok.pad_token_id, cpu)
        calls.append(counting.calls)
    assert calls == [2, 2]  # rank 1 has one batch and reruns one, discarded
    total = sum(s[0] for s in shares)
    count = sum(s[1] for s in shares)
    targets = [sum(t != -100 for t in r["labels"][1:]) for r in rows]
    assert count == sum(targets)
    assert shares[1][1] == targets[2] + targets[3]  # rank 1: batch 1 (rows 2-3); rank 0: batches 0 and 2
    assert total / count == pytest.approx(single["eval_loss"], rel=1e-6)


class Gathered(Exception):
    """Stops a rank at its all_gather_object, once its share is recorded."""


def test_ranks_answer_every_world_th_batch_and_all_get_one_process_answers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tok = build_tiny_tokenizer()
    model = build_tiny_model(len(tok), seed=1)
    prompts = [prompt_messages(r["messages"])[0] for r in tiny_chat_rows(5, seed=6)]
    greedy = SamplingSettings(max_new_tokens=6, do_sample=False)
    single = metrics.generate_answers(model, tok, prompts, greedy, 2, None)  # batches at 0, 2, 4
    assert len(single) == 5 and len(set(single)) > 1  # distinct prompts, distinct greedy answers

    shares: dict[int, dict[int, list[str]]] = {}

    def record(out: list, share: dict, rank: int) -> None:
        shares[rank] = share
        raise Gathered

    for rank in (0, 1):
        monkeypatch.setattr(metrics, "_world", lambda rank=rank: (2, rank))
        monkeypatch.setattr(
            torch.distributed, "all_gather_object", lambda out, obj, rank=rank: record(out, obj, rank)
        )
        with pytest.raises(Gathered):
            metrics.generate_answers(model, tok, prompts, greedy, 2, None)
    assert sorted(shares[0]) == [0, 4] and sorted(shares[1]) == [2]
    assert shares[0][0] == single[0:2] and shares[1][2] == single[2:4] and shares[0][4] == single[4:]

    monkeypatch.setattr(
        torch.distributed,
        "all_gather_object",
        lambda out, obj: out.__setitem__(slice(None), [shares[0], shares[1]]),
    )
    for rank in (0, 1):
        monkeypatch.setattr(metrics, "_world", lambda rank=rank: (2, rank))
        assert metrics.generate_answers(model, tok, prompts, greedy, 2, None) == single


def test_progress_reports_follow_this_ranks_own_work(monkeypatch: pytest.MonkeyPatch) -> None:
    tok = build_tiny_tokenizer()
    rows = [encode_row(r, tok, TokenizeSettings(128)) for r in tiny_chat_rows(5, seed=4)]
    dataset = datasets.Dataset.from_list(rows)
    loss = CausalLMLoss(build_tiny_model(len(tok), seed=0))
    model = build_tiny_model(len(tok), seed=1)
    prompts = [prompt_messages(r["messages"])[0] for r in tiny_chat_rows(5, seed=6)]
    greedy = SamplingSettings(max_new_tokens=6, do_sample=False)
    cpu = torch.device("cpu")

    reports: list[tuple[int, int]] = []
    quiet = metrics.eval_loss(loss, dataset, 2, tok.pad_token_id, cpu)
    assert metrics.eval_loss(loss, dataset, 2, tok.pad_token_id, cpu, lambda *r: reports.append(r)) == quiet
    assert reports == [(0, 3), (1, 3), (2, 3), (3, 3)]  # batches of 2, 2, 1 rows
    reports.clear()
    answers = metrics.generate_answers(model, tok, prompts, greedy, 2, None)
    assert (
        metrics.generate_answers(model, tok, prompts, greedy, 2, None, lambda *r: reports.append(r))
        == answers
    )
    assert reports == [(0, 5), (2, 5), (4, 5), (5, 5)]  # answers, not batches

    # Rank 1 of 2: its own forward passes (one batch and the discarded rerun) and its own answers.
    monkeypatch.setattr(metrics, "_world", lambda: (2, 1))
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t: None)
    monkeypatch.setattr(torch.distributed, "all_gather_object", lambda out, obj: out.__setitem__(0, obj))
    reports.clear()
    metrics.eval_loss(loss, dataset, 2, tok.pad_token_id, cpu, lambda *r: reports.append(r))
    assert reports == [(0, 2), (1, 2), (2, 2)]
    reports.clear()
    with pytest.raises(KeyError):  # the stand-in gather hands back rank 1's share only
        metrics.generate_answers(model, tok, prompts, greedy, 2, None, lambda *r: reports.append(r))
    assert reports == [(0, 2), (2, 2)]


@pytest.mark.parametrize("rows", [0, 3])
def test_eval_loss_over_no_target_tokens_is_an_error_not_a_perfect_score(rows: int) -> None:
    tok = build_tiny_tokenizer()
    examples = [encode_row(r, tok, TokenizeSettings(128)) for r in tiny_chat_rows(rows, seed=4)]
    masked = [{"input_ids": e["input_ids"], "labels": [IGNORE] * e["length"]} for e in examples]
    dataset = datasets.Dataset.from_dict(
        {"input_ids": [m["input_ids"] for m in masked], "labels": [m["labels"] for m in masked]}
    )
    loss = CausalLMLoss(build_tiny_model(len(tok), seed=0))
    with pytest.raises(DataError, match=f"the {rows} evaluation examples hold no target token"):
        metrics.eval_loss(loss, dataset, 2, tok.pad_token_id, torch.device("cpu"))  # was 0.0, perplexity 1.0
