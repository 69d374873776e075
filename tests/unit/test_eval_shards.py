"""eval_loss under torch.distributed: each rank a share of the batches, equal forward counts, exact sums."""

from __future__ import annotations

import datasets
import pytest
import torch

from tunewise.data.tokenize import TokenizeSettings, encode_row
from tunewise.eval import metrics
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
