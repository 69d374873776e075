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
