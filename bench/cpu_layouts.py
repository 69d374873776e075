"""Training-step speed and memory of micro-batch layouts on identical windows (CPU experiments).

    python bench/cpu_layouts.py padded            # one layout per process: peak RSS is its own
    python bench/cpu_layouts.py segments --lora-dropout 0.05
    python bench/cpu_layouts.py mb1 --compile
    python bench/cpu_layouts.py segments2 --compile --peft-linear   # plain PEFT vs tunewise's merged LoRA (dropout 0)
    for l in padded packed segments segments2 mb1; do python bench/cpu_layouts.py $l; done

Every layout trains the same windows of 8 examples (50-500 tokens, vs_trl.py's data) with
tunewise's CausalLMLoss, its LoRA dropout and one AdamW step per window; the first two windows are warm-up.

- padded:    one right-padded micro-batch of 8 (tunewise's default)
- packed:    one packed row of 8 with plain sdpa: a block-diagonal mask, so attention runs over the
             whole row, (sum of lengths)^2 (tunewise's packing before models/fast.py)
- segments:  the same packed row with tunewise's per-example attention (`tunewise_varlen_sdpa`, what
             `packing: true` uses now)
- segments2: packed rows of 2 examples, 4 micro-batches per window, per-example attention
- segments4: packed rows of 4 examples, 2 micro-batches per window, per-example attention
- mb1:       8 micro-batches of 1 example (`per_device_train_batch_size: 1`): no padding
- tokensN:   packed rows of at most N tokens (e.g. tokens512): the window's examples first-fit, longest
             first, into as few rows as fit, per-example attention; the step's examples and gradient are
             those of segments2 (`training.max_tokens_per_micro_batch: N` with packing)

--largest-first runs each window's micro-batch with the most tokens first, as tunewise's loop does
(`collate.largest_first`); tokensN always does.

--peft-linear builds the adapters with plain PEFT (its LoRA Linear), not tunewise's `apply_method`
(whose `MergedLoraLinear` trains without dropout as one matmul with W + s B A).

--torch-attention runs packed rows' attention on torch's CPU flash kernel, one example at a time, instead of
tunewise's own kernel (models/kernels.py; the same as TUNEWISE_CPU_ATTENTION_KERNEL=0).

Used for the recommendations in docs/performance.md; not part of tunewise.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

from tunewise.training.host_memory import request_huge_pages

if "--default-malloc" not in sys.argv:
    request_huge_pages()  # before anything allocates a tensor, as the `tunewise` command does

import torch
from transformers import set_seed

SEED = 42


def windows(n_windows: int, tokenizer: object) -> list[list[dict]]:
    from vs_trl import chat_rows, encode_rows  # type: ignore[import-not-found]  # bench/ is sys.path[0]

    examples = encode_rows(chat_rows(8 * n_windows, SEED, 50, 500), tokenizer, 512)
    return [examples[i : i + 8] for i in range(0, len(examples), 8)]


def micro_batches(
    layout: str, window: list[dict], pad_id: int, multiple: int | None = None, largest_first: bool = False
) -> list[dict[str, torch.Tensor]]:
    from tunewise.data.collate import collate_packed, collate_padded, pack_within
    from tunewise.data.collate import largest_first as largest_first_order

    if layout == "padded":
        return [collate_padded(window, pad_id, pad_to_multiple_of=multiple)]
    lengths = [e["length"] for e in window]
    every = list(range(len(window)))
    if layout in ("packed", "segments"):
        groups = [every]
    elif layout in ("segments2", "segments4"):
        size = int(layout[-1])
        groups = [every[i : i + size] for i in range(0, len(every), size)]
    elif layout.startswith("tokens"):
        groups = pack_within([every], lengths, int(layout[6:]))
    else:  # mb1
        groups = [[i] for i in every]
    if largest_first or layout.startswith("tokens"):
        groups = largest_first_order(groups, lengths)  # the order tunewise's loop runs a step in
    if layout == "mb1":
        return [collate_padded([window[i] for i in g], pad_id, pad_to_multiple_of=multiple) for g in groups]
    return [collate_packed([window[i] for i in g], multiple, pad_id) for g in groups]


def layout_name(value: str) -> str:
    fixed = ("padded", "packed", "segments", "segments2", "segments4", "mb1")
    if value in fixed or (value.startswith("tokens") and value[6:].isdigit() and int(value[6:]) > 0):
        return value
    raise argparse.ArgumentTypeError(f"{value!r}: one of {', '.join(fixed)} or tokensN (e.g. tokens512)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "layout", type=layout_name, help="padded, packed, segments, segments2, segments4, mb1, tokensN"
    )
    parser.add_argument(
        "--largest-first", action="store_true", help="each window's largest micro-batch first"
    )
    parser.add_argument("--lora-dropout", type=float, default=0.0)  # PEFT's and tunewise's default
    parser.add_argument("--windows", type=int, default=6, help="windows of 8 examples, 2 of them warm-up")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--compile", action="store_true", help="torch.compile each decoder layer (dynamic)")
    parser.add_argument("--peft-linear", action="store_true", help="PEFT's LoRA Linear, not MergedLoraLinear")
    parser.add_argument(
        "--torch-attention",
        action="store_true",
        help="torch's CPU flash attention for packed rows, not tunewise's kernel (models/kernels.py)",
    )
    parser.add_argument(
        "--bf16", action="store_true", help="bf16 base, fp32 adapters, bf16 autocast (as tunewise)"
    )
    parser.add_argument(
        "--pad-to-multiple-of",
        type=int,
        default=None,
        help="round each micro-batch's tokens up (a filler example)",
    )
    parser.add_argument(
        "--logit-chunk",
        type=int,
        default=0,
        help="rows of logits per chunk of the fused loss (0: tunewise's for the device)",
    )
    parser.add_argument(
        "--memory-budget",
        type=float,
        default=0.0,
        help="AOTAutograd's activation_memory_budget for --compile (0: tunewise's on CPU, 0.8; 1.0: torch's)",
    )
    parser.add_argument("--profile", type=int, default=0, help="print the top N ops of the timed windows")
    parser.add_argument(
        "--default-malloc",
        action="store_true",
        help="glibc's and torch's defaults, not tunewise's set_host_memory",
    )
    args = parser.parse_args()
    if args.torch_attention:
        os.environ["TUNEWISE_CPU_ATTENTION_KERNEL"] = "0"  # read at the kernel's first use
    if not args.default_malloc:
        from tunewise.training.host_memory import keep_freed_memory

        keep_freed_memory()  # huge pages were asked for above, before the first tensor
    if args.threads:
        torch.set_num_threads(args.threads)
    from peft import get_peft_model

    from tunewise.models.adapters import LoraSettings, apply_method, lora_config
    from tunewise.models.fast import (
        CPU_ACTIVATION_MEMORY_BUDGET,
        VARLEN_SDPA,
        compile_layers,
        use_fast_lora_dropout,
    )
    from tunewise.models.load import load_model, load_tokenizer, materialize, resolve_source
    from tunewise.training.loss import CausalLMLoss

    model_dir = materialize(resolve_source("smollm2-135m-instruct"))
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, dtype="bfloat16" if args.bf16 else "float32")
    set_seed(SEED)
    lora = LoraSettings(r=16, lora_alpha=32, lora_dropout=args.lora_dropout)
    if args.peft_linear:
        model = get_peft_model(model, lora_config(lora))
    else:
        model = apply_method(model, "lora", lora, quantized=False, gradient_checkpointing=False)
    for param in model.parameters():  # the adapters keep fp32 master weights, as tunewise's bf16 runs
        if param.requires_grad:
            param.data = param.data.float()
    use_fast_lora_dropout(model)
    if args.layout.startswith(("segments", "tokens")):
        model.set_attn_implementation(VARLEN_SDPA)
    if args.compile:
        compile_layers(model, args.memory_budget or CPU_ACTIVATION_MEMORY_BUDGET)
    loss_module = CausalLMLoss(model, logit_chunk=args.logit_chunk or None).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    tokens, first_loss, start, usage = 0, 0.0, 0.0, resource.getrusage(resource.RUSAGE_SELF)
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
    for i, window in enumerate(windows(args.windows, tokenizer)):
        if i == 2:
            tokens, start, usage = 0, time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
            if args.profile:
                profiler.start()
        batches = micro_batches(
            args.layout, window, tokenizer.pad_token_id, args.pad_to_multiple_of, args.largest_first
        )
        targets = sum(int((b["targets"] != -100).sum()) for b in batches)
        for batch in batches:
            with torch.autocast("cpu", torch.bfloat16, enabled=args.bf16):
                loss = loss_module(**batch) / targets
            loss.backward()
            first_loss += float(loss) if i == 0 else 0.0
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += sum(e["length"] for e in window)
    rate = tokens / (time.perf_counter() - start)
    after = resource.getrusage(resource.RUSAGE_SELF)
    faults, system = after.ru_minflt - usage.ru_minflt, after.ru_stime - usage.ru_stime
    if args.profile:
        profiler.stop()
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    flags = (" compiled" if args.compile else "") + (" peft-linear" if args.peft_linear else "")
    flags += (" bf16" if args.bf16 else "") + (" default-malloc" if args.default_malloc else "")
    flags += " largest-first" if args.largest_first else ""
    flags += f" pad-to-{args.pad_to_multiple_of}" if args.pad_to_multiple_of else ""
    flags += f" logit-chunk-{args.logit_chunk}" if args.logit_chunk else ""
    flags += f" memory-budget-{args.memory_budget}" if args.memory_budget else ""
    print(f"{args.layout} lora_dropout={args.lora_dropout}{flags}: "
          f"{rate:.1f} tokens/s, peak RSS {peak:.2f} GiB, {torch.get_num_threads()} threads, "
          f"first-window loss {first_loss:.6f} (equal across layouts); timed windows: {faults} page faults, "
          f"{system:.1f} s in the kernel")  # fmt: skip


if __name__ == "__main__":
    main()
