"""The fused target loss equals a plain full-logits cross-entropy, value and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tunewise.data.collate import collate_packed, collate_padded
from tunewise.data.tokenize import IGNORE
from tunewise.testing import build_tiny_model
from tunewise.training.loss import CausalLMLoss, is_right_padded, target_cross_entropy

VOCAB = 50
TOL = 1e-5


def reference_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Full logits at every position, padding mask passed to the model, summed CE over targets."""
    inputs = {k: v for k, v in batch.items() if k != "targets"}
    logits = model(**inputs, use_cache=False).logits.float()
    return F.cross_entropy(
        logits.flatten(0, 1), batch["targets"].flatten(), ignore_index=IGNORE, reduction="sum"
    )


def value_and_grads(loss_fn, params: list[torch.Tensor]) -> tuple[float, list[torch.Tensor]]:
    for p in params:
        p.grad = None
    loss = loss_fn()
    (loss / 7).backward()  # a non-unit upstream gradient, as the loop's division by the target count
    return loss.item(), [p.grad.clone() for p in params]


def assert_close(a: tuple[float, list[torch.Tensor]], b: tuple[float, list[torch.Tensor]]) -> None:
    assert abs(a[0] - b[0]) < TOL * max(1.0, abs(b[0])), f"loss {a[0]} vs reference {b[0]}"
    for got, want in zip(a[1], b[1], strict=True):
        assert (got - want).abs().max().item() < TOL


@pytest.mark.parametrize("chunk", [1, 7, 1024])
@pytest.mark.parametrize("with_bias", [False, True])
def test_target_cross_entropy_matches_full_logits(chunk: int, with_bias: bool) -> None:
    torch.manual_seed(0)
    hidden = torch.randn(3, 11, 16, requires_grad=True)
    head = nn.Linear(16, VOCAB, bias=with_bias)
    targets = torch.randint(0, VOCAB, (3, 11))
    targets[0, :4] = IGNORE  # a prompt
    targets[2, 8:] = IGNORE  # padding
    params = [hidden, *head.parameters()]

    def reference() -> torch.Tensor:
        logits = head(hidden).float()
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")

    assert_close(
        value_and_grads(lambda: target_cross_entropy(hidden, targets, head, chunk), params),
        value_and_grads(reference, params),
    )


