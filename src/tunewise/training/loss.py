"""The training objective: summed cross-entropy over target tokens only.

The LM head runs only at positions that have a target, in chunks; full-vocabulary fp32 logits for
every token are never materialised. This matters: SmolLM2's 49k-word head is ~20% of the model's
FLOPs per token, and prompt tokens (no target) are often half of a chat batch.

Each chunk's gradient (softmax - one-hot, times the head) is computed in the forward pass, while
the logits are at hand, and kept as a (rows x hidden) tensor; the backward pass only scales it. A
recompute-in-backward scheme (activation checkpointing) runs the head's matmul three times, this
one twice: 2/3 of the head's FLOPs, and no logits alive during the backward pass.

The function returns a *sum*: the loop divides by the number of target tokens in the whole
accumulated (and, under DDP, global) batch, so the gradient is exactly that of one big batch.

On CPU in bf16 the target rows are rounded up to a multiple of 64 with zero rows that add nothing:
oneDNN compiles a kernel per new matmul shape, and the target count changes every micro-batch (the
head 20% faster a row in isolation, and a step's logits blocks recur in size: docs/performance.md).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tunewise.data.collate import collate_packed
from tunewise.data.tokenize import IGNORE
from tunewise.models.fast import VARLEN_SDPA, cu_seq_lens

log = logging.getLogger("tunewise")

LOGIT_CHUNK = 1024
"""Rows of logits alive at once on a GPU: 1024 x 49152 fp32 = 200 MB."""

CPU_LOGIT_CHUNK = 128
"""On CPU: 128 x 49152 fp32 = 25 MB. Whole compiled steps ran as fast as with 1024 rows (fp32 and bf16,
2026-12-06), and bf16 micro-batches of 4 examples peaked 0.3-0.4 GiB lower in RSS (docs/performance.md)."""

CPU_HALF_ROW_MULTIPLE = 64
"""On CPU, a bf16/fp16 head runs on oneDNN, which compiles a kernel for every new matrix shape: the rows
(target tokens) are rounded up to a multiple of this with zero rows, so a few shapes recur (a chunk of
rows stays a multiple of it). The loss and the gradients leave the added rows out."""


class _TargetCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ W.T + b, target_i), with the gradients computed chunk by chunk in forward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        chunk: int,
        rows: int,
    ) -> torch.Tensor:
        """`rows`: how many leading rows are real; those after it (shape rounding) add nothing."""
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        # fp32 accumulators: a bf16 weight's gradient summed over many chunks would lose bits.
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b and bias is not None else None
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, targets.numel(), chunk):
            h, t = hidden[start : start + chunk], targets[start : start + chunk]
            real = min(max(rows - start, 0), t.numel())
            logits = F.linear(h, weight, bias).float()  # autocast, if on, picks the matmul dtype
            target_logits = logits.gather(1, t[:, None])
            top = logits.amax(dim=-1, keepdim=True)
            # In place: exp(logits - max) overwrites the logits, so no second vocabulary-wide tensor exists
            # (torch.logsumexp would allocate two) and softmax below reuses it.
            exps = logits.sub_(top).exp_()
            sums = exps.sum(dim=-1, keepdim=True)
            total += (sums.log() + top - target_logits)[:real].sum()  # logsumexp - target logit
            if not (need_h or need_w or need_b):
                continue
            probs = exps.div_(sums)  # d CE / d logits = softmax - one-hot, in place
            probs[torch.arange(real, device=t.device), t[:real]] -= 1
            probs[real:] = 0  # the rounding's rows: no gradient for the weight or the bias
            # One vocabulary-wide cast serves both products when h has the weight's dtype (full fine-tuning).
            cast = probs.to(weight.dtype) if grad_h is not None or grad_w is not None else probs
            if grad_h is not None:
                grad_h[start : start + chunk] = torch.mm(cast, weight).to(grad_h.dtype)
            if grad_w is not None:
                grad_w += torch.mm((cast if h.dtype == weight.dtype else probs.to(h.dtype)).t(), h).float()
            if grad_b is not None:
                grad_b += probs.sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_h, grad_w, grad_b = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        scale = lambda g, dtype=None: None if g is None else (g * grad_total).to(dtype or g.dtype)
        return scale(grad_h), scale(grad_w, weight_dtype), scale(grad_b, bias_dtype), None, None, None


def _chunk_ce(lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(lm_head(hidden).float(), targets, reduction="sum")


def target_cross_entropy(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    lm_head: nn.Module,
    chunk: int | None = None,
    row_multiple: int | None = None,
) -> torch.Tensor:
    """`chunk`: rows of logits at once (None: `logit_chunk` of the device). `row_multiple`: round the fused
    path's rows up to a multiple of this; None: CPU_HALF_ROW_MULTIPLE where the head's matmuls run in
    bf16/fp16 on CPU, else no rounding."""
    chunk = chunk or logit_chunk(hidden.device)
    keep = targets != IGNORE
    hidden, targets = hidden[keep], targets[keep]
    # The fused path reads the head's weight directly, so it is only taken for a plain Linear whose
    # weight is an ordinary tensor; a wrapped head (PEFT modules_to_save, FSDP's DTensor) goes through
    # its own forward, chunk by chunk, as autograd sees fit.
    plain = type(lm_head) is nn.Linear and type(lm_head.weight.data) is torch.Tensor
    if plain and torch.is_grad_enabled():
        rows = targets.numel()
        if row_multiple is None:
            row_multiple = _cpu_half_rounding(hidden.device, lm_head.weight)
        extra = -rows % row_multiple
        if extra:  # zero rows after the real ones (cat's backward hands hidden its own rows' gradient)
            hidden = torch.cat([hidden, hidden.new_zeros(extra, hidden.shape[-1])])
            targets = torch.cat([targets, targets.new_zeros(extra)])
        return _TargetCrossEntropy.apply(hidden, lm_head.weight, lm_head.bias, targets, chunk, rows)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), chunk):
        total = total + _chunk_ce(lm_head, hidden[start : start + chunk], targets[start : start + chunk])
    return total


def logit_chunk(device: torch.device) -> int:
    return CPU_LOGIT_CHUNK if device.type == "cpu" else LOGIT_CHUNK


def _cpu_half_rounding(device: torch.device, weight: Any) -> int:
    if device.type != "cpu":
        return 1
    autocast = torch.is_autocast_enabled("cpu")
    mm_dtype = torch.get_autocast_dtype("cpu") if autocast else weight.dtype
    return CPU_HALF_ROW_MULTIPLE if mm_dtype in (torch.bfloat16, torch.float16) else 1


def is_right_padded(attention_mask: torch.Tensor) -> bool:
    """Every row is ones then zeros (or all ones)."""
    return bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())


def _base(model: Any) -> Any:  # a PreTrainedModel or a PeftModel around one
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _decoder(model: Any) -> nn.Module:
    return _base(model).get_decoder()


def model_inputs(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    causal: bool = True,
) -> dict[str, Any]:
    """The keyword arguments the loss calls the model (or its decoder) with for a batch; `causal`: whether every
    attention of the model is (`is_causal`)."""
    if attention_mask is not None and position_ids is None and causal and is_right_padded(attention_mask):
        # Under causal attention a real token never sees the pads to its right, so the padding
        # mask changes only the pads' own outputs, which have no target. Without it attention
        # runs as plain causal (sdpa's is_causal kernels, which skip the upper triangle).
        attention_mask = None
    varlen: dict[str, Any] = {}
    packed = attention_mask is None and input_ids.shape[0] == 1
    if position_ids is not None and packed and model.config._attn_implementation == VARLEN_SDPA:
        # The row's example boundaries and longest example, as flash-attention's varlen kwargs, for
        # models.fast.varlen_sdpa (other attentions find them from position_ids themselves).
        bounds = cu_seq_lens(position_ids)
        varlen = {"cu_seq_lens_q": bounds, "max_length_q": int(bounds.diff().max())}
    return dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **varlen)


class CausalLMLoss(nn.Module):
    """Wraps a causal LM so one `forward` yields the summed target loss.

    Keeping the whole computation inside one module's forward lets DDP/FSDP (through Accelerate)
    wrap it as usual.
    """

    def __init__(self, model: nn.Module, logit_chunk: int | None = None) -> None:
        super().__init__()
        self.model: Any = model  # PreTrainedModel API (get_output_embeddings), not just nn.Module
        self.logit_chunk = logit_chunk  # None: the device's (`logit_chunk`)
        self.plain_head: bool | None = None
        """Whether the model's logits are its output embeddings of its decoder's output (`head_is_plain`):
        found at the first forward. Where they are not, the loss runs the model's own forward."""
        self.causal: bool | None = None  # `is_causal(model)`, found at the first forward

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.causal is None:
            self.causal = is_causal(self.model)
        inputs = model_inputs(self.model, input_ids, attention_mask, position_ids, causal=self.causal)
        if self.plain_head is None:
            self.plain_head = head_is_plain(self.model, input_ids)
        if not self.plain_head:
            return _model_head_loss(self.model, inputs, targets)
        hidden = _decoder(self.model)(**inputs, use_cache=False).last_hidden_state
        return target_cross_entropy(
            hidden, targets, self.model.get_output_embeddings(), chunk=self.logit_chunk
        )


