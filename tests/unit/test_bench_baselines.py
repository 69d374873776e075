"""The HF baselines of bench/vs_trl.py compute the loss a fair comparison needs."""

from __future__ import annotations

from collections.abc import Callable

import torch

from tunewise.testing import build_tiny_model


def examples(lengths: list[int]) -> list[dict]:
    torch.manual_seed(3)
    rows = []
    for n in lengths:
        ids = torch.randint(3, 64, (n,)).tolist()
        prompt = n // 3  # the first third is prompt: no targets there
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


def test_flattened_and_padded_hf_batches_give_the_same_loss(bench_script: Callable[[str], object]) -> None:
    bench = bench_script("vs_trl")
    model = build_tiny_model(64, seed=0, attn_implementation="sdpa").eval()
    rows = examples([9, 17, 5, 12])
    targets = sum(sum(t != -100 for t in r["labels"][1:]) for r in rows)
    items = torch.tensor(targets)
    padded = model(**bench._pad(rows, 0, "cpu"), use_cache=False, num_items_in_batch=items).loss
    flat = bench._flatten(rows, 0, "cpu")
    packed = model(**flat, use_cache=False, num_items_in_batch=items).loss
    # Summed over the targets (not a mean per micro-batch), so micro-batches of a window add up exactly.
    halves = sum(
        model(**bench._flatten(part, 0, "cpu"), use_cache=False, num_items_in_batch=items).loss
        for part in (rows[:2], rows[2:])
    )
    assert torch.allclose(packed, padded, atol=1e-5)
    assert torch.allclose(halves, padded, atol=1e-5)
    # The control: with a KV cache transformers ignores packed position ids and attends across examples.
    leaky = model(**flat, num_items_in_batch=items).loss
    assert not torch.allclose(leaky, padded, atol=1e-3)


def test_flop_counts_match_a_hand_count_of_smollm2(bench_script: Callable[[str], object]) -> None:
    """SmolLM2-135M: 30 layers, hidden 576, 9 heads / 3 KV heads of 64, MLP 1536, vocab 49152, LoRA r 16."""
    from types import SimpleNamespace

    bench = bench_script("vs_trl")
    config = SimpleNamespace(
        hidden_size=576,
        intermediate_size=1536,
        num_attention_heads=9,
        num_key_value_heads=3,
        num_hidden_layers=30,
        vocab_size=49152,
        head_dim=64,
    )
    shape = bench.model_shape(config, 16)
    layer = 576 * 576 * 2 + 576 * 192 * 2 + 3 * 576 * 1536
    assert shape.body_params == 30 * layer
    assert shape.head_params == 49152 * 576
    lora = 16 * (2 * (576 + 576) + 2 * (576 + 192) + 3 * (576 + 1536))
    assert shape.lora_params == 30 * lora
    attention = 6 * 30 * 576 * 300**2
    required = bench.example_flops(shape, 300, 120)
    assert required == 4 * 30 * layer * 300 + 4 * 49152 * 576 * 120 + 6 * 30 * lora * 300 + attention
    nominal = bench.nominal_flops(shape, 300)
    assert nominal == 4 * (30 * layer + 49152 * 576) * 300 + attention
    # With every position a target the two counts differ only by the LoRA term.
    assert bench.example_flops(shape, 300, 300) - nominal == 6 * 30 * lora * 300


def test_trl_token_meter_leaves_out_pad_to_multiple_of_filler(bench_script: Callable[[str], object]) -> None:
    """TRL's padding-free rows rounded up by pad_to_multiple_of: only the examples' tokens count."""
    bench = bench_script("vs_trl")
    meter = bench.StepMeter("cpu", pad_token_id=2)  # type: ignore[attr-defined]
    # Two examples, the first ending in the pad id (eos as pad), then three filler tokens, each at position 0.
    ids = torch.tensor([[5, 6, 2, 7, 8, 2, 2, 2]])
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 0]])
    labels = torch.full_like(ids, -100)
    meter.forward_pre_hook(None, (), {"input_ids": ids, "position_ids": positions, "labels": labels})
    assert meter.tokens == 5
    meter.forward_pre_hook(
        None, (), {"input_ids": ids[:, :5], "position_ids": positions[:, :5], "labels": labels[:, :5]}
    )
    assert meter.tokens == 10  # no filler: every token counts
    mask = torch.tensor([[1, 1, 1, 0]])
    meter.forward_pre_hook(
        None, (), {"input_ids": ids[:, :4], "attention_mask": mask, "labels": labels[:, :4]}
    )
    assert meter.tokens == 13  # padded batches: the attention mask says
