"""Full fine-tuning vs LoRA vs QLoRA on the embedded SmolLM2-135M, on this machine's CPU.

Each method trains a few steps of the quickstart (examples/quickstart.yaml) in its own process, so
peak RSS is that method's alone. Printed per method: trainable parameters and the plan's estimate of
weights + gradients + optimizer state (no activations), then measured peak RSS, tokens/s and loss.

    python bench/methods.py            # 4 steps per method, ~8 min on 2 shared cores
    python bench/methods.py --steps 10 --methods lora,qlora
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "quickstart.yaml"


def overrides(method: str, steps: int, output_dir: Path) -> list[str]:
    """The quickstart, shortened: no task metric or samples, 4 validation rows, no checkpoints."""
    settings = [
        f"adapter.method={method}",
        f"training.max_steps={steps}",
        "training.warmup_steps=0",
        "training.logging_steps=1",
        f"training.output_dir={output_dir}",
        "evaluation.task_metric=none",
        "evaluation.max_eval_samples=4",
        "evaluation.num_sample_prompts=0",
    ]
    if method == "full":  # the quickstart's 1e-3 is a LoRA rate; full fine-tuning takes tunewise's default
        settings.append("training.learning_rate=auto")
    return settings


def run_one(method: str, steps: int, output_dir: Path) -> dict:
    """Train in this process and return what the table shows (called in a child process)."""
    from rich.console import Console

    from tunewise.run import train

    summary = train(QUICKSTART, overrides(method, steps, output_dir), console=Console(file=io.StringIO()))
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    # The loop's own rate at the last step: training only (summary's train_seconds also holds the
    # final checkpoint write, 1.5 GB of weights and optimizer state for full fine-tuning).
    rate = steps[-1]["tokens_per_second"]
    return {
        "peak_rss_bytes": summary["peak_memory_bytes"],
        "tokens_per_second": rate,
        "seconds_per_step": steps[-1]["tokens"] / rate / len(steps),
        "first_loss": steps[0]["loss"],
        "last_loss": steps[-1]["loss"],
    }


def estimates() -> dict[str, dict[str, int]]:
    """The plan's per-method parameters and memory for the quickstart (meta device: no weights)."""
    from tunewise.config.load import load_config
    from tunewise.models.adapters import LoraSettings, memory_by_method
    from tunewise.models.load import materialize, resolve_source

    cfg = load_config(QUICKSTART)
    lora = LoraSettings(**{k: getattr(cfg.adapter, k) for k in LoraSettings.__dataclass_fields__})
    model_dir = materialize(resolve_source(cfg.model.model_name_or_path))
    found = memory_by_method(
        model_dir, lora, cfg.training.optim, method="lora", torch_dtype="float32", bits=None
    )
    return {method: e.as_dict() for method, e in found.items()}


def child(method: str, steps: int) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"bench-{method}-") as tmp:
        done = subprocess.run(
            [sys.executable, __file__, "--child", method, "--steps", str(steps), "--output-dir", tmp],
            capture_output=True,
            text=True,
            check=False,
        )
    if done.returncode != 0:
        raise RuntimeError(f"{method} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--methods", default="full,lora,qlora")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--output-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(args.child, args.steps, args.output_dir)))
        return

    planned = estimates()
    load = os.getloadavg()[0]
    print(
        f"SmolLM2-135M, quickstart, {args.steps} steps, {os.cpu_count()} CPUs, load average {load:.1f} at start"
    )
    header = (
        "method",
        "trainable",
        "weights+grads+optim (plan)",
        "peak RSS",
        "s/step",
        "tokens/s",
        "loss first -> last",
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for method in args.methods.split(","):
        got, plan = child(method, args.steps), planned[method]
        cells = (
            method,
            f"{plan['trainable_parameters']:,}",
            mib(plan["total_bytes"]),
            mib(got["peak_rss_bytes"]),
            f"{got['seconds_per_step']:.1f}",
            f"{got['tokens_per_second']:,.0f}",
            f"{got['first_loss']:.3f} -> {got['last_loss']:.3f}",
        )
        print("| " + " | ".join(cells) + " |", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} at end")


if __name__ == "__main__":
    main()
