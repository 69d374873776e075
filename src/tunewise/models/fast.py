"""Speed paths for training, each through a public extension point of torch, PEFT or transformers.

- `LoraDropout`: PEFT's LoRA dropout with a cheaper mask on CPU, where `nn.Dropout` draws one
  Bernoulli sample per element (aten::bernoulli_), which was 23% of a LoRA step on SmolLM2 with
  `lora_dropout: 0.05` (docs/performance.md). Here one 64-bit draw makes four 16-bit uniforms,
  each compared with an integer threshold: about 5x cheaper (2.36 s -> 0.46 s of a profiled step), and the drop probability is the configured
  one rounded to a multiple of 1/65536 (0.05 -> 0.0500031), with the kept values scaled by
  1 / (1 - that probability) so the expectation is exact. The module replaces the `nn.Dropout`
  in PEFT's `lora_dropout` ModuleDicts: the module tree, state dict and saved adapter are unchanged.
- `MergedLoraLinear`: PEFT's LoRA `Linear`, registered through `LoraConfig._register_custom_module`, whose
  training forward without LoRA dropout computes x (W + s B A)^T: one matmul instead of the base matmul,
  two thin rank-r matmuls and an add; B A costs one small matmul per call (r is tiny next to W's sides).
  Backward computes dx = dy W + (s dy B) A, the thin s dy B serving dA too, so nothing weight-sized is
  kept from forward, and the rank-r products for the adapter's own gradients. Any other case (dropout,
  several adapters, DoRA, a LoRA bias, bf16 or fp16, mixed dtypes or autocast, no gradient) is PEFT's
  forward, unchanged; so are the module tree, state dict and adapter files. Measured on CPU: +14-23%
  tokens/s in a compiled packed step (docs/performance.md).
- `varlen_sdpa`: attention for packed rows, registered with transformers' AttentionInterface.
  Given `cu_seq_lens_q` (as flash-attention's varlen path takes it) it runs causal attention within
  each example, so attention costs sum(L_i^2), not (sum L_i)^2 under a block-diagonal mask; without
  it, it is transformers' sdpa unchanged. On CUDA (fp16/bf16, Ampere or newer) that is torch's own
  flash-attention varlen kernel, one launch for the whole row (`flash_varlen`). On CPU (no attention
  dropout) it is a `torch.library` custom op with its own backward op, opaque to torch.compile, so a
  compiled layer stays one graph (+5% a step against a graph break at every attention call); inside, tunewise's
  own kernel (models/kernels.py: 2.0-3.4x torch's CPU flash attention in bf16, 1.2-2.3x in fp32), or where it
  cannot be built, torch's flash kernel on each example's slice. Elsewhere (fp32 on a GPU, attention dropout on
  CPU): sdpa on each example's slice.
- `compile_layers`: `torch.compile` of each repeated decoder layer, in place (the module tree and
  state-dict keys stay as they are, unlike wrapping), with dynamic shapes so varying sequence
  lengths do not recompile. On CPU with an activation memory budget below 1 (AOTAutograd's knob):
  the partitioner recomputes cheap elementwise results in backward instead of keeping them, 0.3-0.4 GiB
  less peak RSS at the same speed on SmolLM2 (docs/performance.md).
"""

from __future__ import annotations

import functools
import itertools
import math
import shutil
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from tunewise.models.kernels import bf16_kernel_runs, cpu_attention_ops, cpu_has_bf16_matmuls

_LEVELS = 1 << 16  # uniforms per 16-bit draw


