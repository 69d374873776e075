"""The speed paths of models/fast.py give the computation they replace."""

from __future__ import annotations

import itertools

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from torch import nn

from tunewise.models import fast
from tunewise.models.adapters import LoraSettings, apply_method, lora_config
from tunewise.models.fast import (
    CPU_ACTIVATION_MEMORY_BUDGET,
    LoraDropout,
    MergedLoraLinear,
    compile_layers,
    decoder_layers,
    use_fast_lora_dropout,
)
from tunewise.testing import build_tiny_model, relative_error
from tunewise.training.loss import CausalLMLoss

N = 1_000_000


def test_lora_dropout_drops_p_of_the_values_and_keeps_the_expectation() -> None:
    torch.manual_seed(0)
    dropout = LoraDropout(0.1).train()
    out = dropout(torch.ones(N))
    dropped = (out == 0).float().mean().item()
    # Binomial standard deviation sqrt(p(1-p)/N) = 3e-4: 5 sigma.
    assert abs(dropped - 0.1) < 1.5e-3
    p_eff = round(0.1 * 65536) / 65536
    kept = out[out != 0]
    assert torch.allclose(kept, torch.full_like(kept, 1 / (1 - p_eff)))
    assert abs(out.mean().item() - 1.0) < 2e-3


def test_lora_dropout_is_identity_in_eval_and_reproducible_from_the_seed() -> None:
    x = torch.randn(64, 32)
    dropout = LoraDropout(0.3)
    assert torch.equal(dropout.eval()(x), x)
    dropout.train()
    torch.manual_seed(5)
    a = dropout(x)
    state = torch.get_rng_state()
    b = dropout(x)
    torch.set_rng_state(state)  # what a resumed run does
    assert torch.equal(dropout(x), b)
    assert not torch.equal(a, b)


def test_lora_dropout_masks_are_independent_across_the_four_values_of_a_draw() -> None:
    # One int64 feeds four elements; correlated lanes would show as a biased neighbour count.
    torch.manual_seed(1)
    drop = LoraDropout(0.5).train()(torch.ones(N)) == 0
    lanes = drop.view(-1, 4).float()
    for i in range(4):
        assert abs(lanes[:, i].mean().item() - 0.5) < 3e-3
    both = (lanes[:, 0] * lanes[:, 3]).mean().item()
    assert abs(both - 0.25) < 3e-3


def test_lora_dropout_gradient_is_the_mask_times_the_scale() -> None:
    torch.manual_seed(2)
    x = torch.randn(1000, 16, requires_grad=True)
    out = LoraDropout(0.2).train()(x)
    out.sum().backward()
    assert x.grad is not None
    scale = 65536 / (65536 - round(0.2 * 65536))
    expected = (out != 0).float() * scale
    assert torch.allclose(x.grad, expected)


def test_tiny_or_in_place_dropout_keeps_torchs_sampler() -> None:
    x = torch.ones(1000)
    torch.manual_seed(3)
    ours = LoraDropout(1e-6).train()(x)
    torch.manual_seed(3)
    assert torch.equal(ours, nn.functional.dropout(x, 1e-6, training=True))


def lora_model(dropout: float) -> nn.Module:
    model = build_tiny_model(64, seed=0)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear")
    return get_peft_model(model, config)


def test_swap_replaces_each_lora_dropout_and_leaves_the_state_dict_alone() -> None:
    model = lora_model(0.05)
    keys = list(model.state_dict())
    lora_layers = [m for m in model.modules() if hasattr(m, "lora_A")]
    assert use_fast_lora_dropout(model) == len(lora_layers) == 2 * 7
    assert list(model.state_dict()) == keys
    swapped = [m.lora_dropout["default"] for m in lora_layers]
    assert all(type(d) is LoraDropout and d.p == 0.05 for d in swapped)
    assert use_fast_lora_dropout(lora_model(0.0)) == 0  # PEFT uses nn.Identity for 0


def test_compile_problem_names_the_missing_compiler(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fast.shutil, "which", lambda name: None)
    problem = fast.compile_problem("cpu")
    assert problem is not None and "g++" in problem and "torch_compile: false" in problem
    assert fast.compile_problem("cuda") is None


def test_decoder_layers_finds_the_repeated_blocks() -> None:
    model = build_tiny_model(64, num_hidden_layers=3)
    assert decoder_layers(model) == list(model.model.layers)


