"""tunewise's CPU attention kernel (models/csrc/varlen_attention.cpp) against exact references."""

from __future__ import annotations

import itertools
import json
import logging
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from tunewise.models import fast, kernels
from tunewise.testing import relative_error


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: list[int], scale: float
) -> torch.Tensor:
    """Causal attention of each [a, b) slice in fp64, key/value heads repeated for grouped queries."""
    group = q.shape[1] // k.shape[1]
    return torch.cat(
        [
            nn.functional.scaled_dot_product_attention(
                q[:, :, a:b], k[:, :, a:b].repeat_interleave(group, 1), v[:, :, a:b].repeat_interleave(group, 1),
                is_causal=True, scale=scale,
            )
            for a, b in itertools.pairwise(bounds)
        ],
        dim=2,
    )  # fmt: skip


def attention_and_grads(
    dtype: torch.dtype, bounds: list[int], heads: int, kv_heads: int, dim: int, seed: int, spread: float = 1.0
):
    """The custom ops' output and gradients in `dtype`, and fp64 reference ones, for one packed row.

    The query is a transposed view, as the model's projections give it; keys and values contiguous. `spread`
    scales the queries: at 30 the scores span hundreds, and a softmax not shifted by its row's maximum overflows."""
    torch.manual_seed(seed)
    length = bounds[-1]
    q = spread * torch.randn(1, length, heads, dim, dtype=torch.float64).transpose(1, 2)
    k, v = (torch.randn(1, kv_heads, length, dim, dtype=torch.float64) for _ in range(2))
    grad = torch.randn(1, heads, length, dim, dtype=torch.float64)
    full = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ref = reference(*full, bounds, 0.3)
    ref.backward(grad)
    low = [t.detach().to(dtype) for t in (q, k, v)]
    cut = torch.tensor(bounds, dtype=torch.int32)
    out, lse = fast._cpu_varlen_attention(*low, cut, 0.3)
    grads = fast._cpu_varlen_attention_backward(grad.to(dtype), *low, out, lse, cut, 0.3)
    return (out, *grads), (ref, *(t.grad for t in full))


def test_the_kernel_builds_on_this_machine() -> None:
    # CI has a C++ compiler and ninja: a failed build here is a bug, not a fallback.
    assert kernels.cpu_attention_ops() is not None
    assert fast.cpu_kernel_for(torch.zeros(1, 2, 3, 8), [0, 3]) is not None


# Lengths around the 64-row blocks, a one-token example, grouped queries, a head size of 64 as in SmolLM2.
CASES = [([0, 1], 2, 1, 8), ([0, 64], 4, 2, 16), ([0, 65, 66, 196], 4, 2, 16), ([0, 37, 337, 401], 9, 3, 64)]


@pytest.mark.parametrize(("bounds", "heads", "kv_heads", "dim"), CASES)
def test_fp32_kernel_matches_exact_attention_and_its_gradients(
    bounds: list[int], heads: int, kv_heads: int, dim: int
) -> None:
    got, want = attention_and_grads(torch.float32, bounds, heads, kv_heads, dim, seed=len(bounds))
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert g.dtype == torch.float32 and g.shape == w.shape, name
        assert relative_error(g, w) < 2e-6, name


