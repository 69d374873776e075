"""One process of a CPU data-parallel `tunewise train`, for tests/integration/test_distributed.py.

Run as `python -m torch.distributed.run --standalone --nproc_per_node 2 _ddp_train.py train CONFIG`.

It differs from `python -m tunewise.cli` in one line: accelerate's process state is created first with
cpu=True, which is what makes accelerate read torchrun's environment as a gloo process group on a machine
without GPUs. `tunewise.run.train` creates it as `PartialState()`, which on CPU ignores that environment
and leaves every process training alone; test_distributed.py shows that with the plain CLI (xfail).
"""

from __future__ import annotations

import sys

from accelerate import PartialState

if __name__ == "__main__":
    PartialState(cpu=True)
    from tunewise.cli import main

    sys.argv = ["tunewise", *sys.argv[1:]]
    main()