def packed_loss_and_grads(model: nn.Module) -> tuple[float, torch.Tensor]:
    torch.manual_seed(7)
    ids = torch.randint(3, 64, (1, 40))
    positions = torch.cat([torch.arange(n) for n in (9, 17, 14)]).unsqueeze(0)
    loss = CausalLMLoss(model)(input_ids=ids, targets=ids, position_ids=positions)
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return loss.item(), grads


def test_compiled_layers_give_the_eager_loss_and_gradients() -> None:
    eager = packed_loss_and_grads(build_tiny_model(64, seed=0, attn_implementation=fast.VARLEN_SDPA))
    model = build_tiny_model(64, seed=0, attn_implementation=fast.VARLEN_SDPA)
    keys = list(model.state_dict())
    assert compile_layers(model) == 2
    compiled = packed_loss_and_grads(model)
    assert list(model.state_dict()) == keys  # compiled in place: checkpoints keep their names
    assert abs(compiled[0] - eager[0]) < 1e-4 * abs(eager[0])
    assert (compiled[1] - eager[1]).abs().max().item() < 1e-4


def heads_view(length: int, heads: int) -> torch.Tensor:
    """(1, heads, length, 8) as the model passes it: a transposed view of (1, length, heads, 8)."""
    return torch.randn(1, length, heads, 8).transpose(1, 2)


def per_example_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: list[int]) -> list:
    return [
        nn.functional.scaled_dot_product_attention(
            q[:, :, a:b], k[:, :, a:b].repeat_interleave(2, 1), v[:, :, a:b].repeat_interleave(2, 1),
            is_causal=True, scale=0.5,
        ).transpose(1, 2)
        for a, b in itertools.pairwise(bounds)
    ]  # fmt: skip


