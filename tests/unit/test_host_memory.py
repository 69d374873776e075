"""Host memory: freed activation-sized blocks are reused, not faulted in again (glibc's mallopt), and torch's
large tensors land on huge pages when asked for in time; the user's own settings are kept."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

# In a fresh process (the setting is process-wide and cannot be undone): a "step" writes two 64 MiB tensors
# and frees them, as a training step does its activations. After five warm-up steps, count the page faults
# of ten more. glibc mmaps blocks above 32 MiB by default, so every step faults every page in again; kept
# in the heap, the blocks are reused (a small allocation landing in a freed block can cost one more).
_SCRIPT = """
import json, resource, sys, torch
from tunewise.training.host_memory import keep_freed_memory
environ = json.loads(sys.argv[1])
note = keep_freed_memory(environ) if environ is not None else None
def step():
    block = torch.empty(16 * 2**20, dtype=torch.float32).fill_(1.0)
    return float((block * 2).sum())
for _ in range(5):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(json.dumps({"faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, "note": note}))
"""
# Without torch's huge pages, which importing tunewise.cli (as other tests do) asks for in this process.
_BASE_ENV = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
_PAGES = 10 * 2 * 64 * 2**20 // 4096  # ten steps, two 64 MiB blocks each

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only"
)


def _steps(environ: dict[str, str] | None) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT, json.dumps(environ)], capture_output=True, text=True, check=True, env=_BASE_ENV
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_freed_blocks_are_reused_without_page_faults() -> None:
    default = _steps(None)
    kept = _steps({})
    assert default["faults"] > 0.9 * _PAGES  # glibc's default: fresh mappings, every page faulted in
    assert kept["faults"] < 0.2 * _PAGES  # 0 or one block's 16384 pages in 20 runs here
    assert "glibc malloc keeps freed blocks" in kept["note"]


@pytest.mark.parametrize(
    "environ",
    [{"MALLOC_TRIM_THRESHOLD_": "131072"}, {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1"},
     {"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}],
)  # fmt: skip
def test_the_users_allocator_settings_are_kept(environ: dict[str, str]) -> None:
    result = _steps(environ)
    assert result["faults"] > 0.9 * _PAGES
    assert result["note"] == "host memory: the allocator settings in this environment are kept as they are"


# Huge pages: in a fresh process, set before torch's first large allocation (as the `tunewise` command does),
# or after one (too late: torch reads the variable once).
_HUGE_SCRIPT = """
import json, os, sys, torch
from tunewise.training.host_memory import huge_pages_note, request_huge_pages
os.environ.update(json.loads(sys.argv[1]))
early_block = torch.ones(8 * 2**20, dtype=torch.uint8) if sys.argv[2] == "late" else None
request_huge_pages()  # the process's own environment, which torch reads
block = torch.ones(64 * 2**20, dtype=torch.uint8)  # touched: its pages are faulted in
huge_kib = sum(int(line.split()[1]) for line in open("/proc/self/smaps") if line.startswith("AnonHugePages"))
print(json.dumps({"note": huge_pages_note(), "huge_kib": huge_kib}))
"""


def _huge(environ: dict[str, str], when: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _HUGE_SCRIPT, json.dumps(environ), when],
        capture_output=True, text=True, check=True, env=_BASE_ENV,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def _thp_mode() -> str:
    try:
        return Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "[never]"


@pytest.mark.skipif("[madvise]" not in _thp_mode(), reason="huge pages on this kernel are not by madvise")
def test_large_tensors_land_on_huge_pages_when_asked_in_time() -> None:
    early, late = _huge({}, "early"), _huge({}, "late")
    assert (
        early["note"]
        == "host memory: tensors of 2 MiB and more on transparent huge pages (THP_MEM_ALLOC_ENABLE=1)"
    )
    assert early["huge_kib"] >= 32 * 1024  # most of the 64 MiB tensor, 2 MiB a page
    assert late["note"].startswith(
        "host memory: THP_MEM_ALLOC_ENABLE=1 came after torch's first large allocation"
    )
    assert late["huge_kib"] < 4 * 1024  # madvise mode: nothing advised, (almost) no huge pages


def test_the_users_choice_is_kept() -> None:
    users = _huge({"THP_MEM_ALLOC_ENABLE": "0"}, "early")
    assert users["note"] is None
    if "[madvise]" in _thp_mode():  # left at 0, torch advises nothing: (almost) no huge pages
        assert users["huge_kib"] < 4 * 1024
