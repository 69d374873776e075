"""The training objective: summed cross-entropy over target tokens only.

The LM head runs only at positions that have a target, in chunks, each chunk recomputed in the
backward pass; full-vocabulary fp32 logits for every token are never materialised. This matters:
SmolLM2's 49k-word head is ~20% of the model's FLOPs per token, and prompt tokens (no target)
are often half of a chat batch.

The function returns a *sum*: the loop divides by the number of target tokens in the whole
accumulated (and, under DDP, global) batch, so the gradient is exactly that of one big batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from tunewise.data.tokenize import IGNORE

LOGIT_CHUNK = 2048  # rows of logits alive at once: 2048 x 49152 fp32 = 400 MB at most


def _chunk_ce(lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(lm_head(hidden).float(), targets, reduction="sum")


def target_cross_entropy(
    hidden: torch.Tensor, targets: torch.Tensor, lm_head: nn.Module, chunk: int = LOGIT_CHUNK
) -> torch.Tensor:
    keep = targets != IGNORE
    hidden, targets = hidden[keep], targets[keep]
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), chunk):
        part = slice(start, start + chunk)
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_ce, lm_head, hidden[part], targets[part], use_reentrant=False)
        else:
            total = total + _chunk_ce(lm_head, hidden[part], targets[part])
    return total


def _decoder(model: nn.Module) -> nn.Module:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder()


class CausalLMLoss(nn.Module):
    """Wraps a causal LM so one `forward` yields the summed target loss.

    Keeping the whole computation inside one module's forward lets DDP/FSDP (through Accelerate)
    wrap it as usual.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden = _decoder(self.model)(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        return target_cross_entropy(hidden, targets, self.model.get_output_embeddings())
