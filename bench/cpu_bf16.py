"""Is bf16 autocast faster than fp32 for LoRA training on this CPU?

    python bench/cpu_bf16.py [--steps 4] [--threads 0]

Times (1) a large matmul in each dtype and (2) LoRA training steps (forward + backward + AdamW)
of the embedded SmolLM2-135M on the same batches: fp32, and bf16 as tunewise runs it (bf16 base
weights, bf16 autocast, fp32 adapters). Prints bf16/fp32 speed ratios. tunewise's config
resolution picks bf16 on CPU where it was measured faster: with AMX or AVX512_BF16
(`Hardware.bf16_supported`); record the result in docs/performance.md. Without either, oneDNN emulates
bf16 matmuls with fp32 FMAs plus conversions, so expect bf16 to be slower there.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

SEED = 42


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


def matmul_rate(dtype: torch.dtype, n: int, trials: int = 5) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    best = 0.0
    for _ in range(trials):
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - start))
    return best


def lora_step_rate(bf16: bool, batches: list[dict[str, torch.Tensor]], model_dir: object) -> float:
    """Tokens per second over `batches` (the first one is a warm-up), one optimizer step each."""
    from transformers import set_seed

    from tunewise.models.adapters import LoraSettings, apply_method
    from tunewise.models.load import load_model
    from tunewise.training.loss import CausalLMLoss

    model = load_model(model_dir, dtype="bfloat16" if bf16 else "float32")  # type: ignore[arg-type]
    set_seed(SEED)
    model = apply_method(model, "lora", LoraSettings(), quantized=False, gradient_checkpointing=False)
    for p in model.parameters():  # adapters train in fp32 (tunewise's mixed precision)
        if p.requires_grad:
            p.data = p.data.float()
    loss_module = CausalLMLoss(model).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    tokens, start = 0, 0.0
    for i, batch in enumerate(batches):
        if i == 1:
            tokens, start = 0, time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_module(**batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += int(batch["attention_mask"].sum())
    return tokens / (time.perf_counter() - start)


def make_batches(steps: int, batch_size: int) -> tuple[list[dict[str, torch.Tensor]], object]:
    from transformers import AutoTokenizer

    from tunewise.data.collate import collate_padded
    from tunewise.data.tokenize import TokenizeSettings, encode_row
    from tunewise.models.load import materialize, resolve_source
    from tunewise.testing import tiny_chat_rows

    model_dir = materialize(resolve_source("smollm2-135m-instruct"))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = tiny_chat_rows(steps * batch_size, seed=SEED, min_words=60, max_words=120)  # ~150-275 tokens
    examples = [encode_row(r, tokenizer, TokenizeSettings(512)) for r in rows]
    batches = [
        collate_padded(examples[i : i + batch_size], tokenizer.pad_token_id)
        for i in range(0, len(examples), batch_size)
    ]
    return batches, model_dir


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--steps", type=int, default=4, help="timed optimizer steps per precision (+1 warm-up)"
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--matmul", type=int, default=4096, help="square matmul size")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    flags = cpu_flags()
    native = sorted(f for f in ("avx512_bf16", "amx_bf16", "avx512f") if f in flags)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU flags: {', '.join(native) or 'none'}"
    )
    fp32, bf16 = matmul_rate(torch.float32, args.matmul), matmul_rate(torch.bfloat16, args.matmul)
    print(f"matmul {args.matmul}^3: fp32 {fp32 / 1e9:.1f} GFLOP/s, bf16 {bf16 / 1e9:.1f} GFLOP/s, "
          f"bf16/fp32 {bf16 / fp32:.2f}x")  # fmt: skip
    batches, model_dir = make_batches(args.steps + 1, args.batch)
    # Interleaved twice, so a change in machine load hits both precisions alike.
    rates: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for _ in range(2):
        for name, values in rates.items():
            values.append(lora_step_rate(name == "bf16", batches, model_dir))
    best = {name: max(values) for name, values in rates.items()}
    print(f"LoRA training steps: fp32 {best['fp32']:.1f} tokens/s, bf16 autocast {best['bf16']:.1f} tokens/s, "
          f"bf16/fp32 {best['bf16'] / best['fp32']:.2f}x")  # fmt: skip
    verdict = "faster" if best["bf16"] > best["fp32"] else "not faster"
    print(f"bf16 autocast is {verdict} than fp32 on this CPU")


if __name__ == "__main__":
    main()
