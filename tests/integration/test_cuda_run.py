"""The whole run on a GPU: the settings a CUDA user gets by default, end to end (marker `gpu`).

Run with `pytest -m gpu` on a machine with CUDA; `scripts/gpu_check.sh` does so on a lent GPU machine.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
import yaml
from rich.console import Console
from safetensors.torch import load_file

from tunewise.run import train

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_packed_compiled_lora_trains_on_cuda_in_bf16(tiny_config: dict) -> None:
    tiny_config["data"]["packing"] = True
    tiny_config["training"] |= {"torch_compile": True, "max_steps": 16}
    summary = train(tiny_config, console=Console(file=io.StringIO()))

    out = Path(tiny_config["training"]["output_dir"])
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    capable = torch.cuda.is_bf16_supported()
    assert resolved["training"]["precision"] == ("bf16" if capable else "fp16")
    assert resolved["training"]["torch_compile"] is True
    losses = [
        json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x
    ]
    assert len(losses) == 16 and torch.isfinite(torch.tensor(losses)).all()
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05
    assert summary["eval_after"]["eval_loss"] < summary["eval_before"]["eval_loss"] - 0.05
    # Device memory, not host RSS: a tiny model's step allocates well under a GiB on the GPU.
    assert 0 < summary["peak_memory_bytes"] < 2**30
    adapter = load_file(out / "adapter_model.safetensors")
    lora_b = [t for name, t in adapter.items() if "lora_B" in name]
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b)  # B starts at zero; every one trained


def test_the_plan_counts_what_the_gpu_forward_keeps_allocated(tiny_config: dict) -> None:
    """models/activations.py on CUDA: the saved-for-backward bytes it counts against the caching allocator's
    own count of what the forward left allocated (which rounds each block up to 512 bytes)."""
    from tunewise.data.collate import collate_packed
    from tunewise.models.activations import saved_for_backward
    from tunewise.run import prepare
    from tunewise.training.loss import CausalLMLoss

    tiny_config["data"]["packing"] = True
    prep = prepare(tiny_config)
    loss_module = CausalLMLoss(prep.model.cuda())
    batch = collate_packed([prep.data.train[i] for i in range(8)], pad_token_id=0)
    batch = {k: v.cuda() for k, v in batch.items()}
    counted = saved_for_backward(loss_module, batch, torch.bfloat16)
    loss_module.train()
    before = torch.cuda.memory_allocated()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = loss_module(**batch)
    held = torch.cuda.memory_allocated() - before
    loss.backward()
    assert counted > 0 and counted == pytest.approx(held, rel=0.05)


def test_a_real_gpu_out_of_memory_saves_the_last_step_and_the_run_resumes(
    tiny_config: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Step 5's first micro-batch asks the caching allocator for 16 TiB: torch's own OutOfMemoryError. Step 4 is
    saved (CUDA random state included), the error names the fixes, and the resumed run finishes as the
    uninterrupted one (within bf16 and GPU kernel noise)."""
    from tunewise.training.loss import CausalLMLoss
    from tunewise.training.memory import TrainingOutOfMemory

    tiny_config["data"]["packing"] = True
    tiny_config["training"] |= {"max_steps": 8, "memory_check": False}
    reference = dict(
        tiny_config,
        training={**tiny_config["training"], "output_dir": tiny_config["training"]["output_dir"] + "-ref"},
    )
    train(reference, console=Console(file=io.StringIO()))

    forward, calls = CausalLMLoss.forward, []

    def too_large(self: CausalLMLoss, *args: object, **kwargs: object) -> torch.Tensor:
        if self.training:
            calls.append(1)
            if len(calls) == 5:
                torch.empty(2**44, dtype=torch.uint8, device="cuda")
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(CausalLMLoss, "forward", too_large)
    with pytest.raises(TrainingOutOfMemory) as stopped:
        train(tiny_config, console=Console(file=io.StringIO()))
    assert stopped.value.where == "step 5" and stopped.value.saved_step == 4
    assert "Out of memory on cuda" in str(stopped.value) and "max_tokens_per_micro_batch" in str(
        stopped.value
    )
    monkeypatch.undo()

    summary = train(
        tiny_config, ["training.gradient_checkpointing=true"], Console(file=io.StringIO()), resume=True
    )
    assert summary["total_steps"] == 8
    out, ref = Path(tiny_config["training"]["output_dir"]), Path(reference["training"]["output_dir"])

    def losses(path: Path) -> list[float]:
        rows = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if "loss" in r]

    assert losses(out) == pytest.approx(losses(ref), abs=2e-2)


def test_the_memory_check_is_on_by_default_on_a_gpu(tiny_config: dict) -> None:
    tiny_config["data"]["packing"] = True
    tiny_config["training"]["max_steps"] = 8
    summary = train(tiny_config, console=Console(file=io.StringIO()))
    check = summary["memory_check"]
    assert check is not None and check["largest_micro_batch_tokens"] > 0 and 1 <= check["step"] <= 8
