"""Activation memory measured on the model (models/activations.py): against torch's own memory profiler on the
same micro-batches, packed and padded, and without touching the random state."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from tunewise.data.collate import collate_packed, collate_padded
from tunewise.models.activations import saved_for_backward
from tunewise.models.adapters import LoraSettings, apply_method
from tunewise.models.fast import VARLEN_SDPA
from tunewise.testing import build_tiny_model
from tunewise.training.loss import CausalLMLoss

VOCAB = 64


def tiny_lora(dropout: float = 0.0, checkpointing: bool = False) -> CausalLMLoss:
    settings = LoraSettings(r=4, lora_alpha=8, lora_dropout=dropout)
    model = apply_method(
        build_tiny_model(VOCAB, seed=0),
        "lora",
        settings,
        quantized=False,
        gradient_checkpointing=checkpointing,
    )
    loss_module = CausalLMLoss(model)
    loss_module.train()
    return loss_module


def examples(lengths: list[int]) -> list[dict]:
    g = torch.Generator().manual_seed(7)
    return [
        {"input_ids": (ids := torch.randint(3, VOCAB, (n,), generator=g).tolist()), "labels": ids}
        for n in lengths
    ]


def allocated_by_forward(loss_module: CausalLMLoss, batch: dict[str, torch.Tensor]) -> int:
    """What the forward leaves allocated, by torch's memory profiler: every allocation minus every free."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = loss_module(**batch)
    loss_module.zero_grad(set_to_none=True)
    held = sum(event.self_cpu_memory_usage for event in prof.key_averages())
    loss.backward()
    return held


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
def test_the_count_is_what_the_forward_keeps_allocated(packed: bool) -> None:
    """Four examples packed in one row (700 tokens, attention within each example) or padded to four rows of 200:
    the bytes counted equal what torch's memory profiler sees the same forward keep allocated."""
    loss_module = tiny_lora()
    loss_module.model.set_attn_implementation(VARLEN_SDPA)  # as tunewise's runs with packing
    if packed:
        batch = collate_packed(examples([100, 150, 250, 200]), pad_token_id=0)
    else:
        batch = collate_padded(examples([120, 200, 80, 200]), pad_token_id=0)
    counted = saved_for_backward(loss_module, batch, None)
    held = allocated_by_forward(loss_module, batch)
    assert counted > 100 * batch["input_ids"].numel()  # hundreds of bytes per token, not a stray tensor
    assert counted == pytest.approx(held, rel=0.001)


def test_a_padding_mask_that_grows_with_length_squared_is_counted_as_it_is() -> None:
    """Left padding keeps a mask, and sdpa's masked path a length x length weight for backward: the count
    follows it (no per-token extrapolation)."""
    loss_module = tiny_lora()
    short = collate_padded(examples([50, 100]), pad_token_id=0, padding_side="left")
    long = collate_padded(examples([100, 200]), pad_token_id=0, padding_side="left")
    counted = [saved_for_backward(loss_module, b, None) for b in (short, long)]
    assert counted[1] > 2.2 * counted[0]  # twice the tokens, more than twice the bytes
    assert counted[1] == pytest.approx(allocated_by_forward(loss_module, long), rel=0.001)


def test_counting_leaves_the_random_state_and_the_mode_as_they_were() -> None:
    """LoRA dropout draws random numbers in every training forward; the count puts the state back."""
    loss_module = tiny_lora(dropout=0.1)
    loss_module.eval()
    batch = collate_packed(examples([30, 40]), pad_token_id=0)
    torch.manual_seed(5)
    saved_for_backward(loss_module, batch, None)
    after = torch.rand(4)
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(4))
    assert not loss_module.training


def test_gradient_checkpointing_and_bf16_keep_less() -> None:
    batch = collate_packed(examples([200, 300]), pad_token_id=0)
    plain = saved_for_backward(tiny_lora(), batch, None)
    assert saved_for_backward(tiny_lora(checkpointing=True), batch, None) < 0.5 * plain
    assert saved_for_backward(tiny_lora(), batch, torch.bfloat16) < 0.75 * plain
