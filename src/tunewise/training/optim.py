"""Optimizers by HF ``optim`` name, with HF ``Trainer``'s parameter groups and settings.

Each choice made on the user's behalf (fused kernels, a CPU stand-in for a CUDA-only optimizer)
comes back as a note for the run plan; nothing falls back silently.
"""

from __future__ import annotations

import functools
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.optimization import Adafactor

from tunewise.config.schema import OptimizerName

OPTIMIZER_NAMES: tuple[str, ...] = typing.get_args(OptimizerName)
"""HF ``optim`` values we build."""

# Trainer.get_decay_parameter_names: these name patterns, and anything inside an nn.LayerNorm, get no decay.
_NO_DECAY_NAME = re.compile(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)")

# HF's _get_sgd reads these from optim_args ("weight_decay" too, but the param groups override it there).
_SGD_OPTIM_ARGS = {"momentum": float, "dampening": float, "nesterov": bool}


def decay_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters weight decay applies to: all but biases and normalisation weights, as HF."""
    in_layer_norm = {
        f"{module_name}.{param_name}" if module_name else param_name
        for module_name, module in model.named_modules(remove_duplicate=False)
        if isinstance(module, nn.LayerNorm)
        for param_name, _ in module.named_parameters(remove_duplicate=False)
    }
    return {
        name
        for name, _ in model.named_parameters(remove_duplicate=False)
        if name not in in_layer_norm and not _NO_DECAY_NAME.search(name.lower())
    }


@dataclass(frozen=True)
class OptimizerChoice:
    """The optimizer a run builds for an ``optim`` name on a device, and why it differs from the name asked for."""

    name: str  # the HF optim name whose update and state memory the run gets
    paged: bool = False  # bitsandbytes pages the state through CUDA unified memory
    kernel: dict[str, Any] = field(default_factory=dict)  # torch AdamW's fused= or foreach=
    notes: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """The name as the plan shows it: paged_adamw_32bit off CUDA runs unpaged, and HF has no name for that."""
        return f"{self.name} (unpaged)" if self.name.startswith("paged_") and not self.paged else self.name


def choose_optimizer(
    name: str, device_type: str, bnb_runs_on: Callable[[str, int], bool] | None = None
) -> OptimizerChoice:
    """What `build_optimizer` builds for ``optim=name`` on ``device_type``, decided without the model, so that
    `tunewise plan` shows it: a CPU stand-in for a CUDA-only optimizer, torch's AdamW where bitsandbytes cannot step
    (``bnb_runs_on(device_type, bits)``; the default tries one step, tests fake it), the fastest AdamW kernel."""
    if name not in OPTIMIZER_NAMES:
        raise ValueError(f"optim={name!r} is not supported; choose one of: {', '.join(OPTIMIZER_NAMES)}")
    if name == "sgd":
        return OptimizerChoice(name)
    if name == "adafactor":
        return OptimizerChoice(
            name, notes=("adafactor: adam_beta1, adam_beta2 and adam_epsilon do not apply (as in HF)",)
        )
    if name in ("adamw_torch", "adamw_torch_fused"):
        return _torch_adamw(name, device_type)
    bits = 8 if "8bit" in name else 32
    built, notes = name, []
    if name.startswith("paged_") and device_type != "cuda":
        built = "adamw_8bit" if bits == 8 else name
        plain = "adamw_8bit" if bits == 8 else "32-bit bitsandbytes AdamW"
        notes.append(
            f"{name} pages optimizer state through CUDA unified memory; using {plain} on {device_type}"
        )
    if not (bnb_runs_on or _bnb_runs_on)(device_type, bits):
        notes.append(
            f"{name}: the installed bitsandbytes cannot step a {bits}-bit optimizer on {device_type}; "
            "using adamw_torch instead (32-bit optimizer state)"
        )
        fallback = _torch_adamw("adamw_torch", device_type)
        return OptimizerChoice(fallback.name, kernel=fallback.kernel, notes=(*notes, *fallback.notes))
    return OptimizerChoice(
        built, paged=built.startswith("paged_") and device_type == "cuda", notes=tuple(notes)
    )


def build_optimizer(
    model: nn.Module,
    name: str,
    learning_rate: float,
    weight_decay: float,
    adam_beta1: float,
    adam_beta2: float,
    adam_epsilon: float,
    device_type: str,
    optim_args: dict[str, Any] | None = None,
    *,
    bnb_runs_on: Callable[[str, int], bool] | None = None,
) -> tuple[torch.optim.Optimizer, list[str]]:
    """The optimizer HF ``Trainer`` builds for ``optim=name``, over the trainable parameters, and the notes of
    `choose_optimizer`, which picks it (``bnb_runs_on`` is its probe).

    Build it after the model is on ``device_type``.
    """
    choice = choose_optimizer(name, device_type, bnb_runs_on)
    sgd_kwargs = _sgd_kwargs(name, optim_args)
    groups = _param_groups(model, weight_decay)
    adam: dict[str, Any] = {"lr": learning_rate, "betas": (adam_beta1, adam_beta2), "eps": adam_epsilon}
    notes = list(choice.notes)
    if choice.name == "sgd":
        return torch.optim.SGD(groups, lr=learning_rate, **sgd_kwargs), notes
    if choice.name == "adafactor":
        # HF's _get_adafactor passes only lr and these two flags; Adafactor has its own beta/eps semantics.
        return Adafactor(groups, lr=learning_rate, scale_parameter=False, relative_step=False), notes
    if choice.name in ("adamw_torch", "adamw_torch_fused"):
        return torch.optim.AdamW(groups, **adam, **choice.kernel), notes
    # bitsandbytes AdamW as HF's _get_bitsandbytes_optimizer, minus paging off CUDA.
    import bitsandbytes as bnb

    bits = 8 if "8bit" in choice.name else 32
    optimizer = bnb.optim.AdamW(groups, **adam, optim_bits=bits, is_paged=choice.paged)
    if bits == 8:
        _keep_embeddings_in_32bit(model)
    return optimizer, notes


def _sgd_kwargs(name: str, optim_args: dict[str, Any] | None) -> dict[str, Any]:
    """optim_args as keyword arguments; only sgd reads any in HF, so keys anywhere else are an error."""
    optim_args = optim_args or {}
    accepted = _SGD_OPTIM_ARGS if name == "sgd" else {}
    unknown = sorted(set(optim_args) - set(accepted))
    if unknown:
        takes = f"takes only {', '.join(accepted)}" if accepted else "takes no optim_args"
        hint = " (set weight_decay instead)" if "weight_decay" in unknown else ""
        raise ValueError(f"optim_args {unknown} do not apply: optim={name!r} {takes}{hint}.")
    wrong = [f"{key}={value!r}" for key, value in optim_args.items() if not _is_a(value, accepted[key])]
    if wrong:
        raise ValueError(
            f"optim_args {', '.join(wrong)}: momentum/dampening take a number, nesterov true/false."
        )
    return {key: accepted[key](value) for key, value in optim_args.items()}


def _is_a(value: Any, kind: type) -> bool:
    is_bool = isinstance(value, bool)
    return is_bool if kind is bool else isinstance(value, int | float) and not is_bool


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainer.create_optimizer's two groups, trainable parameters only, empty groups left out."""
    decay = decay_parameter_names(model)
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(
            "The model has no trainable parameters: every parameter has requires_grad=False. "
            "Check that adapters were added (method: lora) or that the base model was not frozen by mistake."
        )
    groups = [
        {"params": [p for n, p in trainable if n in decay], "weight_decay": weight_decay},
        {"params": [p for n, p in trainable if n not in decay], "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]


def _torch_adamw(name: str, device_type: str) -> OptimizerChoice:
    kernel, note = _adamw_kernel(device_type)
    if name == "adamw_torch_fused" and "fused" not in kernel:
        note = f"adamw_torch_fused: torch {torch.__version__} has no fused AdamW on {device_type}; {note}"
    return OptimizerChoice(name, kernel=kernel, notes=(note,))


def _adamw_kernel(device_type: str) -> tuple[dict[str, Any], str]:
    """The fastest torch AdamW implementation for this device; all three compute the same update."""
    # Private helpers, but the very lists torch.optim checks `fused=`/`foreach=` against.
    from torch.optim.optimizer import (
        _get_foreach_kernels_supported_devices,
        _get_fused_kernels_supported_devices,
    )

    if device_type in _get_fused_kernels_supported_devices():
        return {"fused": True}, f"AdamW: fused kernel on {device_type} (torch {torch.__version__})"
    if device_type in _get_foreach_kernels_supported_devices():
        return {"foreach": True}, f"AdamW: foreach kernel on {device_type} (no fused kernel there)"
    return {}, f"AdamW: per-tensor loop on {device_type} (no fused or foreach kernel there)"


def _keep_embeddings_in_32bit(model: nn.Module) -> None:
    """HF keeps the optimizer state of every nn.Embedding in 32 bits under 8-bit optimizers.

    HF registers a module override on bitsandbytes' process-wide manager, which ends up keyed by
    (group index, param index) and so also applies to that position in every later optimizer of the
    process (a sweep, a test run); a per-parameter override is as narrow as bitsandbytes allows.
    """
    import bitsandbytes as bnb

    manager = bnb.optim.GlobalOptimManager.get_instance()
    for module in model.modules():
        if isinstance(module, nn.Embedding) and module.weight.requires_grad:
            manager.override_config(module.weight, key_value_dict={"optim_bits": 32})


@functools.cache
def _bnb_runs_on(device_type: str, bits: int) -> bool:
    """Whether bitsandbytes is installed and can step a ``bits``-bit AdamW on this device (8-bit on CPU needs 0.49+)."""
    try:
        import bitsandbytes as bnb

        # min_8bit_size elements: the smallest tensor that really gets 8-bit state.
        param = nn.Parameter(torch.zeros(4096, device=device_type))
        param.grad = torch.ones_like(param)
        probe = bnb.optim.AdamW([param], lr=1e-3, optim_bits=bits)
        probe.step()
    except Exception:  # noqa: BLE001 - any failure means "cannot": ImportError, no kernel, no such device
        return False
    return bool(param.detach().abs().sum() > 0)