def is_causal(model: Any) -> bool:
    """Whether every attention of the model is causal, so a right-padded batch needs no padding mask.

    Fix (test_loss.py): Gemma's `use_bidirectional_attention` makes attention see both ways, and with the mask
    dropped real tokens attended to the pads (a tiny Gemma 3's loss 0.19 off)."""
    if getattr(model.config, "use_bidirectional_attention", False):
        return False
    return all(getattr(m, "is_causal", True) is not False for m in model.modules())


@contextmanager
def _probing(model: Any) -> Iterator[None]:
    """A measuring forward: eval mode (no dropout, so two runs see one network), no gradient, eager (compiled
    layers would otherwise compile a variant for these few tokens); the mode restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.compiler.set_stance("force_eager"):
            yield
    finally:
        model.train(was_training)


def head_is_plain(model: Any, input_ids: torch.Tensor) -> bool:
    """Whether the model's logits are exactly its output embeddings applied to its decoder's last hidden state,
    measured on a few tokens (eval mode, no gradient).

    The fused loss computes those logits itself, so anything a model's CausalLM forward does after its LM head
    would be missing from the objective: Granite divides the logits by `logits_scaling`, Cohere multiplies them by
    `logit_scale`, Gemma 2 soft-caps them with tanh. Missing it, training fits logits the served model never
    produces (on a tiny Granite: a loss of 0.02 by tunewise's count where the model's own was still 4.4).
    Measuring covers every architecture, including ones written after this code."""
    ids = input_ids[:1, :8]
    with _probing(model):
        own = model(input_ids=ids, use_cache=False).logits.float()
        hidden = _decoder(model)(input_ids=ids, use_cache=False).last_hidden_state
        head = model.get_output_embeddings()(hidden).float()
    plain = own.shape == head.shape and torch.allclose(own, head, rtol=1e-4, atol=1e-5)
    if not plain:
        log.info(
            "%s changes its logits after the LM head (a scale or soft cap): the loss runs the model's own "
            "forward at target positions, correct but without tunewise's fused head (more memory, slower)",
            type(_base(model)).__name__,
        )
    return plain


def _model_head_loss(model: Any, inputs: dict[str, Any], targets: torch.Tensor) -> torch.Tensor:
    """The summed target cross-entropy from the model's own logits, computed only at positions with a target
    in some row (`logits_to_keep`), so a long prompt costs no vocabulary-wide logits."""
    positions = (targets != IGNORE).any(dim=0).nonzero().squeeze(1)
    logits = model(**inputs, use_cache=False, logits_to_keep=positions).logits
    return F.cross_entropy(
        logits.float().flatten(0, 1), targets[:, positions].flatten(), ignore_index=IGNORE, reduction="sum"
    )


PACKING_LEAK_TOLERANCE = 1e-4
"""How far a packed example's hidden states may move, as a share of their largest magnitude, when only the example
before it changes. Where a model keeps the examples apart they do not move at all: the two rows have one shape, so
the same kernels sum in the same order (measured bitwise equal in fp32 and bf16: Llama under eager, sdpa and
tunewise_varlen_sdpa, OPT and Mixtral and Qwen3-MoE under tunewise_varlen_sdpa). The smallest leaks measured, tiny
random Blooms in fp32 (hidden 16-64, 2 layers, 5 seeds each), move them by 2.6e-3 to 1.5e-2, their ALiBi reaching
into the example before through attention weights still at their initial scale: 1e-4 sits ~25x under the least of
them, and ~1000x above fp32 rounding should a kernel ever reorder a sum."""


def packing_leak(model: Any, length: int = 8) -> float:
    """How much the hidden states of a packed row's second example move when only the first example's tokens change,
    as a share of their largest magnitude, measured on two rows of `length`-token examples (eval mode, no gradient).
    0 where the model keeps packed examples apart.

    The rows are `collate_packed`'s and the decoder gets them as the loss gives them (`model_inputs`; a model whose
    head is not plain runs that decoder inside its own forward), so the probe sees what training would. Measuring
    covers every architecture: Bloom and MPT never give the position ids to transformers' mask builder, so a packed
    row is causal across its examples there (ALiBi reaches them, whatever the attention implementation), and so is
    OPT's under eager."""
    embeddings = model.get_input_embeddings().weight
    generator = torch.Generator().manual_seed(0)
    firsts = [torch.randint(embeddings.shape[0], (length,), generator=generator).tolist() for _ in range(2)]
    second = torch.randint(embeddings.shape[0], (length,), generator=generator).tolist()
    outputs = []
    with _probing(model):
        for first in firsts:
            row = collate_packed([{"input_ids": ids, "labels": ids} for ids in (first, second)])
            ids, positions = row["input_ids"].to(embeddings.device), row["position_ids"].to(embeddings.device)
            hidden = _decoder(model)(**model_inputs(model, ids, position_ids=positions), use_cache=False)
            outputs.append(hidden.last_hidden_state[0, length:].float())
    moved, scale = (outputs[0] - outputs[1]).abs().max(), outputs[0].abs().max()
    return float(moved / scale) if scale > 0 else float(moved)