@pytest.mark.parametrize(
    "path", ["custom op (CPU)", "custom op (CPU, torch flash)", "per-example sdpa (GPU, attention dropout)"]
)
def test_varlen_sdpa_attends_within_each_example_and_ignores_the_block_mask(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if "torch flash" in path:
        monkeypatch.setattr(fast, "cpu_kernel_for", lambda query, bounds: None)
    torch.manual_seed(8)
    module = nn.Module()
    module.num_key_value_groups, module.is_causal = 2, True
    q, k, v = heads_view(30, 4), heads_view(30, 2), heads_view(30, 2)
    bounds = [0, 7, 19, 30]
    if path.startswith("custom"):
        # A mask that allows nothing: were it used, the output would be NaN.
        blocked = torch.zeros(1, 1, 30, 30, dtype=torch.bool)
        cu = torch.tensor(bounds, dtype=torch.int32)
        out, _ = fast.varlen_sdpa(module, q, k, v, blocked, scaling=0.5, cu_seq_lens_q=cu)
    else:
        out = fast.per_example_sdpa(module, q, k, v, bounds, 0.0, 0.5)
    for (a, b), ref in zip(itertools.pairwise(bounds), per_example_reference(q, k, v, bounds), strict=True):
        assert torch.allclose(out[:, a:b], ref, atol=1e-6)


@pytest.mark.parametrize("kernel", ["tunewise", "torch flash"])
def test_varlen_sdpa_under_autocast_takes_fp32_queries_with_bf16_values(
    kernel: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fp32 weights under bf16 autocast (full fine-tuning): rotary embeddings hand q and k over in fp32, v in bf16."""
    if kernel == "torch flash":
        monkeypatch.setattr(fast, "cpu_kernel_for", lambda query, bounds: None)
    torch.manual_seed(9)
    module = nn.Module()
    module.num_key_value_groups, module.is_causal = 2, True
    q, k, v = heads_view(30, 4), heads_view(30, 2), heads_view(30, 2).bfloat16()
    bounds = [0, 7, 19, 30]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = fast.varlen_sdpa(module, q, k, v, None, scaling=0.5, cu_seq_lens_q=torch.tensor(bounds))
    assert out.dtype == torch.bfloat16
    lowp = [t.bfloat16().float() for t in (q, k, v)]  # what autocast rounds each input to
    for (a, b), ref in zip(itertools.pairwise(bounds), per_example_reference(*lowp, bounds), strict=True):
        assert torch.allclose(out[:, a:b].float(), ref, atol=2e-2)


@pytest.mark.parametrize("kernel", ["tunewise", "torch flash"])
def test_cpu_varlen_ops_pass_torch_library_opcheck(kernel: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Fake (meta) kernels, autograd registration and schema agree with the real kernels: what
    # torch.compile relies on to keep a layer in one graph around them.
    if kernel == "torch flash":
        monkeypatch.setattr(fast, "cpu_kernel_for", lambda query, bounds: None)
    torch.manual_seed(9)
    q, k, v = (torch.randn(1, h, 30, 8) for h in (4, 2, 2))  # contiguous, as varlen_sdpa passes them
    bounds = torch.tensor([0, 11, 30], dtype=torch.int32)
    torch.library.opcheck(fast._cpu_varlen_attention, (q.requires_grad_(), k, v, bounds, 0.35))
    out, lse = fast._cpu_varlen_attention(q.detach(), k, v, bounds, 0.35)
    args = (torch.randn_like(out), q.detach(), k, v, out, lse, bounds, 0.35)
    torch.library.opcheck(fast._cpu_varlen_attention_backward, args)


@pytest.fixture
def torch_flash_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU custom ops on torch's flash kernel, as where tunewise's own kernel cannot be built."""
    monkeypatch.setattr(fast, "cpu_kernel_for", lambda query, bounds: None)


@pytest.mark.usefixtures("torch_flash_kernel")
def test_cpu_varlen_attention_on_torch_flash_in_bf16_computes_its_backward_in_fp32() -> None:
    # The bf16 forward, then the gradients from an fp32 backward (faster on CPU) cast back to bf16.
    torch.manual_seed(11)
    bounds = [0, 40, 41, 120]  # a one-token example too
    q, k, v = (torch.randn(1, h, 120, 16, dtype=torch.float64) for h in (4, 2, 2))
    grad = torch.randn(1, 4, 120, 16, dtype=torch.float64)
    low = [t.bfloat16().requires_grad_() for t in (q, k, v)]
    full = [t.requires_grad_() for t in (q, k, v)]
    out = fast._cpu_varlen_attention(*low, torch.tensor(bounds, dtype=torch.int32), 0.25)[0]
    ref = torch.cat(
        [
            nn.functional.scaled_dot_product_attention(
                full[0][:, :, a:b], full[1][:, :, a:b].repeat_interleave(2, 1),
                full[2][:, :, a:b].repeat_interleave(2, 1), is_causal=True, scale=0.25,
            )
            for a, b in itertools.pairwise(bounds)
        ],
        dim=2,
    )  # fmt: skip
    assert out.dtype == torch.bfloat16 and relative_error(out, ref) < 1e-2
    out.backward(grad.bfloat16())
    ref.backward(grad)
    for lowp, high in zip(low, full, strict=True):
        assert lowp.grad is not None and lowp.grad.dtype == torch.bfloat16
        # bf16 inputs and output gradient (2^-9 rounding each), fp32 arithmetic: well under 1%.
        assert relative_error(lowp.grad, high.grad) < 1e-2
    # Bit for bit the fp32 kernel's gradients of the upcast tensors, rounded to bf16.
    out, lse = fast._cpu_varlen_attention(
        *(t.detach() for t in low), torch.tensor(bounds, dtype=torch.int32), 0.25
    )
    args = [grad.bfloat16(), *(t.detach() for t in low), out]
    cut = torch.tensor(bounds, dtype=torch.int32)
    mixed = fast._cpu_varlen_attention_backward(*args, lse, cut, 0.25)
    upcast = fast._cpu_varlen_attention_backward(*(t.float() for t in args), lse, cut, 0.25)
    for m, u in zip(mixed, upcast, strict=True):
        assert m.dtype == torch.bfloat16 and torch.equal(m, u.bfloat16())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flash_varlen_matches_per_example_attention_and_its_gradients(dtype: torch.dtype) -> None:
    torch.manual_seed(10)
    module = nn.Module()
    module.num_key_value_groups, module.is_causal = 4, True
    bounds = [0, 300, 1100, 1101, 2048]  # a one-token example too
    # (1, heads, length, 64) views of (1, length, heads, 64), grouped-query (32 query, 8 key/value heads).
    q, k, v = (torch.randn(1, 2048, h, 64, device="cuda").transpose(1, 2) for h in (32, 8, 8))
    lowp = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    full = [t.detach().float().requires_grad_() for t in lowp]
    assert fast.flash_varlen_problem(lowp[0]) is None
    blocked = torch.zeros(1, 1, 2048, 2048, dtype=torch.bool, device="cuda")  # were it used: NaN
    cu = torch.tensor(bounds, dtype=torch.int32, device="cuda")
    out, _ = fast.varlen_sdpa(module, *lowp, blocked, scaling=0.125, cu_seq_lens_q=cu)
    ref = torch.cat(
        [
            nn.functional.scaled_dot_product_attention(
                full[0][:, :, a:b], full[1][:, :, a:b].repeat_interleave(4, 1),
                full[2][:, :, a:b].repeat_interleave(4, 1), is_causal=True, scale=0.125,
            ).transpose(1, 2)
            for a, b in itertools.pairwise(bounds)
        ],
        dim=1,
    )  # fmt: skip
    assert out.shape == ref.shape == (1, 2048, 32, 64)
    assert relative_error(out, ref) < 1e-2
    grad = torch.randn_like(ref)
    out.backward(grad.to(dtype))
    ref.backward(grad)
    for low, high in zip(lowp, full, strict=True):
        assert relative_error(low.grad, high.grad) < 2e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flash_varlen_problem_says_why_not() -> None:
    assert "fp16 or bf16" in str(fast.flash_varlen_problem(torch.zeros(1, 2, 4, 8, device="cuda")))
    assert "head_dim" in str(fast.flash_varlen_problem(torch.zeros(1, 2, 4, 12, device="cuda").half()))


def test_cpu_queries_never_take_the_flash_varlen_path() -> None:
    assert fast.flash_varlen_problem(torch.zeros(1, 2, 4, 8, dtype=torch.bfloat16)) == "not on CUDA"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_bf16_layers_on_cuda_give_the_eager_loss_and_gradients() -> None:
    def run(compiled: bool) -> tuple[float, torch.Tensor]:
        model = build_tiny_model(64, seed=0, attn_implementation=fast.VARLEN_SDPA, head_dim=16)
        model = model.to("cuda", torch.bfloat16)
        if compiled:
            compile_layers(model)
        torch.manual_seed(7)
        ids = torch.randint(3, 64, (1, 40), device="cuda")
        positions = torch.cat([torch.arange(n) for n in (9, 17, 14)]).unsqueeze(0).cuda()
        loss = CausalLMLoss(model)(input_ids=ids, targets=ids, position_ids=positions)
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten().float() for p in model.parameters()])

    (eager_loss, eager_grads), (loss, grads) = run(False), run(True)
    assert abs(loss - eager_loss) < 1e-2 * abs(eager_loss)
    assert relative_error(grads, eager_grads) < 3e-2


