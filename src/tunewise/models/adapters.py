"""Full fine-tuning, LoRA and QLoRA through PEFT and bitsandbytes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import BitsAndBytesConfig, PreTrainedModel

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    lora_dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"
    bias: str = "none"
    use_rslora: bool = False
    use_dora: bool = False
    modules_to_save: list[str] | None = None
    init_lora_weights: bool | str = True


def apply_method(
    model: PreTrainedModel, method: str, lora: LoraSettings, *, quantized: bool, gradient_checkpointing: bool
) -> PreTrainedModel | PeftModel:
    """Freeze or wrap `model` for `method` (full, lora, qlora)."""
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if method == "full":
        model.requires_grad_(True)
        return model
    if quantized:
        # Norms to fp32 and input gradients on, so checkpointed 4/8-bit layers can backpropagate.
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif gradient_checkpointing:
        model.enable_input_require_grads()
    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=lora.r,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
        target_modules=lora.target_modules,
        bias=lora.bias,
        use_rslora=lora.use_rslora,
        use_dora=lora.use_dora,
        modules_to_save=lora.modules_to_save,
        init_lora_weights=lora.init_lora_weights,
    )
    return get_peft_model(model, config)


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
