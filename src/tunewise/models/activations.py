"""Activation memory: the bytes a training forward keeps for its backward, measured on the model itself.

Every tensor autograd saves passes through `torch.autograd.graph.saved_tensors_hooks`; counting each storage
once, parameters and buffers aside, gives what the forward leaves allocated for the backward (on the tests'
tiny llama and on SmolLM2 it equals the net allocations torch's memory profiler records over the forward).
The plan runs it on the run's largest micro-batch itself, so nothing is extrapolated: attention that keeps a
length x length mask (sdpa with a padding mask) counts as it is. It runs eagerly: torch.compile's partitioner
keeps less (SmolLM2 LoRA fp32: 681 against 1,174 KiB per token, docs/performance.md). The backward's own
temporaries come on top (about one layer's activations, and a chunk of logits).

Measured, not modelled, so it holds for any architecture, adapter, dtype or quantisation; the random state is
put back afterwards, so a run that measures trains as one that does not.
"""

from __future__ import annotations

import torch

from tunewise.training.checkpoint import capture_rng_state, restore_rng_state
from tunewise.training.loss import CausalLMLoss


@torch.compiler.set_stance("force_eager")
def saved_for_backward(
    loss_module: CausalLMLoss, batch: dict[str, torch.Tensor], autocast_dtype: torch.dtype | None
) -> int:
    """Bytes that the training forward of `batch` keeps for its backward (each storage once, parameters aside)."""
    rng, training = capture_rng_state(), loss_module.training
    device = next(loss_module.parameters()).device
    own = {t.untyped_storage().data_ptr() for t in [*loss_module.parameters(), *loss_module.buffers()]}
    storages: dict[int, int] = {}

    def count(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in own:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    autocast = torch.autocast(
        device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None
    )
    loss_module.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(count, lambda tensor: tensor), autocast:
            loss = loss_module(**{k: v.to(device) for k, v in batch.items()})
        del loss  # frees the graph and what it saved
    finally:
        loss_module.train(training)
        restore_rng_state(rng)
    return sum(storages.values())
