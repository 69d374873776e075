"""tunewise: fine-tune LLMs with every hyperparameter validated, explained, resolved and measured."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tunewise.config.schema import TunewiseConfig

__version__ = "0.1.0"

# On CPUs with AVX512-BF16, importing bitsandbytes 0.50 tries to fetch a bf16 inference kernel from the HF Hub
# and logs a warning when it cannot (offline, untrusted). That kernel serves only 4-bit weights repacked for
# inference, which tunewise turns off (models/load.py: keep_4bit_weights_unpacked): the warning is noise.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: not record.getMessage().startswith("Failed to load CPU gemm_4bit_forward")
)


def train(
    config: str | Path | dict | TunewiseConfig | None = None, overrides: list[str] | None = None
) -> dict[str, Any]:
    """Fine-tune as `config` (a YAML path, a dict or a TunewiseConfig) says; returns the run summary."""
    from tunewise.run import train as _train

    return _train(config, overrides or [])


__all__ = ["__version__", "train"]