def packing_problem(model: Any) -> str | None:
    """Why `data.packing` would train this model on an objective it never computes unpacked, or None: its packed
    examples attend to each other (`packing_leak` above PACKING_LEAK_TOLERANCE)."""
    base = _base(model)
    attention = base.config._attn_implementation
    if attention.startswith("flash_attention") and model.get_input_embeddings().weight.device.type != "cuda":
        # Its kernels run on a GPU only, and the model gets there when training starts: nothing to measure here.
        return None
    leak = packing_leak(model)
    if leak <= PACKING_LEAK_TOLERANCE:
        return None
    advice = "set data.packing: false"
    if (
        attention != VARLEN_SDPA
        and getattr(base, "_supports_sdpa", False)
        and _apart_under(model, VARLEN_SDPA)
    ):
        advice += " or model.attn_implementation: sdpa (with packing, tunewise_varlen_sdpa keeps them apart)"
    shown = "sdpa (with packing, tunewise_varlen_sdpa)" if attention == VARLEN_SDPA else attention
    return (
        f"{type(base).__name__} lets packed examples attend to each other under attn_implementation {shown}: "
        f"changing one example moved the next one's hidden states by {leak:.1e} of their scale (measured), so "
        f"training would fit an objective the model never computes on each example alone; {advice}"
    )


def _apart_under(model: Any, attention: str) -> bool:
    """Whether the model keeps packed examples apart under another attention implementation (restored after)."""
    base = _base(model)
    before = base.config._attn_implementation
    base.set_attn_implementation(attention)
    try:
        return base.config._attn_implementation == attention and packing_leak(model) <= PACKING_LEAK_TOLERANCE
    finally:
        base.set_attn_implementation(before)
