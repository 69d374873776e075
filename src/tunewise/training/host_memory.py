"""Host memory set for CPU training, where every step allocates and frees the same large tensors.

`keep_freed_memory`: glibc's malloc keeps freed blocks for reuse.

glibc serves an allocation above its mmap threshold (128 KiB, raised up to 32 MiB as large blocks are
freed) with a fresh `mmap`, and returns heap memory above its trim threshold to the kernel. Either way the
next step's tensors land on pages the kernel must fault in and zero again: a training step on CPU pays a
page fault per 4 KiB of every activation it writes. With no mmap below 2 GiB and no trimming, freed
blocks stay in the heap for the next step: bf16 LoRA steps of SmolLM2 on an AMX Xeon ran 8-10% faster
(bench/cpu_layouts.py: 364-373 -> 401-404 tokens/s) with a quarter of the page faults and the same peak
RSS (the heap only keeps what the peak needed); fp32 steps ran at the same speed (docs/performance.md).
Memory is not given back until the process exits.

`request_huge_pages`: torch's CPU allocator puts tensors of 2 MiB and more on transparent huge pages
(`THP_MEM_ALLOC_ENABLE=1`: `madvise(MADV_HUGEPAGE)` on every block of 2 MiB and more), so what memory the heap still
has to grow by is faulted in 2 MiB at a time, not 4 KiB. Alternating bf16 runs as above: 544 and 549 tokens/s
against 508 and 500 (+7-10%), a third fewer page faults, peak RSS +2% (2.27 against 2.22 GiB). torch reads
the variable once, at its first large allocation, so the `tunewise` command sets it before importing
anything that allocates; `huge_pages_note` checks whether it took effect (the block's mapping is advised).
"""

from __future__ import annotations

import ctypes
import os
import platform
from pathlib import Path

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


_THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")  # e.g. "always [madvise] never"
_TORCH_THP = "THP_MEM_ALLOC_ENABLE"  # read by c10's CPU allocator at its first large allocation
_HUGE_PAGE = 2**21


def request_huge_pages(environ: dict[str, str] | os._Environ = os.environ) -> None:
    """Set THP_MEM_ALLOC_ENABLE=1 unless the user set it or the kernel has huge pages off.

    Only takes effect before torch's first large allocation (a model load makes one): the `tunewise`
    command calls it first thing.
    """
    if platform.system() != "Linux" or _TORCH_THP in environ:
        return
    try:
        mode = _THP_MODE.read_text()
    except OSError:
        return
    if "[never]" not in mode:
        environ[_TORCH_THP] = "1"


def huge_pages_note(environ: dict[str, str] | os._Environ = os.environ) -> str | None:
    """What torch's allocator does with huge pages, as a plan note; None where they are not asked for."""
    if environ.get(_TORCH_THP) != "1":
        return None
    if torch_uses_huge_pages():
        return f"host memory: tensors of 2 MiB and more on transparent huge pages ({_TORCH_THP}=1)"
    return (
        f"host memory: {_TORCH_THP}=1 came after torch's first large allocation, so huge pages are off; "
        "set it before Python starts (the tunewise command does)"
    )


def torch_uses_huge_pages() -> bool:
    """Whether torch's CPU allocator advises huge pages for a large block (VmFlags "hg" in /proc/self/smaps)."""
    import torch

    block = torch.empty(4 * _HUGE_PAGE, dtype=torch.uint8)
    middle = block.data_ptr() + 2 * _HUGE_PAGE
    try:
        smaps = Path("/proc/self/smaps").read_text().splitlines()
    except OSError:
        return False
    inside = False
    for line in smaps:
        head = line.split(" ", 1)[0]
        if "-" in head and not head.endswith(":"):  # a mapping's first line: "start-end perms ..."
            start, end = (int(x, 16) for x in head.split("-"))
            inside = start <= middle < end
        elif inside and line.startswith("VmFlags:"):
            return "hg" in line.split()[1:]
    return False


def set_host_memory(environ: dict[str, str] | os._Environ = os.environ) -> list[str]:
    """Both settings, for a CPU run; returns the plan notes."""
    request_huge_pages(environ)
    return [note for note in (keep_freed_memory(environ), huge_pages_note(environ)) if note]
