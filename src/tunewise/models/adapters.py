"""Full fine-tuning, LoRA and QLoRA through PEFT and bitsandbytes.

What can train where is measured, not assumed: `check_method_support` runs a 64x64 quantised layer
through LoRA on the target device (a few milliseconds) and compares its gradients with the same
computation on the de-quantised weight, before any model weights are loaded. With bitsandbytes 0.50
on CPU, 4-bit (nf4, fp4) and 8-bit bases train, with and without DoRA (docs/adapters.md).
"""

from __future__ import annotations

import functools
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedModel

from tunewise.models.fast import MergedLoraLinear
from tunewise.models.load import ModelLoadError, keep_4bit_weights_unpacked
from tunewise.models.memory import MemoryEstimate, ParamSpec, estimate_memory

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_REGEX_CHARS = set("*+?[](){}|^$\\")

# Named initialisations that need a step PEFT leaves to the caller, which tunewise does not run.
_UNSUPPORTED_INITS = {
    "eva": "EVA initialises from activations of a data pass (peft.initialize_lora_eva_weights), which "
    "tunewise does not run; without it the adapter is not EVA",
    "corda": "CorDA needs peft.preprocess_corda over calibration data before the adapter is built, which "
    "tunewise does not run",
    "astra": "ASTRA projects the base weight onto eigenvectors of activations from a calibration set, a data "
    "pass tunewise does not run",
    "loftq": "LoftQ needs a LoftQConfig, which tunewise does not expose",
}


def quantization_config(
    load_in_4bit: bool,
    load_in_8bit: bool,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: str = "float32",
) -> BitsAndBytesConfig | None:
    if load_in_4bit:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant_type,
            bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=_DTYPES[compute_dtype],
        )
    if load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


@dataclass(frozen=True)
class LoraSettings:
    r: int = 16
    lora_alpha: float = 32
    lora_dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    bias: str = "none"
    use_rslora: bool = False
    use_dora: bool = False
    modules_to_save: list[str] | None = None
    init_lora_weights: bool | str = True


def resolve_target_modules(target_modules: str | list[str]) -> str | list[str]:
    """PEFT's `target_modules`, where a plain name (`q_proj`) means that module name.

    PEFT reads a string other than `all-linear` as a regex that must match the whole module path
    (`model.layers.0.self_attn.q_proj`), so a bare name would match nothing; a list entry matches
    a path's last components, which is what a plain name means.
    """
    if isinstance(target_modules, str) and target_modules != "all-linear":
        return target_modules if _REGEX_CHARS.intersection(target_modules) else [target_modules]
    return target_modules


def lora_config(lora: LoraSettings) -> LoraConfig:
    settings: dict[str, Any] = {
        **lora.__dict__,
        "target_modules": resolve_target_modules(lora.target_modules),
    }
    return LoraConfig(task_type="CAUSAL_LM", **settings)


# ------------------------------------------------------------------------------ what works where


@dataclass(frozen=True)
class SupportProblem:
    """A method setting that cannot work here, found before any weights are loaded."""

    key: str
    """Dotted config path."""
    message: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message}"


@functools.cache
def probe_kbit_lora(
    device_type: str,
    bits: int,
    quant_type: str = "nf4",
    compute_dtype: str = "float32",
    double_quant: bool = True,
    use_dora: bool = False,
    init_lora_weights: bool | str = True,
) -> str | None:
    """None if LoRA trains through a `bits`-bit bitsandbytes layer on `device_type`, else why not.

    "Runs" is not enough: the input and adapter gradients must match those through the layer's
    de-quantised weight (relative error under 5%; 8-bit quantises activations too, ~0.5% here).
    """
    try:
        with torch.random.fork_rng():  # leave the run's random state as it was
            torch.manual_seed(0)
            return _probe(
                device_type, bits, quant_type, compute_dtype, double_quant, use_dora, init_lora_weights
            )
    except Exception as exc:  # noqa: BLE001 - any failure is the answer: no kernel, no device, PEFT refuses
        return f"{type(exc).__name__}: {exc}".strip()


