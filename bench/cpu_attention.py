"""tunewise's CPU attention kernel against torch's CPU flash attention, forward and backward, side by side.

    python bench/cpu_attention.py                 # bf16 and fp32, SmolLM2's heads (9 query, 3 key/value, 64 wide)
    python bench/cpu_attention.py --precisions bf16 --lengths 128 384

Both run tunewise's packed-row custom ops (`models/fast.py: _cpu_varlen_attention` and its backward), once with
tunewise's kernel (models/kernels.py) and once with torch's flash kernel on each example's slice, which is what
tunewise runs where its kernel cannot be built (in bf16 with the backward in fp32, faster there). Each case
alternates the two; the medians of --repeats calls are printed with their ratio, and the rate of each (forward
and backward together) in GFLOP/s of causal attention's useful work. Rows: one example of each
--lengths, then packed rows of 4 and 16 examples of 50-500 tokens (vs_trl.py's spread).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable

import torch

from tunewise.models import fast
from tunewise.training.host_memory import keep_freed_memory

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def median_ms(call: Callable[[], object], repeats: int) -> float:
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def time_case(
    lengths: list[int], dtype: torch.dtype, heads: int, kv_heads: int, dim: int, repeats: int
) -> dict:
    bounds = [0]
    for length in lengths:
        bounds.append(bounds[-1] + length)
    cut = torch.tensor(bounds, dtype=torch.int32)
    q = torch.randn(1, heads, bounds[-1], dim, dtype=dtype)
    k, v = (torch.randn(1, kv_heads, bounds[-1], dim, dtype=dtype) for _ in range(2))
    grad = torch.randn_like(q)
    own = fast.cpu_kernel_for
    times: dict[str, list[float]] = {}
    for _ in range(2):  # alternating, twice
        for name, choose in (("tunewise", own), ("torch flash", lambda query, bounds: None)):
            fast.cpu_kernel_for = choose  # type: ignore[assignment]
            out, lse = fast._cpu_varlen_attention(q, k, v, cut, 0.125)
            forward = median_ms(lambda: fast._cpu_varlen_attention(q, k, v, cut, 0.125), repeats)
            backward = median_ms(
                lambda out=out, lse=lse: fast._cpu_varlen_attention_backward(
                    grad, q, k, v, out, lse, cut, 0.125
                ),
                repeats,
            )
            times.setdefault(f"{name} forward", []).append(forward)
            times.setdefault(f"{name} backward", []).append(backward)
    fast.cpu_kernel_for = own  # type: ignore[assignment]
    return {key: min(values) for key, values in times.items()}


def causal_gflop(lengths: list[int], heads: int, dim: int) -> float:
    """The forward's useful work: Q K^T and P V over each example's causal triangle, 2 FLOPs a multiply-add.
    The backward does 2.5x that (S again, dP, dV, dK, dQ)."""
    return sum(2 * 2 * heads * dim * length * (length + 1) / 2 for length in lengths) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--precisions", nargs="+", default=["bf16", "fp32"], choices=DTYPES)
    parser.add_argument("--lengths", nargs="+", type=int, default=[64, 128, 256, 384, 512])
    parser.add_argument("--heads", type=int, nargs=3, default=[9, 3, 64], metavar=("QUERY", "KV", "DIM"))
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    keep_freed_memory()  # as in training: freed blocks are reused, not returned and faulted in again
    if fast.cpu_kernel_for(torch.zeros(1, 1, 1, 2), [0, 1]) is None:
        raise SystemExit("tunewise's CPU attention kernel did not build here (see the warning above)")
    rng = random.Random(0)
    cases = [[length] for length in args.lengths]
    cases += [[rng.randint(50, 500) for _ in range(count)] for count in (4, 16)]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; heads {args.heads}; ms, best of 2 medians"
    )
    print(f"{'precision':9} {'row':>22} | {'fwd ours':>8} {'torch':>8} {'ratio':>6} | "
          f"{'bwd ours':>8} {'torch':>8} {'ratio':>6} | {'both':>6} | GFLOP/s ours torch")  # fmt: skip
    for precision in args.precisions:
        for lengths in cases:
            t = time_case(lengths, DTYPES[precision], *args.heads, args.repeats)
            row = (
                f"{lengths[0]} tokens"
                if len(lengths) == 1
                else f"{len(lengths)} examples, {sum(lengths)} tok"
            )
            work = causal_gflop(lengths, args.heads[0], args.heads[2]) * 1e3  # per ms
            ours, theirs = t["tunewise forward"], t["torch flash forward"]
            ours_b, theirs_b = t["tunewise backward"], t["torch flash backward"]
            print(
                f"{precision:9} {row:>22} | {ours:8.2f} {theirs:8.2f} {theirs / ours:5.2f}x | "
                f"{ours_b:8.2f} {theirs_b:8.2f} {theirs_b / ours_b:5.2f}x | "
                f"{(theirs + theirs_b) / (ours + ours_b):5.2f}x | "
                f"{3.5 * work / (ours + ours_b):12.1f} {3.5 * work / (theirs + theirs_b):5.1f}"
            )


if __name__ == "__main__":
    main()
