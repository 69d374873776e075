"""Fork server for the kill -9 test in test_checkpoint.py.

Importing torch takes over a second, too slow to pay once per kill, so this process imports once and forks a
saver per request. Protocol, one line each way on stdin/stdout:
  ``save <output_dir>`` -> ``started <pid>``: the child resumes from the newest valid checkpoint and saves
      steps in a loop (every even step twice, to exercise replacing a checkpoint), printing ``saved <step>``
      after each save returns, until it is killed or this server goes away.
  ``reap <pid>`` -> ``reaped <pid> <wait status>``, once the child is dead.
Checkpoint tensors are ``tensor_for(step)``, so the test can check what it loads.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

import torch

from tunewise.training.checkpoint import checkpoint_step, find_latest_valid, save_checkpoint

WIDTH = 512  # 512 x 512 float32 = 1 MiB per tensor, three of them: a save takes some milliseconds


def tensor_for(step: int, shape: tuple[int, ...] = (WIDTH, WIDTH)) -> torch.Tensor:
    return torch.full(shape, float(step))


def save(output_dir: Path, step: int) -> None:
    save_checkpoint(
        output_dir,
        step,
        model_tensors={"weight": tensor_for(step), "bias": tensor_for(step, (WIDTH,))},
        optimizer_state={
            "state": {0: {"step": torch.tensor(float(step)), "exp_avg": tensor_for(step)}},
            "param_groups": [{"lr": 0.1, "betas": (0.9, 0.999), "params": [0]}],
        },
        scheduler_state={"last_epoch": step},
        trainer_state={"step": step},
        config_yaml=f"step: {step}\n",
        save_total_limit=2,
    )
    print(f"saved {step}", flush=True)


def save_forever(output_dir: Path) -> None:
    server = os.getppid()
    latest = find_latest_valid(output_dir).path
    step = checkpoint_step(latest) + 1 if latest else 1
    while os.getppid() == server:  # stop if the server (and so the test) is gone
        save(output_dir, step)
        if step % 2 == 0:
            save(output_dir, step)
        step += 1


def serve() -> None:
    for line in sys.stdin:
        command, argument = line.split()
        if command == "save":
            pid = os.fork()
            if pid == 0:
                try:
                    save_forever(Path(argument))
                except BaseException:
                    traceback.print_exc()
                    raise
                finally:
                    os._exit(1)  # never fall back into the server loop
            print(f"started {pid}", flush=True)
        elif command == "reap":
            _, status = os.waitpid(int(argument), 0)
            print(f"reaped {argument} {status}", flush=True)


if __name__ == "__main__":
    serve()