class LoraDropout(nn.Dropout):
    """`nn.Dropout(p)` whose mask comes from 16-bit uniforms (see the module doc)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dropped = round(self.p * _LEVELS)
        if x.device.type != "cpu" or not self.training or dropped in (0, _LEVELS) or self.inplace:
            # GPUs have a fused dropout kernel (Philox) already; a p too close to 0 or 1 for 16 bits, or an
            # in-place dropout, keeps torch's exact sampler.
            return super().forward(x)
        # Full-range int64 (random_() alone would leave each top bit 0); randint, not random_, so
        # torch.compile traces it instead of breaking the graph at every dropout.
        words = torch.randint(-(2**63), 2**63 - 1, (math.ceil(x.numel() / 4),), device=x.device)
        uniforms = words.view(torch.int16)[: x.numel()].view(x.shape)
        drop = uniforms < dropped - _LEVELS // 2
        return x.masked_fill(drop, 0.0).mul_(_LEVELS / (_LEVELS - dropped))


def use_fast_lora_dropout(model: nn.Module) -> int:
    """Swap every LoRA `nn.Dropout` of a PEFT model for `LoraDropout`; returns how many."""
    swapped = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, nn.ModuleDict):
            continue
        for name, dropout in dropouts.items():
            if type(dropout) is nn.Dropout:
                dropouts[name] = LoraDropout(dropout.p)
                swapped += 1
    return swapped


class _MergedLora(torch.autograd.Function):
    """y = x (W + s B A)^T + bias, with gradients for x, A and B (W and the bias are frozen)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scaling: float,
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight, lora_a, lora_b)
        ctx.scaling = scaling
        return F.linear(x, torch.addmm(weight, lora_b, lora_a, alpha=scaling), bias)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, lora_a, lora_b = ctx.saved_tensors
        scaling = ctx.scaling
        rows = x.reshape(-1, x.shape[-1])
        grad_rows = grad_out.reshape(-1, grad_out.shape[-1])
        grad_h = (grad_rows @ lora_b).mul_(scaling)  # s dy B: thin (tokens x r), for dA and dx
        grad_x = None
        if ctx.needs_input_grad[0]:
            # dy W + (s dy B) A, not dy (W + s B A): under torch.compile the forward's W + s B A would
            # otherwise be saved for backward, a copy of every adapted weight held through the step.
            grad_x = torch.addmm(grad_rows @ weight, grad_h, lora_a).view(x.shape)
        # The rank-r products, scaled while they are thin: dA = s (dy B)^T x, dB = s dy^T (x A^T).
        grad_a = grad_h.t() @ rows
        grad_b = grad_rows.t() @ (rows @ lora_a.t()).mul_(scaling)
        return grad_x, None, None, grad_a, grad_b, None


class MergedLoraLinear(PeftLoraLinear):
    """PEFT's LoRA `Linear` with the merged-weight training forward (see the module doc)."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter = self._merged_forward_adapter(x, args, kwargs)
        if adapter is None:
            return super().forward(x, *args, **kwargs)
        base = self.get_base_layer()
        return _MergedLora.apply(
            x,
            base.weight,
            base.bias,
            self.lora_A[adapter].weight,
            self.lora_B[adapter].weight,
            float(self.scaling[adapter]),
        )

    def _merged_forward_adapter(self, x: torch.Tensor, args: tuple, kwargs: dict) -> str | None:
        """The one active adapter when the merged forward computes what PEFT's would, else None."""
        if args or kwargs or self.disable_adapters or self.merged or len(self.active_adapters) != 1:
            return None
        adapter = self.active_adapters[0]
        if adapter not in self.lora_A or adapter in self.lora_variant:
            return None
        base = self.get_base_layer()
        lora_a, lora_b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        frozen_base = not base.weight.requires_grad and (base.bias is None or not base.bias.requires_grad)
        plain = (
            type(base) is nn.Linear
            and not self.fan_in_fan_out
            and isinstance(self.lora_dropout[adapter], nn.Identity)
            and self.lora_B[adapter].bias is None
        )
        # Full precision only: in bf16 or fp16, W + s B A would round the adapter's small share of each weight
        # away (PEFT's own merge has the same limit); autocast would run the matmuls in half precision.
        exact = x.dtype in (torch.float32, torch.float64) and not torch.is_autocast_enabled(x.device.type)
        same_dtype = x.dtype == base.weight.dtype == lora_a.dtype == lora_b.dtype
        training = torch.is_grad_enabled() and lora_a.requires_grad
        return adapter if plain and frozen_base and exact and same_dtype and training else None


VARLEN_SDPA = "tunewise_varlen_sdpa"


