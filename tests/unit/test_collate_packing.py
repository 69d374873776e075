"""Padding, packing and batching: the same examples give the same loss and gradients however they are batched."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.trainer_pt_utils import get_length_grouped_indices

from tunewise.config.problems import ConfigError
from tunewise.data.collate import (
    batch_indices,
    collate_packed,
    collate_padded,
    group_window_by_length,
    iterate_batches,
    largest_first,
    pack_within,
    round_up,
    shifted_targets,
)
from tunewise.data.tokenize import IGNORE, TokenizeSettings, encode_row
from tunewise.models.fast import VARLEN_SDPA
from tunewise.testing import build_tiny_model, build_tiny_tokenizer, tiny_chat_rows
from tunewise.training.loop import LoopSettings, epoch_windows
from tunewise.training.loss import PACKING_LEAK_TOLERANCE, CausalLMLoss, packing_leak

Batch = dict[str, torch.Tensor]


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    # Matrices this small gain nothing from intra-op threads, and on a shared CPU the thread
    # handoffs made each forward/backward ~30x slower (1 s instead of 30 ms).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerBase:
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def examples(tok: PreTrainedTokenizerBase) -> list[dict]:
    rows = tiny_chat_rows(4, seed=3, max_words=6)
    encoded = [encode_row(r, tok, TokenizeSettings(256)) for r in rows]
    assert len({e["length"] for e in encoded}) == 4  # different lengths, so padding and packing matter
    return encoded


def loss_and_grads(attn: str, vocab: int, batches: list[Batch]) -> tuple[float, torch.Tensor]:
    """Mean loss per target token and its gradient, as the loop computes them (sum / target count)."""
    # A wider init than the default 0.02 makes attention far from uniform, so any leak between
    # examples moves the loss well above the tolerance (see the control test below).
    model = build_tiny_model(vocab, seed=0, attn_implementation=attn, initializer_range=0.2)
    loss_module = CausalLMLoss(model)
    targets = sum(int((b["targets"] != IGNORE).sum()) for b in batches)
    loss = sum(loss_module(**b) for b in batches) / targets
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return loss.item(), grads


def assert_same(a: tuple[float, torch.Tensor], b: tuple[float, torch.Tensor], layout: str) -> None:
    assert abs(a[0] - b[0]) < 1e-5, f"{layout}: loss {b[0]} vs {a[0]} one by one"
    assert (a[1] - b[1]).abs().max().item() < 1e-5, f"{layout}: gradients differ"


# VARLEN_SDPA: tunewise's per-example sdpa for packed rows (models/fast.py), plain sdpa otherwise.
ATTENTION = ["sdpa", "eager", VARLEN_SDPA]


# --- equivalence with one example at a time ----------------------------------------------------------------


@pytest.mark.parametrize("attn", ATTENTION)
def test_packed_and_padded_batches_match_examples_run_one_by_one(
    attn: str, tok: PreTrainedTokenizerBase, examples: list[dict]
) -> None:
    vocab = len(tok)
    one_by_one = loss_and_grads(attn, vocab, [collate_padded([e], tok.pad_token_id) for e in examples])
    layouts = {
        "packed": collate_packed(examples),
        "packed, multiple of 64": collate_packed(examples, pad_to_multiple_of=64),
        "right padded": collate_padded(examples, tok.pad_token_id),
        "left padded": collate_padded(examples, tok.pad_token_id, padding_side="left"),
        "padded to 256": collate_padded(examples, tok.pad_token_id, pad_to_length=256),
    }
    for layout, batch in layouts.items():
        assert_same(one_by_one, loss_and_grads(attn, vocab, [batch]), layout)


@pytest.mark.parametrize("attn", ATTENTION)
def test_control_a_packed_row_without_restarting_positions_leaks_across_examples(
    attn: str, tok: PreTrainedTokenizerBase, examples: list[dict]
) -> None:
    # Proves the equivalence test can fail: without restarts transformers sees one long sequence.
    packed = collate_packed(examples)
    leaky = {**packed, "position_ids": torch.arange(packed["input_ids"].shape[1]).unsqueeze(0)}
    right = loss_and_grads(attn, len(tok), [collate_packed(examples)])
    wrong = loss_and_grads(attn, len(tok), [leaky])
    assert abs(right[0] - wrong[0]) > 1e-2


# --- models whose mask ignores the restarting positions ------------------------------------------------------


def tiny_family(family: str, vocab: int, attn: str) -> PreTrainedModel:
    """A tiny random fp32 model. Bloom and MPT (ALiBi) never give position_ids to transformers' mask builder, nor
    does OPT; Llama does."""
    from transformers import AutoModelForCausalLM, BloomConfig, LlamaConfig, MptConfig, OPTConfig

    shape = {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 256,
    }
    configs = {
        "bloom": BloomConfig(vocab_size=vocab, hidden_size=32, n_layer=2, n_head=4),
        "mpt": MptConfig(vocab_size=vocab, d_model=32, n_layers=2, n_heads=4, max_seq_len=256),
        "opt": OPTConfig(vocab_size=vocab, ffn_dim=64, word_embed_proj_dim=32, **shape),
        "llama": LlamaConfig(vocab_size=vocab, intermediate_size=64, num_key_value_heads=2, **shape),
    }
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(configs[family], attn_implementation=attn, dtype=torch.float32)


def save_tiny_family(path: Path, family: str, attn: str) -> Path:
    tokenizer = build_tiny_tokenizer()
    tiny_family(family, len(tokenizer), attn).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def second_example_loss(model: PreTrainedModel, first: dict, second: dict) -> float:
    """The loss of a packed row's second example alone (the first one's targets ignored)."""
    batch = collate_packed([first, second])
    batch["targets"][0, : len(first["input_ids"])] = IGNORE
    with torch.no_grad():
        return CausalLMLoss(model.eval())(**batch).item()


@pytest.mark.parametrize(
    "family, attn, leaks",
    [
        ("bloom", "eager", True),
        ("mpt", "eager", True),
        ("opt", "eager", True),
        ("opt", VARLEN_SDPA, False),
        ("llama", "eager", False),
        ("llama", VARLEN_SDPA, False),
    ],
)
def test_the_packing_probe_finds_the_models_whose_packed_examples_see_each_other(
    family: str, attn: str, leaks: bool, examples: list[dict]
) -> None:
    model = tiny_family(family, 300, attn)
    model.train()
    leak = packing_leak(model)
    assert model.training  # the probe's eval mode is undone
    assert (leak > PACKING_LEAK_TOLERANCE) is leaks and (leaks or leak == 0.0), leak
    # What the probe measures is what the objective does: the second example's loss moves with the first's tokens
    # exactly where the probe finds a leak.
    first, second = examples[0], examples[1]
    other = {**first, "input_ids": [(i * 7 + 3) % 300 for i in first["input_ids"]]}
    moved = abs(second_example_loss(model, first, second) - second_example_loss(model, other, second))
    assert moved > 1e-4 if leaks else moved == 0.0


@pytest.mark.parametrize(
    "family, attn, refused",
    [
        ("bloom", "eager", "BloomForCausalLM"),
        ("opt", "eager", "OPTForCausalLM"),
        ("opt", "sdpa", None),
        ("llama", "sdpa", None),
    ],
)
def test_prepare_refuses_packing_for_a_model_that_lets_its_examples_see_each_other(
    family: str, attn: str, refused: str | None, tiny_config: dict, tmp_path: Path
) -> None:
    from tunewise.run import prepare

    model_dir = save_tiny_family(tmp_path / family, family, attn)
    config = {**tiny_config, "model": {"model_name_or_path": str(model_dir), "attn_implementation": attn}}
    config["data"] = {**config["data"], "packing": True}
    if refused is None:
        assert prepare(config).model.config._attn_implementation == VARLEN_SDPA
        return
    with pytest.raises(ConfigError) as error:
        prepare(config)
    (problem,) = error.value.problems
    assert problem.path == "data.packing"
    assert problem.message.startswith(
        f"{refused} lets packed examples attend to each other under attn_implementation eager"
    )
    # OPT keeps its examples apart under tunewise's varlen attention, measured so; Bloom has no sdpa at all.
    sdpa = "or model.attn_implementation: sdpa (with packing, tunewise_varlen_sdpa keeps them apart)"
    assert problem.message.endswith("set data.packing: false" + (f" {sdpa}" if family == "opt" else ""))
    # Without packing the same model is accepted: the probe is packing's alone.
    config["data"]["packing"] = False
    assert prepare(config).model.config._attn_implementation == attn


# --- layouts -----------------------------------------------------------------------------------------------


def test_packed_row_restarts_positions_and_never_predicts_across_a_boundary(examples: list[dict]) -> None:
    batch = collate_packed(examples, pad_to_multiple_of=64, pad_token_id=7)
    lengths = [e["length"] for e in examples]
    total = sum(lengths)
    width = -(-total // 64) * 64
    assert batch["input_ids"].shape == batch["position_ids"].shape == batch["targets"].shape == (1, width)
    assert "attention_mask" not in batch
    positions = batch["position_ids"][0].tolist()
    targets = batch["targets"][0].tolist()
    start = 0
    for example in examples:
        n = example["length"]
        assert positions[start : start + n] == list(range(n))
        assert targets[start : start + n] == shifted_targets(example["labels"])
        assert targets[start + n - 1] == IGNORE  # the last token of an example predicts nothing
        start += n
    assert positions[total:] == list(range(width - total))  # filler is its own "example"
    assert batch["input_ids"][0, total:].tolist() == [7] * (width - total)
    assert set(targets[total:]) == {IGNORE}


def test_padded_widths_dynamic_max_length_and_multiple(
    tok: PreTrainedTokenizerBase, examples: list[dict]
) -> None:
    longest = max(e["length"] for e in examples)
    pad = tok.pad_token_id
    assert collate_padded(examples, pad)["input_ids"].shape == (4, longest)
    assert collate_padded(examples, pad, pad_to_multiple_of=64)["input_ids"].shape == (
        4,
        -(-longest // 64) * 64,
    )
    assert collate_padded(examples, pad, pad_to_length=256)["input_ids"].shape == (4, 256)
    assert collate_padded(examples, pad, pad_to_length=200, pad_to_multiple_of=64)["input_ids"].shape == (
        4,
        256,
    )


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_side_places_tokens_masks_and_positions(
    side: str, tok: PreTrainedTokenizerBase, examples: list[dict]
) -> None:
    batch = collate_padded(examples, tok.pad_token_id, padding_side=side)
    width = batch["input_ids"].shape[1]
    for row, example in enumerate(examples):
        n = example["length"]
        real = slice(0, n) if side == "right" else slice(width - n, width)
        pads = slice(n, width) if side == "right" else slice(0, width - n)
        assert batch["input_ids"][row, real].tolist() == example["input_ids"]
        assert batch["attention_mask"][row, real].tolist() == [1] * n
        assert batch["attention_mask"][row, pads].tolist() == [0] * (width - n)
        assert set(batch["targets"][row, pads].tolist()) <= {IGNORE}
        if side == "left":  # positions count from each example's first real token, as in generation
            assert batch["position_ids"][row, real].tolist() == list(range(n))
    assert ("position_ids" in batch) == (side == "left")


def test_eos_targets_survive_when_pad_is_eos(tok: PreTrainedTokenizerBase, examples: list[dict]) -> None:
    eos = tok.eos_token_id
    for side in ("right", "left"):
        batch = collate_padded(examples, pad_token_id=eos, padding_side=side)
        assert int((batch["targets"] == eos).sum()) == len(examples)  # one end-of-turn per example
        assert int((batch["input_ids"] == eos).sum()) > len(examples)  # ... among many eos pads


# --- batching ----------------------------------------------------------------------------------------------


def padding_tokens(lengths: list[int], batches: list[list[int]]) -> int:
    return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches)


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("group_by_length", [True, False])
def test_every_index_appears_exactly_once_per_epoch(shuffle: bool, group_by_length: bool) -> None:
    rng = random.Random(1)
    lengths = [rng.randint(5, 500) for _ in range(1003)]
    batches = batch_indices(lengths, 8, shuffle=shuffle, seed=3, group_by_length=group_by_length)
    assert sorted(i for b in batches for i in b) == list(range(1003))
    assert sorted(len(b) for b in batches) == [3] + [8] * 125
    assert batches == batch_indices(lengths, 8, shuffle=shuffle, seed=3, group_by_length=group_by_length)


def test_length_grouping_cuts_padding_and_puts_the_longest_first() -> None:
    rng = random.Random(0)
    lengths = [rng.randint(10, 1000) for _ in range(2000)]
    plain = batch_indices(lengths, 8, shuffle=True, seed=5, group_by_length=False)
    grouped = batch_indices(lengths, 8, shuffle=True, seed=5, group_by_length=True)
    assert padding_tokens(lengths, grouped) < padding_tokens(lengths, plain) / 5
    assert max(lengths[i] for i in grouped[0]) == max(lengths)
    assert grouped != batch_indices(lengths, 8, shuffle=True, seed=6, group_by_length=True)


def test_the_loop_groups_lengths_by_the_examples_of_a_step_as_hf() -> None:
    """HF's LengthGroupedSampler groups per_device x accumulation examples: one optimizer step's (all ranks' here)."""
    rng = random.Random(2)
    lengths = [rng.randint(10, 500) for _ in range(200)]
    settings = LoopSettings(
        per_device_batch_size=2,
        gradient_accumulation_steps=4,
        total_steps=1,
        batches_per_epoch=1,
        max_steps_overrides=False,
        logging_steps=1,
        eval_steps=None,
        save_steps=None,
        max_grad_norm=None,
        data_seed=3,
        pad_token_id=0,
        group_by_length=True,
    )
    # HF's own order for groups of one step's 8 examples, drawn from the loop's seed (data_seed + epoch)
    order = get_length_grouped_indices(lengths, 2 * 4, generator=torch.Generator().manual_seed(3))
    steps = [sorted(order[i : i + 8]) for i in range(0, 200, 8)]
    windows = epoch_windows(settings, lengths, epoch=0, rank=0, world=1)
    assert [sorted(i for b in w for i in b) for w in windows] == steps


def test_a_window_grouped_by_length_keeps_its_examples_and_sizes_and_cuts_padding() -> None:
    lengths = [400, 10, 390, 20]
    assert group_window_by_length([[0, 1], [2, 3]], lengths) == [[0, 2], [1, 3]]
    assert padding_tokens(lengths, [[0, 2], [1, 3]]) == 20  # from 760
    assert group_window_by_length([[0, 1, 2], [3]], lengths) == [[0, 2, 3], [1]]  # sizes kept
    rng = random.Random(3)
    lengths = [rng.randint(10, 1000) for _ in range(2000)]
    drawn = batch_indices(lengths, 4, shuffle=True, seed=2, group_by_length=False)
    windows = [drawn[i : i + 8] for i in range(0, len(drawn), 8)]
    grouped = [group_window_by_length(w, lengths) for w in windows]
    for before, after in zip(windows, grouped, strict=True):
        assert sorted(i for b in after for i in b) == sorted(i for b in before for i in b)
        assert [len(b) for b in after] == [len(b) for b in before]
    flat = [b for w in grouped for b in w]
    assert padding_tokens(lengths, flat) < padding_tokens(lengths, drawn) / 3
    assert group_window_by_length([[5, 6]], lengths) == [[5, 6]]  # one micro-batch: nothing to regroup


def test_each_steps_micro_batches_run_largest_first_with_the_same_examples() -> None:
    lengths = [300, 10, 20, 400, 50, 60]
    assert largest_first([[0, 1], [2, 3], [4, 5]], lengths) == [[2, 3], [0, 1], [4, 5]]  # 420, 310, 110
    assert largest_first([[1], [2], [0]], [5, 5, 5]) == [[1], [2], [0]]  # ties keep the drawn order
    rng = random.Random(4)
    lengths = [rng.randint(10, 500) for _ in range(300)]
    once = {"total_steps": 1, "batches_per_epoch": 1, "max_steps_overrides": False, "logging_steps": 1}
    never = {"eval_steps": None, "save_steps": None, "max_grad_norm": None}
    common = {"gradient_accumulation_steps": 4, "data_seed": 1, "pad_token_id": 0, **once, **never}
    drawn = batch_indices(lengths, 2, shuffle=True, seed=1, group_by_length=False)
    drawn_steps = [drawn[i : i + 4] for i in range(0, len(drawn), 4)]

    def tokens(step: list[list[int]]) -> list[int]:
        return [sum(lengths[i] for i in b) for b in step]

    for packing in (True, False):
        settings = LoopSettings(per_device_batch_size=2, packing=packing, **common)
        steps = epoch_windows(settings, lengths, epoch=0, rank=0, world=1)
        assert [sorted(i for b in w for i in b) for w in steps] == [
            sorted(i for b in w for i in b) for w in drawn_steps
        ]
        assert all(tokens(w) == sorted(tokens(w), reverse=True) for w in steps)
        if packing:  # the micro-batches are the drawn ones, reordered
            assert [sorted(map(tuple, w)) for w in steps] == [sorted(map(tuple, w)) for w in drawn_steps]
    assert any(tokens(w) != sorted(tokens(w), reverse=True) for w in drawn_steps)  # drawn: not already sorted


def test_a_token_budget_packs_each_window_first_fit_longest_first() -> None:
    lengths = [300, 120, 480, 60, 250, 200, 90, 510]
    # Longest first: 510, 480, 300 and 250 each open a row (none fits beside an earlier one); 200 joins 300,
    # 120 and 90 join 250, and 60 fits nowhere (the rows hold 510, 480, 500 and 460). Rows keep the drawn order.
    assert pack_within([[0, 1, 2, 3], [4, 5, 6, 7]], lengths, 512) == [[7], [2], [0, 5], [1, 4, 6], [3]]
    assert pack_within([[0, 1], [2]], [100, 700, 50], 512) == [[1], [0, 2]]  # too long: a row of its own
    assert pack_within([[]], [], 512) == [[]]  # a rank's empty share stays one (stand-in) micro-batch
    # Rows rounded up to a multiple of 64 count their pads: 300 + 200 = 500 rounds to 512, 300 + 220 to 576.
    assert pack_within([[0, 1, 2]], [300, 200, 220], 512, 64) == [[0, 1], [2]]
    assert pack_within([[0, 1, 2]], [300, 200, 220], 520) == [[0, 2], [1]]  # unrounded, 520 fits exactly
    # Alone it rounds to 512, over the budget: a row of its own all the same.
    assert pack_within([[0]], [500], 500, 64) == [[0]]
    rng = random.Random(5)
    lengths = [rng.randint(10, 500) for _ in range(400)]
    drawn = batch_indices(lengths, 8, shuffle=True, seed=3, group_by_length=False)
    for budget, multiple in ((500, None), (700, None), (1500, None), (1024, 64)):
        for window in (drawn[i : i + 2] for i in range(0, len(drawn), 2)):
            rows = pack_within(window, lengths, budget, multiple)
            assert sorted(i for r in rows for i in r) == sorted(i for b in window for i in b)  # each once
            sizes = sorted(round_up(sum(lengths[i] for i in r), multiple) for r in rows)
            assert sizes[-1] <= budget
            # First fit: a row was opened only for an example no earlier row had room for, so no two
            # rows would fit in one.
            assert len(rows) == 1 or sizes[0] + sizes[1] > budget


def test_iterate_batches_collates_rows_of_a_dataset(
    tok: PreTrainedTokenizerBase, examples: list[dict]
) -> None:
    import datasets

    ds = datasets.Dataset.from_list(examples)
    out = list(iterate_batches(ds, [[2, 0], [1, 3]], collate_packed))
    assert [ids for ids, _ in out] == [[2, 0], [1, 3]]
    expected = examples[2]["input_ids"] + examples[0]["input_ids"]
    assert out[0][1]["input_ids"][0].tolist() == expected
