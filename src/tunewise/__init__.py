"""tunewise: fine-tune LLMs with every hyperparameter validated, explained, resolved and measured."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tunewise.config.schema import TunewiseConfig

__version__ = "0.1.0"


def train(
    config: str | Path | dict | TunewiseConfig | None = None, overrides: list[str] | None = None
) -> dict[str, Any]:
    """Fine-tune as `config` (a YAML path, a dict or a TunewiseConfig) says; returns the run summary."""
    from tunewise.run import train as _train

    return _train(config, overrides or [])


__all__ = ["__version__", "train"]