def _probe(
    device_type: str,
    bits: int,
    quant_type: str,
    compute_dtype: str,
    double_quant: bool,
    use_dora: bool,
    init_lora_weights: bool | str,
) -> str | None:
    layer = _quantised_probe_layer(device_type, bits, quant_type, compute_dtype, double_quant)
    init = cast(Any, init_lora_weights)  # PEFT types it as a Literal of the names
    config = LoraConfig(r=4, target_modules=["proj"], use_dora=use_dora, init_lora_weights=init)
    quantised = get_peft_model(nn.Sequential(OrderedDict(proj=layer)), config)
    for name, param in quantised.named_parameters():
        if "lora_B" in name:  # B starts at zero: perturb it so A gets a gradient to compare
            nn.init.normal_(param, std=0.1)
    # The reference reads the base weight after the init: PiSSA-like inits rewrite it.
    dense = nn.Linear(64, 64, bias=False, device=device_type)
    dense.weight.data.copy_(_dequantised(layer))
    config.init_lora_weights = True
    reference = get_peft_model(nn.Sequential(OrderedDict(proj=dense)), config)
    adapter = {k: v for k, v in quantised.state_dict().items() if "lora_" in k}
    reference.load_state_dict(adapter, strict=False)
    return _compare_gradients(quantised, reference, device_type)


