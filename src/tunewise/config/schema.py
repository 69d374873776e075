"""The typed, strict configuration schema.

Every key uses Hugging Face's name and meaning (``TrainingArguments``, ``LoraConfig``,
``BitsAndBytesConfig``, ``GenerationConfig``) so a user's knowledge transfers. Keys are grouped
into sections; because every key name is unique across sections, ``--set learning_rate=1e-4``
works as well as ``--set training.learning_rate=1e-4``.

The value ``"auto"`` is accepted where :mod:`tunewise.config.resolve` has a sound rule.
"""

from __future__ import annotations

import functools
import re
import types
import typing
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

EMBEDDED_MODEL = "smollm2-135m-instruct"
BUILTIN_PREFIX = "builtin:"  # `dataset: builtin:NAME`, a dataset shipped in tunewise/builtin/
DEFAULT_EFFECTIVE_BATCH_SIZE = 16
"""Sequences per optimizer update that an `auto` batch targets when effective_batch_size is unset."""

Auto = Literal["auto"]
SchedulerName = Literal[
    "linear",
    "cosine",
    "cosine_with_restarts",
    "cosine_with_min_lr",
    "polynomial",
    "constant",
    "constant_with_warmup",
]
OptimizerName = Literal[
    "adamw_torch",
    "adamw_torch_fused",
    "adafactor",
    "sgd",
    "adamw_8bit",
    "adamw_bnb_8bit",
    "paged_adamw_8bit",
    "paged_adamw_32bit",
]
PositiveInt = Annotated[int, Field(ge=1)]
NonEmptyStr = Annotated[str, Field(min_length=1)]
NonEmptyList = Annotated[list[NonEmptyStr], Field(min_length=1)]
SEED_MAX = 2**32 - 1
"""numpy.random.seed, which HF's set_seed calls, accepts seeds in [0, 2**32 - 1]."""


class _Section(BaseModel):
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, protected_namespaces=(), allow_inf_nan=False
    )

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic's lax mode reads true as 1; `r: true` is a typo, never a rank of 1.
        field = cls.model_fields.get(info.field_name or "")
        if isinstance(value, bool) and field is not None and bool not in _leaf_types(field.annotation):
            raise PydanticCustomError("bool_not_allowed", "a boolean is not allowed here")
        return value


class ModelConfig(_Section):
    model_name_or_path: NonEmptyStr = EMBEDDED_MODEL
    """A local HF model directory, a .gguf file, the embedded default `smollm2-135m-instruct`, or a hub id."""
    torch_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """dtype the base weights are loaded in; auto: bfloat16 for a LoRA/QLoRA base in a bf16 run, else float32."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    """Attention kernel passed to transformers."""
    trust_remote_code: bool = False
    """Run Python code shipped inside a model repository. Off unless you trust its author."""
    dropout: float | None = Field(default=None, ge=0.0, lt=1.0)
    """Override of the model config's hidden (residual, embedding) dropout; not attention, activation or classifier."""
    attention_dropout: float | None = Field(default=None, ge=0.0, lt=1.0)
    """Override of the model config's attention dropout."""


class DataConfig(_Section):
    dataset: NonEmptyStr | NonEmptyList = "builtin:json_extract"
    """Training data: file(s) (JSONL, JSON, CSV, Parquet, save_to_disk folder) or `builtin:NAME`."""
    validation_file: str | list[str] | None = None
    """Separate validation data (not with `validation_split`); `builtin:` datasets bring their own."""
    validation_split: float | int | None = None
    """Fraction (0-1) or number of training rows held out for evaluation, seeded by `data_seed`."""
    format: Literal["auto", "text", "prompt_completion", "alpaca", "chat", "sharegpt"] = "auto"
    """Row format; auto detects it from the columns."""
    system_prompt: str | None = None
    """System message prepended to every conversation."""
    chat_template: str | None = None
    """Chat template overriding the tokenizer's: Jinja text or a name (chatml, llama3, zephyr)."""
    max_seq_length: int = Field(default=512, ge=8)
    """Longest tokenised example, in tokens; longer ones are truncated by `truncation_side`."""
    truncation_side: Literal["right", "left"] = "right"
    """Which end of an over-long example is cut."""
    padding: Literal["longest", "max_length"] = "longest"
    """Pad each batch to its longest example (dynamic) or always to `max_seq_length`."""
    padding_side: Literal["right", "left"] = "right"
    """Side that receives pad tokens during training (generation always pads left)."""
    pad_to_multiple_of: int | None = Field(default=None, ge=1)
    """Round padded lengths up to a multiple of this (8 helps GPU tensor cores; bf16 on CPU sets 64)."""
    packing: bool = False
    """Concatenate several examples per row, with no attention across example boundaries."""
    group_by_length: bool = False
    """Batch examples of similar length together to cut padding."""
    train_on_inputs: bool = False
    """Also compute the loss on prompts / user turns (default: completions only)."""
    bad_rows: Literal["error", "skip"] = "error"
    """What to do with malformed rows: stop with an error naming file:line, or drop and count them."""

    @field_validator("validation_split")
    @classmethod
    def _fraction_or_count(cls, value: float | None) -> float | None:
        if value is not None and not (0 < value < 1 if isinstance(value, float) else value >= 1):
            raise PydanticCustomError("tunewise", "must be a fraction in (0, 1) or a row count >= 1")
        return value


