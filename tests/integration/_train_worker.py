"""Fork server for test_crash_safety.py: real training runs that the test kills with SIGKILL.

Starting python and importing torch + transformers takes seconds, too slow to pay once per kill, so this
process imports once and forks one training run (``tunewise.run.train``) per request. Protocol, one line each
way on stdin/stdout:
  ``run <job.json>`` -> ``started <pid>``. The child runs the job and reports on this same stdout, one line per
      event: ``event <pid> resumed <step>``, ``event <pid> save-start <step>``, ``event <pid> saved <step>``
      (after the save returned) and ``event <pid> done <step>`` (train() returned).
  ``reap <pid>`` -> ``reaped <pid> <wait status>``, once the child is dead; its events all come before this line.
A job is JSON: ``{"config": {...}, "resume": bool, "kill_at_micro_batch": int | null, "slow_write_s": float}``.
``kill_at_micro_batch`` makes the child SIGKILL itself during that training micro-batch's forward (counted from 1
in this process), i.e. between the micro-batches of an accumulation window; ``slow_write_s`` sleeps before every
checkpoint file write, so that random kills often land inside a save.
"""

from __future__ import annotations

import functools
import io
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

# One thread: forking after torch used an OpenMP pool can hang the child, the host is shared, and the
# reference runs of the test run in this same process setting, so thread count cannot change a sum's order.
torch.set_num_threads(1)

from rich.console import Console

from tunewise import run
from tunewise.config import schema
from tunewise.training import checkpoint
from tunewise.training.loss import CausalLMLoss

# Speed only: dump_config re-parses each config class's source once per key (~1.5 s per run); the docs of a
# class never change while a process runs. Reported as a bug in config/schema.py.
if hasattr(schema, "_field_docs") and not hasattr(schema._field_docs, "cache_info"):
    schema._field_docs = functools.cache(schema._field_docs)


def emit(what: str, step: int) -> None:
    # One write(2) per line, below PIPE_BUF: lines from the children and the server never interleave.
    os.write(1, f"event {os.getpid()} {what} {step}\n".encode())


def instrument(job: dict[str, Any]) -> None:
    """Patch this (forked) child only: report saves and resumes, slow writes down, kill itself mid-window."""
    save, restore, write_file, forward = (
        run.RunCheckpointer.save,
        run.restore,
        checkpoint._write_file,
        CausalLMLoss.forward,
    )

    def reported_save(self: run.RunCheckpointer, state: run.LoopState) -> Path:
        emit("save-start", state.step)
        path = save(self, state)
        emit("saved", state.step)
        return path

    def reported_restore(*args: Any, **kwargs: Any) -> Any:
        state, loaded = restore(*args, **kwargs)
        emit("resumed", state.step)
        return state, loaded

    def slow_write(path: Path, data: bytes) -> None:
        time.sleep(job.get("slow_write_s", 0.0))
        write_file(path, data)

    micro_batches = 0

    def killing_forward(self: CausalLMLoss, *args: Any, **kwargs: Any) -> torch.Tensor:
        nonlocal micro_batches
        if self.training:
            micro_batches += 1
            if micro_batches == job["kill_at_micro_batch"]:
                os.kill(os.getpid(), signal.SIGKILL)
        return forward(self, *args, **kwargs)

    run.RunCheckpointer.save = reported_save  # type: ignore[method-assign]
    run.restore = reported_restore
    checkpoint._write_file = slow_write
    if job.get("kill_at_micro_batch"):
        CausalLMLoss.forward = killing_forward  # type: ignore[method-assign]


def train(job: dict[str, Any]) -> None:
    instrument(job)
    state = run.train(job["config"], console=Console(file=io.StringIO()), resume=job["resume"])
    emit("done", state.get("total_steps", state.get("step", -1)))


def serve() -> None:
    for line in sys.stdin:
        command, argument = line.split()
        if command == "run":
            job = json.loads(Path(argument).read_text())
            pid = os.fork()
            if pid == 0:
                status = 1
                try:
                    train(job)
                    status = 0
                except BaseException:  # noqa: BLE001 - whatever it is goes to the log, then os._exit
                    traceback.print_exc()
                finally:
                    os._exit(status)  # never fall back into the server loop, nor run its atexit hooks
            print(f"started {pid}", flush=True)
        elif command == "reap":
            _, status = os.waitpid(int(argument), 0)
            print(f"reaped {argument} {status}", flush=True)


if __name__ == "__main__":
    print("ready", flush=True)
    serve()
    os._exit(0)  # stdin closed: the test is done; skip torch's slow interpreter teardown
