"""Training-step speed and memory of micro-batch layouts on identical windows (CPU experiments).

    python bench/cpu_layouts.py padded            # one layout per process: peak RSS is its own
    python bench/cpu_layouts.py segments --lora-dropout 0
    python bench/cpu_layouts.py mb1 --compile
    for l in padded packed segments segments2 mb1; do python bench/cpu_layouts.py $l; done

Every layout trains the same windows of 8 examples (50-500 tokens, vs_trl.py's data) with
tunewise's CausalLMLoss and one AdamW step per window; the first two windows are warm-up.

- padded:    one right-padded micro-batch of 8 (tunewise's default)
- packed:    one packed row of 8 (tunewise's `packing: true`): sdpa gets a block-diagonal mask, so it
             computes attention over the whole row, (sum of lengths)^2
- segments:  the same packed row, attention run per example (`segment_attention` below): a prototype
             of what tunewise's packing could do on CPU, where there is no varlen flash kernel
- segments2: packed rows of 2 examples, 4 micro-batches per window, with segment attention
- mb1:       8 micro-batches of 1 example (`per_device_train_batch_size: 1`): no padding

Used for the recommendations in docs/performance.md; not part of tunewise.
"""

from __future__ import annotations

import argparse
import itertools
import resource
import time

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, set_seed
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface

SEED = 42


def segment_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    position_ids: torch.Tensor | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """Causal attention within each example of a packed row (positions restart at 0), sdpa otherwise."""
    if position_ids is None or query.shape[0] != 1 or attention_mask is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    starts = (position_ids[0] == 0).nonzero().flatten().tolist() + [query.shape[2]]
    parts = [
        F.scaled_dot_product_attention(
            query[:, :, s:e],
            key[:, :, s:e],
            value[:, :, s:e],
            is_causal=True,
            dropout_p=dropout,
            scale=scaling,
            enable_gqa=True,
        )
        for s, e in itertools.pairwise(starts)
    ]
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None


def no_mask(*args: object, **kwargs: object) -> None:
    return None  # segment_attention needs no mask: the position ids say where examples start


AttentionInterface.register("segments", segment_attention)
AttentionMaskInterface.register("segments", no_mask)


def windows(n_windows: int, tokenizer: object) -> list[list[dict]]:
    from vs_trl import chat_rows, encode_rows  # type: ignore[import-not-found]  # bench/ is sys.path[0]

    examples = encode_rows(chat_rows(8 * n_windows, SEED, 50, 500), tokenizer, 512)
    return [examples[i : i + 8] for i in range(0, len(examples), 8)]


def micro_batches(layout: str, window: list[dict], pad_id: int) -> list[dict[str, torch.Tensor]]:
    from tunewise.data.collate import collate_packed, collate_padded

    if layout == "padded":
        return [collate_padded(window, pad_id)]
    if layout in ("packed", "segments"):
        return [collate_packed(window)]
    if layout == "segments2":
        return [collate_packed(window[i : i + 2]) for i in range(0, len(window), 2)]
    return [collate_padded([e], pad_id) for e in window]  # mb1


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("layout", choices=["padded", "packed", "segments", "segments2", "mb1"])
    parser.add_argument("--lora-dropout", type=float, default=0.05)
    parser.add_argument("--windows", type=int, default=6, help="windows of 8 examples, 2 of them warm-up")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--compile", action="store_true", help="torch.compile each decoder layer (dynamic)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from tunewise.models.adapters import LoraSettings, apply_method
    from tunewise.models.load import load_model, load_tokenizer, materialize, resolve_source
    from tunewise.training.loss import CausalLMLoss

    model_dir = materialize(resolve_source("smollm2-135m-instruct"))
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir)
    set_seed(SEED)
    lora = LoraSettings(r=16, lora_alpha=32, lora_dropout=args.lora_dropout)
    model = apply_method(model, "lora", lora, quantized=False, gradient_checkpointing=False)
    if args.layout.startswith("segments"):
        model.set_attn_implementation("segments")
    if args.compile:
        for layer in model.get_base_model().model.layers:
            layer.compile(dynamic=True)
    loss_module = CausalLMLoss(model).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    tokens, first_loss, start = 0, 0.0, 0.0
    for i, window in enumerate(windows(args.windows, tokenizer)):
        if i == 2:
            tokens, start = 0, time.perf_counter()
        batches = micro_batches(args.layout, window, tokenizer.pad_token_id)
        targets = sum(int((b["targets"] != -100).sum()) for b in batches)
        for batch in batches:
            loss = loss_module(**batch) / targets
            loss.backward()
            first_loss += float(loss) if i == 0 else 0.0
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += sum(e["length"] for e in window)
    rate = tokens / (time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"{args.layout} lora_dropout={args.lora_dropout}{' compiled' if args.compile else ''}: "
          f"{rate:.1f} tokens/s, peak RSS {peak:.2f} GiB, {torch.get_num_threads()} threads, "
          f"first-window loss {first_loss:.6f} (equal across layouts)")  # fmt: skip


if __name__ == "__main__":
    main()