def _quantised_probe_layer(
    device_type: str, bits: int, quant_type: str, compute_dtype: str, double_quant: bool
) -> nn.Module:
    """A 64x64 bitsandbytes linear on `device_type`."""
    import bitsandbytes as bnb

    weight = torch.randn(64, 64) / 8
    layer: nn.Module
    if bits == 4:
        layer = bnb.nn.Linear4bit(
            64, 64, False, _DTYPES[compute_dtype], compress_statistics=double_quant, quant_type=quant_type
        )
        layer.weight = bnb.nn.Params4bit(
            weight, requires_grad=False, compress_statistics=double_quant, quant_type=quant_type
        )
    else:
        layer = bnb.nn.Linear8bitLt(64, 64, bias=False, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    return layer.to(device_type)  # quantises


def _dequantised(layer: nn.Module) -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    weight: Any = layer.weight
    if hasattr(weight, "quant_state"):
        return bnbf.dequantize_4bit(weight.data, weight.quant_state).float()
    return weight.data.float() * weight.SCB.float()[:, None] / 127  # LLM.int8: a scale per row


def _compare_gradients(quantised: nn.Module, reference: nn.Module, device_type: str) -> str | None:
    grads = []
    for model in (quantised, reference):
        x = torch.randn(8, 64, device=device_type, generator=torch.Generator(device_type).manual_seed(1))
        x.requires_grad_(True)
        model(x).float().square().sum().backward()
        trained = [x, *(p for p in model.parameters() if p.requires_grad)]
        grads.append(torch.cat([cast(torch.Tensor, p.grad).flatten().float() for p in trained]))
    got, want = grads
    error = float((got - want).norm() / want.norm())
    if not error < 0.05:  # also catches NaN
        return f"gradients through the quantised layer are wrong (relative error {error:.3g} vs de-quantised)"
    return None


def check_method_support(
    method: str,
    load_in_4bit: bool,
    load_in_8bit: bool,
    use_dora: bool,
    device_type: str,
    init_lora_weights: bool | str = True,
    quant_type: str = "nf4",
    compute_dtype: str = "float32",
    double_quant: bool = True,
    *,
    probe: Callable[[str, int, str, str, bool, bool, bool | str], str | None] = probe_kbit_lora,
) -> list[SupportProblem]:
    """Every reason this method cannot train here; empty when it can. Loads no model weights.

    The config's own rules (full on a quantised base, 4 and 8 bit together) are checked when it is
    loaded; these are the ones that depend on the installed libraries and the device.
    """
    if method == "full":
        return []
    problems = []
    init_problem = _init_problem(init_lora_weights)
    if init_problem:
        problems.append(SupportProblem("adapter.init_lora_weights", init_problem))
    bits = 4 if load_in_4bit else 8 if load_in_8bit else None
    if bits is None:
        return problems
    where = f"a {bits}-bit base on {device_type}"
    error = probe(device_type, bits, quant_type, compute_dtype, double_quant, False, True)
    if error:
        message = f"{_bnb_version()} cannot train LoRA through {where} ({error}); use `method: lora` without quantisation"
        return [*problems, SupportProblem(f"quantization.load_in_{bits}bit", message)]
    if use_dora and (error := probe(device_type, bits, quant_type, compute_dtype, double_quant, True, True)):
        problems.append(SupportProblem("adapter.use_dora", f"DoRA fails on {where} ({error}); set it false"))
    named_init = init_lora_weights not in (True, False, "gaussian") and not init_problem
    if named_init and (
        error := probe(device_type, bits, quant_type, compute_dtype, double_quant, False, init_lora_weights)
    ):
        message = f"`{init_lora_weights}` cannot initialise on {where} ({error}); use it without quantisation"
        problems.append(SupportProblem("adapter.init_lora_weights", message))
    return problems


def _init_problem(init_lora_weights: bool | str) -> str | None:
    if isinstance(init_lora_weights, str) and init_lora_weights.startswith("pissa_niter_"):
        # Measured: PEFT re-runs the randomised SVD when the adapter is loaded, so a reloaded adapter
        # differs from the trained model (max logit difference 0.1 on a tiny llama).
        return (
            f"`{init_lora_weights}`: PEFT redoes PiSSA's randomised SVD when the adapter is loaded, so the "
            "saved adapter would not reproduce the trained model; use `pissa` (exact SVD)"
        )
    if isinstance(init_lora_weights, str) and init_lora_weights in _UNSUPPORTED_INITS:
        return f"`{init_lora_weights}`: {_UNSUPPORTED_INITS[init_lora_weights]}"
    return None


def _bnb_version() -> str:
    try:
        import bitsandbytes

        return f"bitsandbytes {bitsandbytes.__version__}"
    except ImportError:
        return "bitsandbytes (not installed: `pip install bitsandbytes`)"


# ------------------------------------------------------------------------------ applying a method


def apply_method(
    model: PreTrainedModel, method: str, lora: LoraSettings, *, quantized: bool, gradient_checkpointing: bool
) -> PreTrainedModel | PeftModel:
    """Freeze or wrap `model` for `method` (full, lora, qlora)."""
    if quantized:
        # Freezes the base and casts the non-quantised parameters (norms, embeddings) to fp32.
        # Checkpointing is enabled below, non-reentrant, so inputs need not require grad.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        if getattr(model, "is_loaded_in_8bit", False):
            _log_int8_cast_once()
        keep_4bit_weights_unpacked(model)  # also done by load_model; this model may come from elsewhere
    if gradient_checkpointing:
        _enable_checkpointing(model)
    if method == "full":
        model.requires_grad_(True)
        return model
    config = lora_config(lora)
    if not quantized:
        # bitsandbytes' layers subclass nn.Linear too: only a plain model takes the merged-weight forward.
        config._register_custom_module({nn.Linear: MergedLoraLinear})
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        if "not found in the base model" not in str(exc):
            raise
        names = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if _is_linear(m)})
        raise ModelLoadError(
            f"adapter.target_modules: {lora.target_modules!r} matches no module of this model; its linear "
            f"layers are {', '.join(names)} (or use all-linear; a string with regex characters must match "
            "the whole module path)"
        ) from exc


def _enable_checkpointing(model: PreTrainedModel) -> None:
    # transformers 5 renamed it; the old name warns. Non-reentrant: no input-grad hook needed.
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


class _Once(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        new = message not in self.seen
        self.seen.add(message)
        return new


def _log_int8_cast_once() -> None:
    # bitsandbytes logs "inputs will be cast from float32 to float16" on every 8-bit matmul of an
    # fp32 model (hundreds a step); the fact matters once.
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _Once) for f in logger.filters):
        logger.addFilter(_Once())


