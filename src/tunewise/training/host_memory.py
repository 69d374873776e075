"""glibc's malloc, set for CPU training: every step allocates and frees the same large tensors.

glibc serves an allocation above its mmap threshold (128 KiB, raised up to 32 MiB as large blocks are
freed) with a fresh `mmap`, and returns heap memory above its trim threshold to the kernel. Either way the
next step's tensors land on pages the kernel must fault in and zero again: a training step on CPU pays a
page fault per 4 KiB of every activation it writes. With no mmap below 2 GiB and no trimming, freed
blocks stay in the heap for the next step: bf16 LoRA steps of SmolLM2 on an AMX Xeon ran 8-10% faster
(bench/cpu_layouts.py: 364-373 -> 401-404 tokens/s) with a quarter of the page faults and the same peak
RSS (the heap only keeps what the peak needed); fp32 steps ran at the same speed (docs/performance.md).
Memory is not given back until the process exits.
"""

from __future__ import annotations

import ctypes
import os
import platform

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3
_LARGEST = 2**31 - 1  # bytes, mallopt's largest value (a C int): above any activation of a CPU-sized run
# The user's own allocator settings win: glibc's variables and tunables, or another allocator preloaded.
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")
_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")


def keep_freed_memory(environ: dict[str, str] | os._Environ = os.environ) -> str | None:
    """Set glibc's malloc to keep freed memory for reuse; returns what was done (a plan note), or None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    if any(name in environ for name in _USER_SETTINGS) or any(
        a in environ.get("LD_PRELOAD", "") for a in _ALLOCATORS
    ):
        return "host memory: the allocator settings in this environment are kept as they are"
    libc = ctypes.CDLL(None)  # the C library this process already uses
    if not (libc.mallopt(_M_MMAP_THRESHOLD, _LARGEST) and libc.mallopt(_M_TRIM_THRESHOLD, _LARGEST)):
        return None
    return (
        "host memory: glibc malloc keeps freed blocks for reuse (no mmap, no trimming below 2 GiB): "
        "fewer page faults each step (training/host_memory.py)"
    )
