"""keep_freed_memory: a freed activation-sized block is reused, not faulted in again (glibc's mallopt)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

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
_PAGES = 10 * 2 * 64 * 2**20 // 4096  # ten steps, two 64 MiB blocks each

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only"
)


def _steps(environ: dict[str, str] | None) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT, json.dumps(environ)], capture_output=True, text=True, check=True
    )
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