def lora_pair(dropout: float) -> tuple[nn.Module, nn.Module]:
    """The same tiny LoRA model through tunewise (MergedLoraLinear) and through plain PEFT, B nonzero."""
    settings = LoraSettings(r=4, lora_alpha=8, lora_dropout=dropout)
    ours = apply_method(
        build_tiny_model(64, seed=0), "lora", settings, quantized=False, gradient_checkpointing=False
    )
    peft = get_peft_model(build_tiny_model(64, seed=0), lora_config(settings))
    torch.manual_seed(3)
    for name, param in ours.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.1)  # zero at init: make the adapter's share of y and dx count
    peft.load_state_dict(ours.state_dict())
    return ours, peft


def loss_and_grads(model: nn.Module, ids: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    loss = CausalLMLoss(model)(input_ids=ids, targets=ids)
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_merged_lora_linear_gives_peft_outputs_and_gradients() -> None:
    ours, peft = lora_pair(0.0)
    layers = [m for m in ours.modules() if isinstance(m, PeftLoraLinear)]
    assert len(layers) == 2 * 7 and all(type(m) is MergedLoraLinear for m in layers)
    assert list(ours.state_dict()) == list(peft.state_dict())  # same tree, same adapter files
    ids = torch.randint(3, 64, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.allclose(ours(input_ids=ids).logits, peft(input_ids=ids).logits, atol=1e-5)
    loss, grads = loss_and_grads(ours, ids)
    expected_loss, expected = loss_and_grads(peft, ids)
    assert abs(loss - expected_loss) < 1e-6 * abs(expected_loss)
    assert grads.keys() == expected.keys() and len(grads) == 2 * 2 * 7
    for name, grad in grads.items():
        assert torch.allclose(grad, expected[name], rtol=1e-4, atol=1e-6), name
    # The input gradient through W + s B A: a layer's own x gradient equals PEFT's.
    x = torch.randn(3, 5, 32, requires_grad=True)
    layer, reference = layers[0], next(m for m in peft.modules() if isinstance(m, PeftLoraLinear))
    assert type(layer(x).grad_fn).__name__ == "_MergedLoraBackward"  # the fold ran, not PEFT's forward
    (layer(x) ** 2).sum().backward()
    merged_grad = x.grad.clone()
    x.grad = None
    (reference(x) ** 2).sum().backward()
    assert torch.allclose(merged_grad, x.grad, rtol=1e-4, atol=1e-6)


def test_merged_lora_linear_keeps_peft_forward_where_it_does_not_apply() -> None:
    ours, _ = lora_pair(0.0)
    layer = next(m for m in ours.modules() if isinstance(m, MergedLoraLinear))
    x = torch.randn(2, 32)
    assert layer._merged_forward_adapter(x, (), {}) == "default"
    with torch.no_grad():  # generation: no B A product per token
        assert layer._merged_forward_adapter(x, (), {}) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer._merged_forward_adapter(x, (), {}) is None
    assert layer._merged_forward_adapter(x.double(), (), {}) is None
    layer.to(torch.bfloat16)  # W + s B A in bf16 would round the adapter's share away
    assert layer._merged_forward_adapter(x.bfloat16(), (), {}) is None
    layer.float()
    with ours.disable_adapter():
        assert layer._merged_forward_adapter(x, (), {}) is None
    dropped, _ = lora_pair(0.05)
    layer = next(m for m in dropped.modules() if isinstance(m, MergedLoraLinear))
    assert layer._merged_forward_adapter(x, (), {}) is None  # dropout masks only the adapter's input


def test_compiled_merged_lora_layers_give_the_eager_loss_and_gradients() -> None:
    ids = torch.randint(3, 64, (1, 30), generator=torch.Generator().manual_seed(9))
    eager_loss, eager = loss_and_grads(lora_pair(0.0)[0], ids)
    model = lora_pair(0.0)[0]
    compile_layers(model)
    loss, grads = loss_and_grads(model, ids)
    assert abs(loss - eager_loss) < 1e-4 * abs(eager_loss)
    for name, grad in grads.items():
        assert torch.allclose(grad, eager[name], rtol=1e-3, atol=1e-5), name


def saved_activation_bytes(loss: torch.Tensor, model: nn.Module) -> int:
    """Bytes the autograd graph behind `loss` keeps for backward, parameters left out."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen, stack, visited = set(), [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        for t in getattr(node, "saved_tensors", ()) if "Compiled" in type(node).__name__ else ():
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in params:
                seen.add((t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()))
        stack.extend(f for f, _ in node.next_functions)
    return sum(n for _, n in seen)


def test_a_memory_budget_keeps_fewer_activations_and_the_same_gradients() -> None:
    ids = torch.randint(3, 64, (1, 40), generator=torch.Generator().manual_seed(11))
    eager_loss, eager = loss_and_grads(lora_pair(0.0)[0], ids)
    saved = {}
    for budget in (None, CPU_ACTIVATION_MEMORY_BUDGET):
        model = lora_pair(0.0)[0]
        compile_layers(model, budget)
        loss = CausalLMLoss(model)(input_ids=ids, targets=ids)
        saved[budget] = saved_activation_bytes(loss, model)
        loss.backward()
        assert abs(loss.item() - eager_loss) < 1e-4 * abs(eager_loss)
        for name, param in model.named_parameters():
            if param.grad is not None:
                assert torch.allclose(param.grad, eager[name], rtol=1e-3, atol=1e-5), name
    assert 0 < saved[CPU_ACTIVATION_MEMORY_BUDGET] < saved[None]  # what `tunewise train` uses on CPU


def tiny_mistral(sliding_window: int) -> nn.Module:
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, sliding_window=sliding_window, initializer_range=0.2,
    )  # fmt: skip
    config._attn_implementation = fast.VARLEN_SDPA
    return MistralForCausalLM(config)


@pytest.mark.parametrize(("window", "kernel_calls"), [(4, 0), (64, 2)])
def test_packed_rows_keep_a_sliding_window_passed_as_an_argument(
    window: int, kernel_calls: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Mistral passes its window to the attention function, not as a module attribute: a window shorter than an
    # example must reach the mask (plain sdpa), one no shorter than the longest example lets the kernel run.
    model = tiny_mistral(window)
    torch.manual_seed(7)
    lengths = (9, 6, 12)
    ids = torch.randint(3, 64, (1, sum(lengths)))
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    calls: list[int] = []
    kernel = fast._cpu_varlen_attention
    monkeypatch.setattr(fast, "_cpu_varlen_attention", lambda *a: calls.append(1) or kernel(*a))
    packed = CausalLMLoss(model)(input_ids=ids, targets=ids, position_ids=positions)
    alone = sum(
        CausalLMLoss(model)(input_ids=ids[:, a:b], targets=ids[:, a:b])
        for a, b in itertools.pairwise([0, *itertools.accumulate(lengths)])
    )
    assert abs(packed.item() - alone.item()) < 1e-5 * alone.item()
    assert len(calls) == kernel_calls  # one per layer when the kernel runs