def varlen_sdpa(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Causal sdpa within each packed example of a one-row batch; plain sdpa otherwise."""
    per_example = (
        cu_seq_lens_q is not None
        and query.shape[0] == 1
        and getattr(module, "is_causal", True)
        and not _window_binds(module, cu_seq_lens_q, kwargs)
        # A position bias lives in the mask sdpa would get: keep that path. sdpa refuses a soft cap or attention
        # sinks loudly (transformers' sdpa_attention_forward), where the kernels below would drop them silently.
        and kwargs.get("position_bias") is None
        and kwargs.get("softcap") is None
        and kwargs.get("s_aux") is None
    )
    if not per_example:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    assert cu_seq_lens_q is not None
    if torch.is_autocast_enabled(query.device.type):
        # Fix (test_fast.py): rotary embeddings run in fp32 under autocast, so fp32 weights (full fine-tuning)
        # send q and k in fp32 and v in bf16. sdpa is an autocast op and casts all three; the kernels below are
        # not, and refused the mix ("mixed dtypes"), or on CUDA fell back from flash attention to sdpa per example.
        dtype = torch.get_autocast_dtype(query.device.type)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    if flash_varlen_problem(query) is None:
        longest = kwargs.get("max_length_q") or int(cu_seq_lens_q.diff().max())
        return flash_varlen(query, key, value, cu_seq_lens_q, longest, dropout, scaling), None
    if query.device.type == "cpu" and not (module.training and dropout):
        # One opaque op: torch.compile keeps the whole layer in one graph around it.
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        # Contiguous inputs and outputs: inductor may lay out its buffers otherwise than eager, and a
        # custom op's fake must predict the real strides (empty_like on permuted inputs failed there).
        q, k, v = query.contiguous(), key.contiguous(), value.contiguous()
        out = _cpu_varlen_attention(q, k, v, cu_seq_lens_q, scale)[0]
        return out.transpose(1, 2).contiguous(), None
    return per_example_sdpa(module, query, key, value, cu_seq_lens_q.tolist(), dropout, scaling), None


def _window_binds(module: nn.Module, cu_seq_lens_q: torch.Tensor, kwargs: dict[str, Any]) -> bool:
    """Whether a sliding window shortens attention within some example: then the windowed block-diagonal mask
    transformers builds from the position ids is needed, which plain sdpa takes and the per-example kernels do not.

    Fix (test_fast.py): Mistral, Mixtral, Phi-3 and Starcoder2 pass their window as an argument, not as the
    module attribute Qwen 2 and Gemma keep, and packed rows trained them with full causal attention (gradients
    22-28% off on a tiny Mistral with a window of 4). A window no shorter than the longest example never binds
    (Mistral-7B-v0.1's 4,096 at max_seq_length 4,096): the kernels stay."""
    window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
    if window is None:
        return False
    longest = kwargs.get("max_length_q") or int(cu_seq_lens_q.diff().max())
    return window < longest


def flash_varlen_problem(query: torch.Tensor) -> str | None:
    """Why flash attention's varlen kernel cannot take this query, or None."""
    if query.device.type != "cuda":
        return "not on CUDA"
    if query.dtype not in (torch.float16, torch.bfloat16):
        return f"{query.dtype} (flash attention takes fp16 or bf16)"
    if query.shape[-1] % 8 or query.shape[-1] > 256:
        return f"head_dim {query.shape[-1]} (flash attention takes multiples of 8 up to 256)"
    if torch.cuda.get_device_capability(query.device) < (8, 0):
        return "GPU older than Ampere (sm_80)"
    if not torch.backends.cuda.flash_sdp_enabled():
        return "flash attention is disabled (torch.backends.cuda.enable_flash_sdp)"
    return None


def flash_varlen(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    bounds: torch.Tensor,
    longest: int,
    dropout: float,
    scaling: float | None,
) -> torch.Tensor:
    """Causal flash attention within each [a, b) slice of a one-row batch, in one kernel launch.

    torch's own varlen kernel (the one `torch.nn.attention.varlen` wraps), called through its aten
    op, which has autograd and a meta function, so it runs inside compiled graphs. Grouped-query
    attention needs no repeated keys: the kernel takes fewer key/value heads as they are.
    In: (1, heads, length, dim); out: (1, length, heads, dim), as transformers' attention returns it.
    """
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (length, heads, dim) views
    out = torch.ops.aten._flash_attention_forward(
        q, k, v, bounds, bounds, longest, longest, dropout, True, False, scale=scaling
    )[0]
    return out[None]


def per_example_sdpa(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    bounds: list[int],
    dropout: float,
    scaling: float | None,
) -> torch.Tensor:
    """transformers' sdpa on each [a, b) slice, unmasked (causal): GPUs without flash attention, CPU attention dropout."""
    parts = [
        sdpa_attention_forward(
            module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None, dropout, scaling
        )[0]
        for a, b in itertools.pairwise(bounds)
    ]
    return torch.cat(parts, dim=1)


# The longest example tunewise's CPU kernel takes: its backward keeps two length x length squares per thread
# (32 MB in fp32 at 2,048 tokens). Longer ones go to torch's flash kernel, whose memory grows linearly.
CPU_KERNEL_MAX_LENGTH = 2048


def cpu_kernel_for(query: torch.Tensor, bounds: list[int]) -> Any | None:
    """tunewise's CPU attention ops (models/kernels.py) where they take this call, else None: torch's flash kernel."""
    if query.dtype not in (torch.float32, torch.bfloat16) or query.shape[-1] % 2:
        return None
    if query.dtype == torch.bfloat16 and not (cpu_has_bf16_matmuls() and bf16_kernel_runs()):
        return None
    if max(b - a for a, b in itertools.pairwise(bounds)) > CPU_KERNEL_MAX_LENGTH:
        return None
    return cpu_attention_ops()


@torch.library.custom_op("tunewise::cpu_varlen_attention", mutates_args=())
def _cpu_varlen_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bounds: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention on each [a, b) slice of the sequence axis; returns (output, fp32 logsumexp)."""
    cut = bounds.tolist()
    kernel = cpu_kernel_for(query, cut)
    if kernel is not None:
        out, lse = kernel.varlen_forward(query, key, value, cut, scale)
        return out.transpose(1, 2), lse
    parts = [
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], 0.0, True, attn_mask=None, scale=scale
        )
        for a, b in itertools.pairwise(cut)
    ]
    # Fixed layouts, as the fake below declares them: the output in (batch, length, heads, dim) memory, which
    # is what the caller transposes to, and a contiguous logsumexp.
    out = torch.cat([o.transpose(1, 2) for o, _ in parts], 1).contiguous().transpose(1, 2)
    return out, torch.cat([lse for _, lse in parts], 2).contiguous()


@_cpu_varlen_attention.register_fake
def _(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bounds: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, heads, length, dim = query.shape
    lse = query.new_empty(query.shape[:3], dtype=torch.float32)
    return query.new_empty(batch, length, heads, dim).transpose(1, 2), lse


def _save_for_varlen_backward(ctx: Any, inputs: tuple, output: tuple) -> None:
    query, key, value, bounds, scale = inputs
    ctx.save_for_backward(query, key, value, *output, bounds)
    ctx.scale = scale


def _varlen_backward(ctx: Any, grad_out: torch.Tensor, grad_lse: torch.Tensor) -> tuple:
    dq, dk, dv = _cpu_varlen_attention_backward(grad_out, *ctx.saved_tensors, ctx.scale)
    return dq, dk, dv, None, None


# The backward is an op of its own too, so compiled backward graphs treat it as opaque (bounds.tolist()
# inside a traced function would break the graph).
@torch.library.custom_op("tunewise::cpu_varlen_attention_backward", mutates_args=())
def _cpu_varlen_attention_backward(
    grad_out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    bounds: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    cut = bounds.tolist()
    kernel = cpu_kernel_for(query, cut)
    if kernel is not None:
        grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
        dq, dk, dv = kernel.varlen_backward(grad_out, query, key, value, out, lse, cut, scale)
        return dq, dk, dv
    dtype = query.dtype
    if dtype != torch.float32:
        # CPU flash attention's bf16 backward costs 1.2-4.6x its fp32 one on rows of 50-400 tokens, casts
        # included (AMX Xeon, 9 query / 3 key-value heads of 64; Zen 4, casts not included: 1.1-3.8x below 384
        # tokens, 0.86-0.98x at 384-512); the forward stays in bf16: 1.6-2.5x faster on the Xeon, 4-24% slower
        # on the Zen 4, where casting it to fp32 and back measured the same as bf16.
        grad_out, query, key, value, out = (t.float() for t in (grad_out, query, key, value, out))
    grads = [
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out[:, :, a:b].contiguous(),
            query[:, :, a:b],
            key[:, :, a:b],
            value[:, :, a:b],
            out[:, :, a:b],
            lse[:, :, a:b],
            0.0,
            True,
            attn_mask=None,
            scale=scale,
        )
        for a, b in itertools.pairwise(cut)
    ]
    dq, dk, dv = (torch.cat([g[i] for g in grads], 2).to(dtype).contiguous() for i in range(3))
    return dq, dk, dv


@_cpu_varlen_attention_backward.register_fake
def _(
    grad_out: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *_: object
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape)


_cpu_varlen_attention.register_autograd(_varlen_backward, setup_context=_save_for_varlen_backward)

AttentionInterface.register(VARLEN_SDPA, varlen_sdpa)
# Masks as sdpa builds them, for the calls that fall through to plain sdpa (padded batches).
AttentionMaskInterface.register(VARLEN_SDPA, sdpa_mask)


def cu_seq_lens(position_ids: torch.Tensor) -> torch.Tensor:
    """Example boundaries of a packed row (positions restart at 0 for each example): [0, l1, l1+l2, ...]."""
    starts = (position_ids[0] == 0).nonzero().flatten()
    end = torch.tensor([position_ids.shape[1]], device=position_ids.device)
    return torch.cat([starts, end]).to(torch.int32)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a model: the largest ModuleList whose children share one class."""
    best: list[nn.Module] = []
    for module in model.modules():
        if not isinstance(module, nn.ModuleList) or len({type(c) for c in module}) != 1:
            continue
        if len(module) > len(best):
            best = list(module)
    return best


def compile_problem(device_type: str) -> str | None:
    """Why torch.compile cannot run here, or None. Inductor builds C++ kernels on CPU."""
    if device_type == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        return (
            "torch.compile on CPU builds C++ kernels and no C++ compiler (g++, c++, clang++) is on PATH: "
            "install one (Debian/Ubuntu: apt install g++) or set training.torch_compile: false"
        )
    return None


CPU_ACTIVATION_MEMORY_BUDGET = 0.8
"""AOTAutograd's `activation_memory_budget` for layers compiled on CPU. On SmolLM2 with LoRA (2026-12-06,
AMX Xeon), 0.7-0.9 kept a compiled step's speed (bf16, micro-batches of 4: 691-730 tokens/s against
693-710 at torch's default of 1.0) for 0.3-0.4 GiB less peak RSS (2.12-2.17 against 2.46-2.58 GiB); 0.6
and 0.5 ran 5-10% slower. fp32, micro-batches of 2: 337 and 349 against 339 and 351 tokens/s, 2.07-2.09
against 2.43 GiB."""


def compile_layers(model: nn.Module, activation_memory_budget: float | None = None) -> int:
    """Compile each decoder layer in place; one compiled graph serves all of them. Returns how many.

    `activation_memory_budget`: the share of the activations AOTAutograd's default partition keeps for
    backward that may be kept (None: torch's default, 1.0); below it, the partitioner recomputes the
    cheapest results in backward instead.
    """
    backend: Any = "inductor"
    if activation_memory_budget is not None:
        backend = functools.partial(_inductor_with_budget, activation_memory_budget)  # one for all layers
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(dynamic=True, backend=backend)
    return len(layers)


def _inductor_with_budget(budget: float, graph: Any, example_inputs: Any) -> Any:
    """Inductor, with the budget set while AOTAutograd partitions this graph (not process-wide)."""
    from torch._inductor.compile_fx import compile_fx

    with torch._functorch.config.patch(activation_memory_budget=budget):
        return compile_fx(graph, example_inputs)