@pytest.mark.parametrize(("bounds", "heads", "kv_heads", "dim"), CASES)
def test_fp32_kernel_stays_exact_when_the_softmax_is_sharp(
    bounds: list[int], heads: int, kv_heads: int, dim: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Scores in the hundreds: each row must be shifted by its own maximum before exp. Against fp64, the kernel
    # is at least as close as torch's fp32 flash kernel (1.2-6.7x closer on these cases).
    got, want = attention_and_grads(torch.float32, bounds, heads, kv_heads, dim, seed=len(bounds), spread=30)
    monkeypatch.setattr(fast, "cpu_kernel_for", lambda query, bounds: None)
    flash, _ = attention_and_grads(torch.float32, bounds, heads, kv_heads, dim, seed=len(bounds), spread=30)
    for name, g, f, w in zip(("out", "dq", "dk", "dv"), got, flash, want, strict=True):
        assert relative_error(g, w) <= max(1.1 * relative_error(f, w), 1e-6), name


@pytest.mark.parametrize(("bounds", "heads", "kv_heads", "dim"), CASES[1:])
def test_bf16_kernel_is_as_accurate_as_torch_flash_in_bf16(
    bounds: list[int], heads: int, kv_heads: int, dim: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not kernels.cpu_has_bf16_matmuls():  # torch's bf16 brgemm needs AMX or AVX512_BF16
        assert fast.cpu_kernel_for(torch.zeros(1, 2, 3, 8, dtype=torch.bfloat16), [0, 3]) is None
        return
    got, want = attention_and_grads(torch.bfloat16, bounds, heads, kv_heads, dim, seed=7)
    monkeypatch.setattr(fast, "cpu_kernel_for", lambda query, bounds: None)
    flash, _ = attention_and_grads(torch.bfloat16, bounds, heads, kv_heads, dim, seed=7)
    for name, g, f, w in zip(("out", "dq", "dk", "dv"), got, flash, want, strict=True):
        assert g.dtype == torch.bfloat16, name
        # bf16 inputs round by 2^-9; products in fp32. torch's flash kernel (whose backward tunewise runs in
        # fp32) sets the bar: within 1.5x of its error, and under 1% either way.
        assert relative_error(g, w) < max(1.5 * relative_error(f, w), 1e-3), name
        assert relative_error(g, w) < 1e-2, name


def test_kernel_gives_the_same_bits_on_one_thread_and_two() -> None:
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, _ = attention_and_grads(torch.float32, [0, 100, 300], 4, 2, 16, seed=3)
        torch.set_num_threads(2)
        two, _ = attention_and_grads(torch.float32, [0, 100, 300], 4, 2, 16, seed=3)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, two, strict=True))


def test_calls_the_kernel_cannot_take_go_to_torch_flash(monkeypatch: pytest.MonkeyPatch) -> None:
    assert fast.cpu_kernel_for(torch.zeros(1, 2, 3, 8, dtype=torch.float16), [0, 3]) is None
    monkeypatch.setattr(fast, "cpu_has_bf16_matmuls", lambda: False)
    assert fast.cpu_kernel_for(torch.zeros(1, 2, 3, 8, dtype=torch.bfloat16), [0, 3]) is None
    assert fast.cpu_kernel_for(torch.zeros(1, 2, 3, 8), [0, 3]) is not None  # fp32 needs no bf16 hardware
    assert fast.cpu_kernel_for(torch.zeros(1, 2, 3, 7), [0, 3]) is None  # odd head size: bf16 pairs
    longest = fast.CPU_KERNEL_MAX_LENGTH
    assert fast.cpu_kernel_for(torch.zeros(1, 2, 3, 8), [0, 5, 5 + longest]) is not None
    assert fast.cpu_kernel_for(torch.zeros(1, 2, 3, 8), [0, 5, 6 + longest]) is None


def test_the_environment_switch_keeps_torch_flash(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(kernels.DISABLE, "0")
    assert kernels.cpu_attention_ops.__wrapped__() is None


def test_a_failed_build_warns_and_falls_back(
    tmp_path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(kernels, "SOURCE", broken)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "build"))
    with caplog.at_level(logging.WARNING, logger="tunewise"):
        assert kernels.cpu_attention_ops.__wrapped__() is None
    assert "could not build tunewise's CPU attention kernel" in caplog.text
    assert (
        "building tunewise's CPU attention kernel, once" in capsys.readouterr().out
    )  # the pause is announced


def test_a_cached_build_loads_without_a_word(capsys: pytest.CaptureFixture[str]) -> None:
    assert kernels.cpu_attention_ops() is not None  # built now if no earlier test or run has built it
    capsys.readouterr()
    assert kernels.is_built(kernels.extension_name())
    assert kernels.cpu_attention_ops.__wrapped__() is not None
    assert capsys.readouterr().out == ""


def test_the_build_is_named_for_the_cpu_and_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    # -march=native: a cached build must never be loaded on another CPU, or by another torch.
    name = kernels.extension_name()
    monkeypatch.setattr(kernels, "cpu_flags", lambda: "fpu sse2")
    assert kernels.extension_name() != name
    other_cpu = kernels.extension_name()
    monkeypatch.setattr(torch, "__version__", "0.0.0")
    assert kernels.extension_name() not in (name, other_cpu)


