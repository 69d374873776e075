"""tunewise's own CPU kernel: causal attention within each example of a packed row (csrc/varlen_attention.cpp).

On examples of 64-512 tokens it runs 2.0-3.4x torch's CPU flash attention in bf16 and 1.2-2.3x in fp32, forward and
backward together (Zen 4, docs/performance.md). It is C++ built on first use by torch's extension loader with
the machine's C++ compiler (the one `torch.compile` needs on CPU too) and ninja: about 15 s once per machine,
torch version and CPU, then cached in torch's extensions directory (`TORCH_EXTENSIONS_DIR`, by default
~/.cache/torch_extensions). `-march=native` builds it for this CPU, which is why the CPU's flags are part of
its name. A first build says so (the pause is ~15 s); where it cannot be built, tunewise says why once and keeps
torch's flash kernel.
`TUNEWISE_CPU_ATTENTION_KERNEL=0` keeps torch's kernel too (benchmarks compare the two that way).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("tunewise")

SOURCE = Path(__file__).parent / "csrc" / "varlen_attention.cpp"
# Fast math without -ffinite-math-only: reductions may reorder, NaN still propagates.
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-fassociative-math",
          "-fno-signed-zeros"]  # fmt: skip
DISABLE = "TUNEWISE_CPU_ATTENTION_KERNEL"


def cpu_has_bf16_matmuls() -> bool:
    """AMX or AVX512_BF16: bf16 matmuls in hardware. oneDNN's bf16 brgemm, which the kernel calls, needs one of
    them (torch raises without), and `precision: auto` picks bf16 on CPU only with them (config/resolve.py).
    oneDNN, which runs torch's CPU bf16 matmuls, must be allowed to use them too: `ONEDNN_MAX_CPU_ISA` below
    AVX512_CORE_BF16 leaves it emulating bf16, several times slower than fp32."""
    if onednn_isa_cap() in ONEDNN_ISAS_WITHOUT_BF16:
        return False
    return _cpu_check("_is_amx_tile_supported") or _cpu_check("_is_avx512_bf16_supported")


# oneDNN's instruction-set names (its `ONEDNN_MAX_CPU_ISA` values) below the first with bf16 dot products.
ONEDNN_ISAS_WITHOUT_BF16 = frozenset(
    {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}
)


def onednn_isa_cap() -> str | None:
    """The instruction set oneDNN is capped at (`ONEDNN_MAX_CPU_ISA`, or its older name `DNNL_MAX_CPU_ISA`)."""
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        if value := os.environ.get(name, "").strip():
            return value.upper()
    return None


def _cpu_check(name: str) -> bool:
    """One of torch's own (private) CPU feature checks; a torch too old to have it says no."""
    check = getattr(torch.cpu, name, None)
    return bool(check()) if check is not None else False


def cpu_flags() -> str:
    """The CPU's feature flags (what -march=native compiles for), or its model name where /proc has none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def extension_name() -> str:
    """One name per source, torch version and CPU: a build never runs on a CPU or torch it was not built for."""
    key = "\n".join([SOURCE.read_text(), " ".join(CFLAGS), torch.__version__, cpu_flags()])
    return "tunewise_cpu_kernels_" + hashlib.sha256(key.encode()).hexdigest()[:12]


def ninja_on_path() -> bool:
    """torch's loader runs `ninja`; the PyPI package installs it beside Python, which may not be on PATH."""
    if shutil.which("ninja"):
        return True
    try:
        import ninja  # type: ignore[import-untyped]
    except ImportError:
        return False
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    return shutil.which("ninja") is not None


@functools.cache
def cpu_attention_ops() -> Any | None:
    """`torch.ops.tunewise_kernels` with the kernel built and loaded, or None (and a warning, once) if it cannot be."""
    if os.environ.get(DISABLE, "1") == "0":
        log.info("%s=0: packed rows use torch's CPU flash attention", DISABLE)
        return None
    if not ninja_on_path():
        log.warning(
            "tunewise's CPU attention kernel needs ninja (pip install ninja); using torch's flash kernel"
        )
        return None
    from torch.utils.cpp_extension import load

    name = extension_name()
    if not is_built(name):  # a pause of ~15 s deserves a word (as load.py's GGUF conversion gives one)
        print("building tunewise's CPU attention kernel, once for this machine (~15 s)", flush=True)
    start = time.perf_counter()
    try:
        load(name, [str(SOURCE)], extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"], is_python_module=False)
    except (RuntimeError, OSError, ImportError, subprocess.SubprocessError) as error:
        # No compiler, a missing header, a compile error: torch's kernel still works, only slower.
        log.warning("could not build tunewise's CPU attention kernel (%s); using torch's flash kernel", error)
        return None
    seconds = time.perf_counter() - start
    if seconds > 1:
        log.info("built tunewise's CPU attention kernel in %.0f s (cached for the next runs)", seconds)
    return torch.ops.tunewise_kernels


@functools.cache
def bf16_kernel_runs() -> bool:
    """Whether the built kernel runs in bf16 here: a forward and backward on one tiny example, once a process.

    torch's bf16 brgemm asks oneDNN, not the CPU flags that `cpu_has_bf16_matmuls` reads, and oneDNN can see
    less: an operating system that has not granted AMX to the process, or `ONEDNN_MAX_CPU_ISA` set below the
    CPU. torch then raises at the first call, which must not stop a run: bf16 stays on torch's flash kernel.
    """
    ops = cpu_attention_ops()
    if ops is None:
        return False
    one = torch.zeros(1, 1, 2, 2, dtype=torch.bfloat16)  # (batch, heads, tokens, head size)
    try:
        out, lse = ops.varlen_forward(one, one, one, [0, 2], 1.0)
        ops.varlen_backward(out.transpose(1, 2), one, one, one, out.transpose(1, 2), lse, [0, 2], 1.0)
    except RuntimeError as error:
        log.warning(
            "tunewise's CPU attention kernel cannot run bf16 here (%s); bf16 uses torch's flash kernel", error
        )
        return False
    return True


def is_built(name: str) -> bool:
    """Whether torch's extension loader has a build of `name` cached (it then loads in well under a second)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory
    except ImportError:  # a torch that moved it: say nothing rather than something wrong
        return True
    return (Path(_get_build_directory(name, verbose=False)) / f"{name}.so").is_file()
