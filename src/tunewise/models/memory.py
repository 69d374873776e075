"""Memory of weights, gradients and optimizer state, by arithmetic on parameter shapes.

Pure functions: a parameter is its shape, its storage and whether it trains; the optimizer is its HF
name. Activations are not counted: they scale with batch x sequence length and are what the run's
measured peak adds on top of this. Per-tensor constants below a kilobyte (bitsandbytes' code tables,
optimizer step counters) are left out.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from tunewise.training.optim import OPTIMIZER_NAMES

FLOAT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
QUANTIZED = ("int8", "4bit", "4bit-double-quant")
"""Storage of bitsandbytes weights: LLM.int8, and 4-bit (nf4 or fp4: same size) with or without double quant."""

# bitsandbytes 4-bit weights: one absmax per block of 64 values (Params4bit's default blocksize);
# double quant stores those absmax as uint8 with one fp32 absmax per 256 of them (QLoRA paper, 3.2).
BNB_4BIT_BLOCK = 64
BNB_NESTED_BLOCK = 256
# bitsandbytes 8-bit optimizers: state of tensors under 4096 values stays fp32 (Optimizer2State's
# min_8bit_size), larger ones are uint8 with one fp32 absmax per 256 values per state.
BNB_MIN_8BIT_SIZE = 4096
BNB_OPTIM_BLOCK = 256


@dataclass(frozen=True)
class ParamSpec:
    """One parameter as the memory model sees it."""

    shape: tuple[int, ...]
    """Logical shape (a 4-bit weight's unpacked shape)."""
    storage: str
    """float32, bfloat16, float16, or a QUANTIZED storage."""
    trainable: bool
    embedding: bool = False
    """An nn.Embedding weight: 8-bit optimizers keep its state in 32 bits, as HF does."""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of weights, gradients and optimizer state for one method; activations excluded."""

    trainable_parameters: int
    total_parameters: int
    weights: int
    gradients: int
    optimizer_state: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer_state

    def as_dict(self) -> dict[str, int]:
        return {
            "trainable_parameters": self.trainable_parameters,
            "total_parameters": self.total_parameters,
            "weights_bytes": self.weights,
            "gradients_bytes": self.gradients,
            "optimizer_state_bytes": self.optimizer_state,
            "total_bytes": self.total,
        }


def _blocks(numel: int, block: int) -> int:
    return -(-numel // block)


def weight_bytes(param: ParamSpec) -> int:
    n = param.numel
    if param.storage in FLOAT_BYTES:
        return n * FLOAT_BYTES[param.storage]
    if param.storage == "int8":
        return n + 4 * param.shape[0]  # int8 codes + one fp32 scale (SCB) per output row
    packed, blocks = _blocks(n, 2), _blocks(n, BNB_4BIT_BLOCK)  # two 4-bit codes per byte
    if param.storage == "4bit":
        return packed + 4 * blocks
    if param.storage == "4bit-double-quant":
        return packed + blocks + 4 * _blocks(blocks, BNB_NESTED_BLOCK)
    raise ValueError(f"unknown storage {param.storage!r}; expected one of {[*FLOAT_BYTES, *QUANTIZED]}")


def gradient_bytes(param: ParamSpec) -> int:
    """A gradient has its parameter's dtype; frozen parameters have none."""
    if not param.trainable:
        return 0
    if param.storage not in FLOAT_BYTES:
        raise ValueError(f"a {param.storage} parameter cannot train: quantised weights have no gradient")
    return param.numel * FLOAT_BYTES[param.storage]


def optimizer_state_bytes(param: ParamSpec, optimizer: str) -> int:
    """Optimizer state of one trainable parameter under `optimizer` (an HF `optim` name)."""
    if optimizer not in OPTIMIZER_NAMES:
        raise ValueError(f"unknown optimizer {optimizer!r}; expected one of {', '.join(OPTIMIZER_NAMES)}")
    if not param.trainable:
        return 0
    n = param.numel
    if optimizer in ("adamw_torch", "adamw_torch_fused"):
        return 2 * n * FLOAT_BYTES[param.storage]  # exp_avg, exp_avg_sq: zeros_like(param)
    if optimizer == "sgd":
        return 0  # momentum 0 (HF's default): no buffer
    if optimizer == "adafactor":
        # HF's Adafactor: beta1=None (no first moment), factored second moment for >= 2-D tensors,
        # kept in fp32 (half-precision gradients are upcast first).
        if len(param.shape) < 2:
            return 4 * n
        rows, cols = math.prod(param.shape[:-1]), math.prod(param.shape[:-2]) * param.shape[-1]
        return 4 * (rows + cols)
    if optimizer == "paged_adamw_32bit" or param.embedding or n < BNB_MIN_8BIT_SIZE:
        return 2 * 4 * n  # two fp32 states
    return 2 * (n + 4 * _blocks(n, BNB_OPTIM_BLOCK))  # two uint8 states, each with fp32 absmax per block


def estimate_memory(params: Iterable[ParamSpec], optimizer: str) -> MemoryEstimate:
    params = list(params)
    return MemoryEstimate(
        trainable_parameters=sum(p.numel for p in params if p.trainable),
        total_parameters=sum(p.numel for p in params),
        weights=sum(weight_bytes(p) for p in params),
        gradients=sum(gradient_bytes(p) for p in params),
        optimizer_state=sum(optimizer_state_bytes(p, optimizer) for p in params),
    )