ISA_CAPPED = """
import json, logging, sys
sys.path.insert(0, sys.argv[1])
import torch
from tunewise.models import fast, kernels
import test_kernels as t
logging.basicConfig()
runs = kernels.bf16_kernel_runs()
got, want = t.attention_and_grads(torch.float32, [0, 100, 300], 4, 2, 16, seed=3)
bf16, _ = t.attention_and_grads(torch.bfloat16, [0, 100, 300], 4, 2, 16, seed=3)
fast.cpu_kernel_for = lambda query, bounds: None
flash, _ = t.attention_and_grads(torch.bfloat16, [0, 100, 300], 4, 2, 16, seed=3)
print(json.dumps({
    "runs": runs,
    "fp32_error": max(t.relative_error(g, w) for g, w in zip(got, want)),
    "bf16_is_flash": all(torch.equal(a, b) for a, b in zip(bf16, flash)),
}))
"""


@pytest.mark.skipif(platform.machine() != "x86_64", reason="oneDNN's x86 instruction-set cap")
def test_where_onednn_sees_no_bf16_hardware_bf16_falls_back_and_fp32_stays_exact() -> None:
    """oneDNN limited to AVX2 (what an AVX2-only CPU gives it, or an OS that has not granted AMX): torch's
    bf16 brgemm raises, so bf16 must fall back to torch's flash kernel, with a warning, not stop the run; fp32
    runs oneDNN's AVX2 brgemm and stays exact."""
    done = subprocess.run(
        [sys.executable, "-c", ISA_CAPPED, str(Path(__file__).parent)],
        check=False, capture_output=True, text=True, timeout=600,
        env={**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["runs"] is False and result["bf16_is_flash"]
    assert "cannot run bf16 here" in done.stderr
    assert result["fp32_error"] < 2e-6


def test_a_kernel_that_raises_in_bf16_sends_bf16_to_torch_flash(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    class Refusing:
        def varlen_forward(self, *args: object) -> None:
            raise RuntimeError("BFloat16 Brgemm ... not supported")

    monkeypatch.setattr(kernels, "cpu_attention_ops", Refusing)
    monkeypatch.setattr(fast, "cpu_has_bf16_matmuls", lambda: True)
    kernels.bf16_kernel_runs.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="tunewise"):
            assert fast.cpu_kernel_for(torch.zeros(1, 2, 3, 8, dtype=torch.bfloat16), [0, 3]) is None
        assert "cannot run bf16 here (BFloat16 Brgemm ... not supported)" in caplog.text
        assert fast.cpu_kernel_for(torch.zeros(1, 2, 3, 8), [0, 3]) is not None  # fp32 keeps the kernel
    finally:
        kernels.bf16_kernel_runs.cache_clear()


# Built for this CPU (-march=native), the kernel takes its AVX-512 paths here; other machines take the AVX2 one
# (the Zen 3 EPYC of docs/performance.md) or plain C++. Each build loads in a process of its own: one process
# can register the kernel's operator namespace once.
OLDER_BUILD = """
import json, sys
sys.path.insert(0, sys.argv[2])
import torch
from tunewise.models import kernels
kernels.CFLAGS = [flag if flag != "-march=native" else "-march=" + sys.argv[1] for flag in kernels.CFLAGS]
assert kernels.cpu_attention_ops() is not None
import test_kernels as t
errors = []
for (bounds, heads, kv_heads, dim), spread in zip(t.CASES * 2, [1.0] * len(t.CASES) + [30.0] * len(t.CASES)):
    got, want = t.attention_and_grads(torch.float32, bounds, heads, kv_heads, dim, len(bounds), spread)
    errors.append(max(t.relative_error(g, w) for g, w in zip(got, want)))
print(json.dumps(errors))
"""


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86 instruction-set levels")
@pytest.mark.parametrize("level", ["x86-64-v3", "x86-64-v2"])  # AVX2 + FMA; SSE4.2 only
def test_builds_for_older_x86_cpus_match_exact_attention(level: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", OLDER_BUILD, level, str(Path(__file__).parent)],
        check=False, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    errors = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(errors) == 2 * len(CASES)
    assert max(errors[: len(CASES)]) < 2e-6, errors  # as the native build (above)
    assert max(errors[len(CASES) :]) < 2e-5, errors  # sharp softmax: the native build's 1.25e-5 at most