class AdapterConfig(_Section):
    method: Literal["full", "lora", "qlora"] = "lora"
    """full: train every weight; lora: train low-rank adapters; qlora: lora on a 4-bit base."""
    r: int = Field(default=16, ge=1)
    """LoRA rank."""
    lora_alpha: float = Field(default=32, gt=0)
    """LoRA scaling numerator: the update is scaled by lora_alpha / r (or / sqrt(r) with rsLoRA)."""
    lora_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Dropout on the LoRA input (PEFT's default 0; at 0 each adapted fp32 layer trains as one merged matmul)."""
    target_modules: NonEmptyStr | NonEmptyList = "all-linear"
    """Modules that get adapters: names, `all-linear`, or a regex."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Which biases train alongside the adapters."""
    use_rslora: bool = False
    """Rank-stabilised LoRA: scale by lora_alpha / sqrt(r)."""
    use_dora: bool = False
    """Weight-decomposed LoRA (DoRA)."""
    modules_to_save: list[str] | None = None
    """Extra modules trained in full and saved with the adapter (e.g. embed_tokens, lm_head)."""
    init_lora_weights: bool | str = True
    """PEFT's LoRA initialisation (True, 'gaussian', 'pissa', 'olora', ...)."""

    @field_validator("init_lora_weights")
    @classmethod
    def _known_init(cls, value: bool | str) -> bool | str:
        if isinstance(value, str) and value not in LORA_INITS and not re.fullmatch(r"pissa_niter_\d+", value):
            choices = ", ".join(["true", "false", *LORA_INITS, "pissa_niter_N"])
            raise PydanticCustomError("tunewise", "must be one of {choices}", {"choices": choices})
        return value


class QuantizationConfig(_Section):
    load_in_4bit: bool | Auto = "auto"
    """Load the base in 4 bit through bitsandbytes; auto: on for qlora."""
    load_in_8bit: bool = False
    """Load the base in 8 bit through bitsandbytes."""
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type."""
    bnb_4bit_use_double_quant: bool = True
    """Quantise the quantisation constants too (saves ~0.4 bit per parameter)."""
    bnb_4bit_compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """dtype of the de-quantised matmuls; auto follows the training precision."""


class TrainingConfig(_Section):
    output_dir: NonEmptyStr = "runs/quickstart"
    """Run directory: config, metrics, checkpoints, adapter, summary."""
    num_train_epochs: float = Field(default=3.0, gt=0)
    """Passes over the training data (fractional allowed); ignored when max_steps > 0."""
    max_steps: int = Field(default=-1, ge=-1)
    """Total optimizer updates; > 0 overrides num_train_epochs, as in HF; -1 trains for num_train_epochs."""
    per_device_train_batch_size: PositiveInt | Auto = 8
    """Sequences per micro-batch per device; auto derives it from effective_batch_size."""
    per_device_eval_batch_size: int = Field(default=16, ge=1)
    """Sequences per evaluation batch per device."""
    gradient_accumulation_steps: PositiveInt | Auto = 1
    """Micro-batches summed into one optimizer update; auto derives it from effective_batch_size."""
    max_tokens_per_micro_batch: PositiveInt | None = None
    """With packing: re-cut each step's examples into rows of at most this many tokens (bounds activation memory)."""
    effective_batch_size: int | None = Field(default=None, ge=1)
    """Target sequences per optimizer update (per-device x accumulation x devices) for the auto rule."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, ~30% more compute."""
    memory_check: bool | Auto = "auto"
    """After the first step, run the largest micro-batch once (no update): out of memory shows now; auto: GPUs."""
    torch_compile: bool = False
    """torch.compile each decoder layer: faster steps after a one-off compile (needs a C++ compiler on CPU)."""
    learning_rate: Annotated[float, Field(gt=0)] | Auto = "auto"
    """Peak learning rate; auto picks a method-specific default (2e-4 LoRA/QLoRA, 2e-5 full)."""
    lr_scheduler_type: SchedulerName = "linear"
    """Learning-rate schedule after warmup."""
    lr_scheduler_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Extra scheduler arguments (num_cycles, min_lr_rate, power, lr_end)."""
    warmup_ratio: float | None = Field(default=None, ge=0.0, le=1.0)
    """Fraction of total steps spent warming up linearly from 0."""
    warmup_steps: int | float | None = Field(default=None, ge=0)
    """Warmup length in optimizer steps, or below 1 a fraction of total steps (as HF 5); wins over warmup_ratio."""
    weight_decay: float = Field(default=0.0, ge=0.0)
    """Decoupled (AdamW) weight decay on weight matrices, not on biases and norms."""
    optim: OptimizerName = "adamw_torch"
    """Optimizer, by HF's name."""
    adam_beta1: float = Field(default=0.9, ge=0.0, lt=1.0)
    """AdamW first-moment decay."""
    adam_beta2: float = Field(default=0.999, ge=0.0, lt=1.0)
    """AdamW second-moment decay."""
    adam_epsilon: float = Field(default=1e-8, gt=0.0)
    """AdamW denominator epsilon."""
    max_grad_norm: float | None = Field(default=1.0, ge=0.0)
    """Clip the global gradient norm to this; 0 or null disables."""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Numeric precision; auto: bf16 on GPUs and CPUs (AMX, AVX512_BF16) that support it, else fp16 on GPU, fp32."""
    bf16: bool | None = None
    """HF flag; true means precision bf16."""
    fp16: bool | None = None
    """HF flag; true means precision fp16 (with loss scaling)."""
    seed: int = Field(default=42, ge=0, le=SEED_MAX)
    """Seed for weights init (adapters), dropout and everything random but data order."""
    data_seed: int | None = Field(default=None, ge=0, le=SEED_MAX)
    """Seed for data shuffling and the validation split; defaults to seed."""
    logging_steps: int | float = Field(default=10, gt=0)
    """Log every N optimizer steps (or a fraction < 1 of total steps)."""
    eval_steps: int | float | None = Field(default=None, gt=0)
    """Evaluate every N steps (or fraction); null: only before and after training."""
    save_steps: int | float | None = Field(default=None, gt=0)
    """Checkpoint every N steps (or fraction); null: none by step count (save_minutes still applies)."""
    save_minutes: float | None = Field(default=30, gt=0)
    """Also checkpoint once this many minutes passed since the last checkpoint; null: by steps only."""
    save_total_limit: int | None = Field(default=2, ge=1)
    """Keep at most this many checkpoints (the best one is never deleted)."""
    load_best_model_at_end: bool = False
    """Restore the best checkpoint (the newest whose evaluation was the best so far, as HF) when training ends."""
    metric_for_best_model: str = "eval_loss"
    """Metric that decides 'best' for early stopping and load_best_model_at_end."""
    greater_is_better: bool | None = None
    """Whether a larger metric is better; default: false for eval_loss/eval_perplexity (HF: false for *loss only)."""
    early_stopping_patience: int | None = Field(default=None, ge=1)
    """Stop after this many evaluations without improvement; null disables."""
    early_stopping_threshold: float = Field(default=0.0, ge=0.0)
    """Minimum improvement that counts."""
    nonfinite_patience: int = Field(default=3, ge=1)
    """Consecutive non-finite losses or gradients tolerated before nonfinite_policy acts."""
    nonfinite_policy: Literal["stop", "rollback"] = "stop"
    """On repeated non-finite steps: stop, or roll back to the last checkpoint with half the learning rate."""

    # Fix (test_config.py): warmup_steps took integers only, so 0.05, transformers 5's spelling of a 5%
    # warmup (TrainingArguments.warmup_steps: float, get_warmup_steps), was refused.
    @field_validator("logging_steps", "eval_steps", "save_steps", "warmup_steps")
    @classmethod
    def _steps_or_fraction(cls, value: float | None) -> float | None:
        # As HF TrainingArguments: below 1 is a fraction of the run, from 1 up a whole number of steps (where
        # HF's get_warmup_steps would silently truncate 2.5 warmup steps to 2, this asks).
        if isinstance(value, float) and value >= 1:
            if not value.is_integer():
                raise PydanticCustomError(
                    "tunewise", "must be a whole number of steps, or a fraction below 1"
                )
            return int(value)
        return value

    @field_validator("max_steps")
    @classmethod
    def _no_zero_steps(cls, value: int) -> int:
        # Fix (test_config.py): 0 passed the schema and failed only once the data was built. transformers 5
        # takes max_steps 0 as 0 steps (not epochs) yet runs one update before its stop check, at learning rate
        # 0 under the default linear schedule: nothing a user would ask for.
        if value == 0:
            raise PydanticCustomError(
                "tunewise",
                "must be -1 (train for num_train_epochs) or a step count >= 1; 0 would be one update at "
                "learning rate 0 in transformers",
            )
        return value


class GenerationConfig(_Section):
    max_new_tokens: int = Field(default=128, ge=1)
    """Upper bound on generated tokens."""
    do_sample: bool = False
    """Sample (true) or decode greedily (false)."""
    temperature: float = Field(default=1.0, ge=0.0)
    """Divides the logits before sampling; 0 means greedy."""
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    """Nucleus sampling: keep the smallest set of tokens whose cumulative probability reaches top_p."""
    top_k: int = Field(default=50, ge=0)
    """Keep the k most likely tokens (0 disables)."""
    repetition_penalty: float = Field(default=1.0, gt=0.0)
    """Penalise tokens already in prompt or output (logit / penalty if > 0, x penalty if < 0); >1 discourages."""


class EvaluationConfig(_Section):
    task_metric: Literal["auto", "exact_match", "json_exact_match", "none"] = "auto"
    """Task metric computed by generating on the validation prompts; auto picks it from the validation answers."""
    max_eval_samples: int | None = Field(default=None, ge=1)
    """Cap on validation rows used for eval loss and the task metric."""
    num_sample_prompts: int = Field(default=3, ge=0)
    """Held-out prompts shown with the model's answer before and after training."""


class TunewiseConfig(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)


LORA_INITS = ("gaussian", "eva", "olora", "pissa", "corda", "astra", "loftq", "orthogonal", "mica", "nora")
"""PEFT 0.22's named LoRA initialisations (LoraConfig.init_lora_weights), besides true/false and pissa_niter_N
(eva, corda, astra and loftq are refused with the reason: models/adapters.py)."""


def _leaf_types(annotation: Any) -> list[Any]:
    """The plain types a field accepts: Optional/Union/Annotated unwrapped; list[str] -> list; Literal kept."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _leaf_types(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [leaf for arg in typing.get_args(annotation) for leaf in _leaf_types(arg)]
    if origin is Literal:
        return [annotation]
    return [origin or annotation]


SECTIONS: dict[str, type[_Section]] = {
    name: field.annotation  # type: ignore[misc]
    for name, field in TunewiseConfig.model_fields.items()
}


def all_keys() -> dict[str, str]:
    """Map every leaf key name to its section (key names are unique across sections)."""
    return {key: section for section, cls in SECTIONS.items() for key in cls.model_fields}


def field_doc(section: str, key: str) -> str:
    """The one-line docstring under a field, used by `--help`, `explain` and shipped YAML."""
    return _field_docs(SECTIONS[section]).get(key, "")


@functools.cache
def _field_docs(cls: type) -> dict[str, str]:
    import ast
    import inspect
    import itertools
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in itertools.pairwise(body):
        is_doc = isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
        if isinstance(node, ast.AnnAssign) and is_doc and isinstance(nxt.value.value, str):
            docs[node.target.id] = nxt.value.value  # type: ignore[union-attr]
    return docs