def _is_linear(module: nn.Module) -> bool:
    # bitsandbytes' Linear4bit and Linear8bitLt subclass nn.Linear
    return isinstance(module, nn.Linear)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count their logical size."""
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        if hasattr(param, "quant_state"):  # bitsandbytes Params4bit packs two values per byte
            n *= 2
        total += n
        trainable += n if param.requires_grad else 0
    return trainable, total


# ------------------------------------------------------------------------------ memory, per method


def parameter_specs_by_method(
    model_dir: Path,
    lora: LoraSettings,
    *,
    method: str,
    torch_dtype: str,
    bits: int | None,
    double_quant: bool = True,
    trust_remote_code: bool = False,
    other_dtypes: dict[str, str] | None = None,
) -> dict[str, list[ParamSpec]]:
    """The parameters of full, lora and qlora on this model, for `memory.estimate_memory`.

    Built on the meta device (no weights read). The run's own method gets its quantisation (`bits`) and
    `torch_dtype`; the others: full and lora an unquantised base, qlora a 4-bit one, each in its
    `other_dtypes` entry (the dtype `torch_dtype: auto` would give it), else `torch_dtype`. Quantised are the
    linear layers other than the output head, as transformers does; a quantised run's other weights are fp32,
    as `prepare_model_for_kbit_training` leaves them.
    """
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    dtypes = {**(other_dtypes or {}), method: torch_dtype}
    run_bits = {"full": None, "lora": None, "qlora": 4, method: bits}
    init = LoraSettings(**{**lora.__dict__, "init_lora_weights": True})  # no SVD of meta tensors
    by_method: dict[str, list[ParamSpec]] = {}
    for name in ("full", "lora", "qlora"):
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(
                config, dtype=_DTYPES[dtypes.get(name, torch_dtype)], trust_remote_code=trust_remote_code
            )
        embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
        if name == "full":
            by_method[name] = [_spec(p, embeddings, trainable=True) for p in model.parameters()]
            continue
        head = model.get_output_embeddings()
        quantisable = {id(m.weight) for m in model.modules() if _is_linear(m) and m is not head}
        quantised = _quantised_storage(run_bits[name], double_quant)
        fp32 = "float32" if quantised else None
        adapted = get_peft_model(model, lora_config(init), low_cpu_mem_usage=True)
        by_method[name] = [
            _spec(p, embeddings, trainable=True, storage=fp32)
            if p.requires_grad
            else _spec(p, embeddings, storage=quantised if id(p) in quantisable else fp32)
            for p in adapted.parameters()
        ]
    return by_method


def memory_by_method(
    model_dir: Path,
    lora: LoraSettings,
    optimizer: str,
    *,
    method: str,
    torch_dtype: str,
    bits: int | None,
    double_quant: bool = True,
    trust_remote_code: bool = False,
    other_dtypes: dict[str, str] | None = None,
) -> dict[str, MemoryEstimate]:
    """Trainable parameters and bytes of weights, gradients and optimizer state of each method."""
    specs = parameter_specs_by_method(
        model_dir,
        lora,
        method=method,
        torch_dtype=torch_dtype,
        bits=bits,
        double_quant=double_quant,
        trust_remote_code=trust_remote_code,
        other_dtypes=other_dtypes,
    )
    return {name: estimate_memory(params, optimizer) for name, params in specs.items()}


def _quantised_storage(bits: int | None, double_quant: bool) -> str | None:
    if bits is None:
        return None
    return "int8" if bits == 8 else "4bit-double-quant" if double_quant else "4bit"


def _spec(
    param: torch.Tensor, embeddings: set[int], *, trainable: bool = False, storage: str | None = None
) -> ParamSpec:
    storage = storage or str(param.dtype).removeprefix("torch.")
    return ParamSpec(tuple(param.shape), storage, trainable, id(param) in embeddings)