class CountLinear(torch.overrides.TorchFunctionMode):
    """Counts F.linear calls: the fused loss runs the head once per chunk of rows."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.calls += func is F.linear
        return func(*args, **(kwargs or {}))


def test_on_cpu_the_head_runs_in_chunks_of_128_rows_by_default() -> None:
    from tunewise.training.loss import CPU_LOGIT_CHUNK, LOGIT_CHUNK, logit_chunk

    assert logit_chunk(torch.device("cpu")) == CPU_LOGIT_CHUNK == 128
    assert logit_chunk(torch.device("cuda")) == LOGIT_CHUNK == 1024
    torch.manual_seed(0)
    hidden = torch.randn(2, 160, 16, requires_grad=True)
    head = nn.Linear(16, VOCAB)
    targets = torch.randint(0, VOCAB, (2, 160))
    targets[1, 100:] = IGNORE  # 260 target rows: chunks of 128, 128 and 4
    params = [hidden, *head.parameters()]
    results = {}
    for chunk in (None, 1024):
        with CountLinear() as count:
            results[chunk] = value_and_grads(
                lambda c=chunk: target_cross_entropy(hidden, targets, head, c), params
            )
        assert count.calls == (3 if chunk is None else 1)
    assert_close(results[None], results[1024])


def test_a_bf16_head_gets_bf16_gradients_close_to_fp32() -> None:
    """Full fine-tuning in bf16: one bf16 copy of the softmax serves the hidden and the weight gradient."""
    torch.manual_seed(0)
    hidden32 = torch.randn(3, 11, 16)
    head32 = nn.Linear(16, VOCAB, bias=False)
    targets = torch.randint(0, VOCAB, (3, 11))
    targets[0, :4] = IGNORE
    hidden = hidden32.bfloat16().requires_grad_()
    head = nn.Linear(16, VOCAB, bias=False, dtype=torch.bfloat16)
    head.weight.data.copy_(head32.weight.data)
    got = value_and_grads(lambda: target_cross_entropy(hidden, targets, head, 7), [hidden, head.weight])
    # The reference: the same bf16 values, upcast, in fp32 throughout.
    hidden_ref = hidden.detach().float().requires_grad_()
    head_ref = nn.Linear(16, VOCAB, bias=False)
    head_ref.weight.data.copy_(head.weight.data.float())
    want = value_and_grads(
        lambda: target_cross_entropy(hidden_ref, targets, head_ref, 7), [hidden_ref, head_ref.weight]
    )
    assert [g.dtype for g in got[1]] == [torch.bfloat16, torch.bfloat16]
    assert abs(got[0] - want[0]) < 1e-2 * want[0]
    for g, w in zip(got[1], want[1], strict=True):
        assert (g.float() - w).abs().max().item() < 0.02 * w.abs().max().item()  # bf16 rounding, ~2^-8


@pytest.mark.parametrize("chunk", [16, 1024])
def test_rounded_rows_of_a_bf16_head_on_cpu_add_nothing(chunk: int) -> None:
    """oneDNN shape rounding: 37 target rows run as 64; the loss and every gradient are the unrounded ones.

    The head has a bias: zero hidden rows add nothing to the weight's gradient, but their softmax would to
    the bias's. (Whether the rounding applies by default is the next test's.)"""
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, dtype=torch.bfloat16, requires_grad=True)
    head = nn.Linear(16, VOCAB, bias=True, dtype=torch.bfloat16)
    targets = torch.randint(0, VOCAB, (37,))
    params = [hidden, *head.parameters()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rounded = value_and_grads(
            lambda: target_cross_entropy(hidden, targets, head, chunk, row_multiple=64), params
        )
        plain = value_and_grads(
            lambda: target_cross_entropy(hidden, targets, head, chunk, row_multiple=1), params
        )
    # chunk 16: the third chunk holds real rows 32-36 and rounding rows, the fourth only rounding rows
    assert rounded[0] == pytest.approx(plain[0], rel=1e-6)
    for got, want in zip(rounded[1], plain[1], strict=True):
        assert got.shape == want.shape
        assert (got.float() - want.float()).abs().max().item() <= 1e-3 * want.float().abs().max().item()


def test_row_rounding_is_for_half_precision_matmuls_on_cpu() -> None:
    from tunewise.training.loss import CPU_HALF_ROW_MULTIPLE, _cpu_half_rounding

    cpu, bf16 = torch.device("cpu"), torch.ones(1, dtype=torch.bfloat16)
    assert _cpu_half_rounding(cpu, bf16) == CPU_HALF_ROW_MULTIPLE == 64
    assert _cpu_half_rounding(cpu, torch.ones(1)) == 1  # fp32: MKL, no per-shape kernels
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _cpu_half_rounding(cpu, torch.ones(1)) == 64  # an fp32 head under bf16 autocast
    assert _cpu_half_rounding(torch.device("cuda"), bf16) == 1


def test_without_grad_gives_the_same_sum() -> None:
    torch.manual_seed(0)
    hidden, head = torch.randn(2, 9, 16), nn.Linear(16, VOCAB)
    targets = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        plain = target_cross_entropy(hidden, targets, head, chunk=4)
    fused = target_cross_entropy(hidden.requires_grad_(), targets, head, chunk=4)
    assert abs(plain.item() - fused.item()) < TOL


def batches() -> dict[str, dict[str, torch.Tensor]]:
    rng = torch.Generator().manual_seed(1)
    examples = []
    for n, prompt in [(9, 4), (5, 2), (13, 6)]:
        ids = torch.randint(3, VOCAB, (n,), generator=rng).tolist()
        examples.append({"input_ids": ids, "labels": [IGNORE] * prompt + ids[prompt:]})
    left = collate_padded(examples, pad_token_id=0, padding_side="left")
    return {
        "right-padded": collate_padded(examples, pad_token_id=0),
        "left-padded": left,
        # Without position ids only the mask keeps real tokens from attending to the pads on their left.
        "left-padded-mask-only": {k: v for k, v in left.items() if k != "position_ids"},
        "packed": collate_packed(examples),
    }


@pytest.mark.parametrize("layout", ["right-padded", "left-padded", "left-padded-mask-only", "packed"])
@pytest.mark.parametrize("tied", [False, True])
def test_causal_lm_loss_matches_full_logits_reference(layout: str, tied: bool) -> None:
    # A wide init makes attention far from uniform, so attending to a pad or to another example
    # would move the loss well past the tolerance.
    model = build_tiny_model(VOCAB, seed=0, initializer_range=0.2, tie_word_embeddings=tied)
    params = [p for p in model.parameters() if p.requires_grad]
    batch = batches()[layout]
    assert_close(
        value_and_grads(lambda: CausalLMLoss(model)(**batch), params),
        value_and_grads(lambda: reference_loss(model, batch), params),
    )


def test_right_padding_is_told_from_left_padding() -> None:
    assert is_right_padded(batches()["right-padded"]["attention_mask"])
    assert not is_right_padded(batches()["left-padded"]["attention_mask"])


def test_gradients_keep_the_parameter_dtypes_under_autocast() -> None:
    model = build_tiny_model(VOCAB, seed=0)
    batch = batches()["right-padded"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = CausalLMLoss(model)(**batch)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    reference = reference_loss(model, batch).item()
    assert abs(loss.item() - reference) < 0.02 * reference  # bf16 matmuls, same loss to ~1%
    assert all(p.grad.dtype == p.dtype for p in model.parameters())


def post_processed_models() -> dict[str, nn.Module]:
    """Tiny models whose CausalLM forward changes the logits after the LM head."""
    from transformers import (
        CohereConfig,
        CohereForCausalLM,
        Gemma2Config,
        Gemma2ForCausalLM,
        GraniteConfig,
        GraniteForCausalLM,
    )

    shape = {
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "initializer_range": 0.2,
    }
    torch.manual_seed(0)
    return {
        "granite": GraniteForCausalLM(GraniteConfig(**shape, logits_scaling=8.0)),
        "cohere": CohereForCausalLM(CohereConfig(**shape, logit_scale=0.0625)),
        "gemma2": Gemma2ForCausalLM(Gemma2Config(**shape, final_logit_softcapping=3.0)),
    }


@pytest.mark.parametrize("name", ["granite", "cohere", "gemma2"])
@pytest.mark.parametrize("layout", ["right-padded", "packed"])
def test_a_model_that_changes_its_logits_after_the_head_trains_on_its_own_logits(
    name: str, layout: str
) -> None:
    # Granite divides by logits_scaling, Cohere multiplies by logit_scale, Gemma 2 soft-caps: the fused head
    # alone would miss each (0.2-0.9 nats off on these models), so the loss must be the model's own.
    model = post_processed_models()[name]
    params = [p for p in model.parameters() if p.requires_grad]
    batch = batches()[layout]
    loss = CausalLMLoss(model)
    assert_close(
        value_and_grads(lambda: loss(**batch), params),
        value_and_grads(lambda: reference_loss(model, batch), params),
    )
    assert loss.plain_head is False
    # What the fused head alone computes is not this model's loss:
    head_only = CausalLMLoss(model)
    head_only.plain_head = True
    with torch.no_grad():
        assert abs(head_only(**batch).item() - reference_loss(model, batch).item()) > 0.1


def test_a_plain_head_keeps_the_fused_loss() -> None:
    loss = CausalLMLoss(build_tiny_model(VOCAB, seed=0))
    loss(**batches()["packed"])
    assert loss.plain_head is True


def test_a_right_padded_batch_keeps_its_mask_under_bidirectional_attention() -> None:
    # Dropping the padding mask is only free under causal attention: Gemma 3 with use_bidirectional_attention
    # attends both ways, and without the mask real tokens would attend to the pads.
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, initializer_range=0.2, use_bidirectional_attention=True,
    )  # fmt: skip
    model = Gemma3ForCausalLM(config).eval()
    batch = batches()["right-padded"]
    loss = CausalLMLoss(model)
    with torch.no_grad():
        assert (
            abs(loss(**batch).item() - reference_loss(model, batch).item())
            < TOL * reference_loss(model, batch).item()
        )
    assert loss.causal is False
    causal = CausalLMLoss(build_tiny_model(VOCAB, seed=0))
    causal(**batch)
    assert causal.causal is True
