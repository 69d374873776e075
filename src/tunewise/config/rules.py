"""The cross-field rules of a schema-valid config: each reads a few keys and returns its problems.

Errors stop a run before it loads anything (`load_config` raises them with the schema's own); warnings and
infos (a value that is ignored, a default that applies) are shown in the plan. Unlike the lints
(config/lints.py), these judge the config as written, before any `auto` is resolved.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from importlib import metadata

from tunewise.config.problems import Problem, num, show, suggest
from tunewise.config.schema import BUILTIN_PREFIX, DEFAULT_EFFECTIVE_BATCH_SIZE, SECTIONS, TunewiseConfig
from tunewise.training.schedule import scheduler_argument_problems

METRICS = ("eval_loss", "eval_perplexity", "exact_match", "json_exact_match")
"""What `metric_for_best_model` can name: the two loss metrics and the task metrics."""
LOWER_IS_BETTER = ("eval_loss", "eval_perplexity")


def check_config(cfg: TunewiseConfig) -> list[Problem]:
    """Every cross-field problem of a schema-valid config: errors, warnings and infos, each with its reason."""
    return cross_field(cfg, skip=set())


def cross_field(cfg: TunewiseConfig, skip: set[str]) -> list[Problem]:
    # A rule reading a key whose own value was invalid (and replaced by its default) would judge a
    # value the user never gave, so it is skipped until that key is fixed.
    return [p for keys, rule in _RULES if not skip.intersection(keys) for p in rule(cfg)]


def _precision_flags(cfg: TunewiseConfig) -> list[Problem]:
    t = cfg.training
    if t.fp16 and t.bf16:
        return [
            Problem("training.fp16", "`fp16` and `bf16` are both true; keep one, or set only `precision`")
        ]
    for flag in ("bf16", "fp16"):
        value = getattr(t, flag)
        if t.precision != "auto" and value is not None and value != (t.precision == flag):
            message = (
                f"`precision: {t.precision}` conflicts with `{flag}: {show(value)}`; "
                "set only `precision` (the bf16/fp16 flags are HF's spelling of it)"
            )
            return [Problem("training.precision", message)]
    return []


def _warmup_twice(cfg: TunewiseConfig) -> list[Problem]:
    t = cfg.training
    if t.warmup_steps is None or t.warmup_ratio is None:
        return []
    if t.warmup_steps == 0:  # HF reads warmup_steps 0 as "use warmup_ratio"
        message = f"ignored: 0 means `warmup_ratio` ({t.warmup_ratio}) applies, as in HF; remove one of them"
        return [Problem("training.warmup_steps", message, "warning")]
    # Below 1 warmup_steps is transformers 5's spelling of the ratio, and wins as a step count does.
    spelled = " (a fraction of the run, as in transformers 5)" if t.warmup_steps < 1 else ""
    message = f"ignored: `warmup_steps` ({t.warmup_steps}){spelled} is also set and wins, as in HF; remove one of them"
    return [Problem("training.warmup_ratio", message, "warning")]


def _schedule(cfg: TunewiseConfig) -> list[Problem]:
    """What `build_scheduler` refuses, known from the config alone, so `plan` and `train` refuse it before loading.

    Fix (test_config.py): only the scheduler's own check caught these, after the model and data had loaded:
    `plan` printed such a schedule as fine and `train` stopped with a traceback."""
    t = cfg.training
    problems = [
        Problem("training.lr_scheduler_kwargs", message)
        for message in scheduler_argument_problems(t.lr_scheduler_type, 0, 1, t.lr_scheduler_kwargs)
    ]
    # Warmup of at least one step: warmup_steps wins when set and not 0 (as in HF), else warmup_ratio.
    key, warmup = ("warmup_steps", t.warmup_steps) if t.warmup_steps else ("warmup_ratio", t.warmup_ratio)
    if t.lr_scheduler_type == "constant" and warmup:
        message = (
            f"`constant` ignores warmup in transformers ({key}: {warmup}); use constant_with_warmup, or set "
            "warmup_steps and warmup_ratio to 0"
        )
        problems.append(Problem("training.lr_scheduler_type", message))
    if t.lr_scheduler_type == "cosine_with_restarts" and t.lr_scheduler_kwargs.get("num_cycles", 1) == 1:
        message = (
            "one cycle (transformers' default num_cycles) never restarts: it is plain cosine; set "
            "lr_scheduler_kwargs: {num_cycles: 2} or more, or use cosine"
        )
        problems.append(Problem("training.lr_scheduler_type", message, "warning"))
    return problems


def _loads_in_4bit(cfg: TunewiseConfig) -> bool:
    q = cfg.quantization
    return q.load_in_4bit is True or (q.load_in_4bit == "auto" and cfg.adapter.method == "qlora")


def _quantization(cfg: TunewiseConfig) -> list[Problem]:
    q, method = cfg.quantization, cfg.adapter.method
    if method == "qlora" and q.load_in_4bit is False:
        message = "`method: qlora` is LoRA on a 4-bit base; set `load_in_4bit: true` (or auto), or use `method: lora`"
        return [Problem("quantization.load_in_4bit", message)]
    if q.load_in_8bit and _loads_in_4bit(cfg):
        if q.load_in_4bit == "auto":
            message = "`method: qlora` loads the base in 4 bit; for an 8-bit base use `method: lora`"
            return [Problem("quantization.load_in_8bit", message)]
        return [
            Problem("quantization.load_in_8bit", "`load_in_4bit` and `load_in_8bit` are both true; keep one")
        ]
    bits = 4 if _loads_in_4bit(cfg) else 8 if q.load_in_8bit else None
    if method == "full" and bits:
        message = (
            f"cannot train a {bits}-bit base in full: quantised weights are frozen integer codes with no "
            f"gradient; use `method: {'qlora' if bits == 4 else 'lora'}` or turn off `load_in_{bits}bit`"
        )
        return [Problem("adapter.method", message)]
    return []


def _load_best(cfg: TunewiseConfig) -> list[Problem]:
    t = cfg.training
    if not t.load_best_model_at_end:
        return []
    path = "training.load_best_model_at_end"
    if t.eval_steps is None:
        return [
            Problem(
                path, "needs evaluation during training: set `eval_steps`, and `save_steps` a multiple of it"
            )
        ]
    if t.save_steps is None:
        return [
            Problem(
                path,
                f"needs checkpoints to choose from: set `save_steps` to a multiple of `eval_steps` ({t.eval_steps})",
            )
        ]
    if (t.save_steps < 1) != (t.eval_steps < 1):
        message = (
            f"`save_steps` ({t.save_steps}) and `eval_steps` ({t.eval_steps}) mix a fraction and a step count, "
            "so HF cannot guarantee each checkpoint was evaluated; give both as steps or both as fractions"
        )
        return [Problem(path, message)]
    ratio = t.save_steps / t.eval_steps
    if not math.isclose(ratio, round(ratio), abs_tol=1e-9):
        fix = round(math.ceil(ratio) * t.eval_steps, 10)
        message = (
            f"`save_steps` ({t.save_steps}) must be a multiple of `eval_steps` ({t.eval_steps}), as in HF, "
            f"so every checkpoint has an evaluation; e.g. save_steps: {num(fix)}"
        )
        return [Problem(path, message)]
    return []


def _early_stopping(cfg: TunewiseConfig) -> list[Problem]:
    t = cfg.training
    if t.early_stopping_patience is None or t.eval_steps is not None:
        return []
    message = (
        "needs evaluations during training, but `eval_steps` is null (evaluation runs only before and "
        "after training); set `eval_steps` (e.g. 50) or remove early_stopping_patience"
    )
    return [Problem("training.early_stopping_patience", message)]


def _max_steps_wins(cfg: TunewiseConfig) -> list[Problem]:
    t = cfg.training
    if t.max_steps > 0 and "num_train_epochs" in t.model_fields_set:
        message = f"ignored: `max_steps` ({t.max_steps}) > 0 sets the length of training, as in HF"
        return [Problem("training.num_train_epochs", message, "info")]
    return []


def _greedy_ignores_sampling(cfg: TunewiseConfig) -> list[Problem]:
    g = cfg.generation
    if g.do_sample and g.temperature != 0:
        return []
    if g.do_sample:
        # Fix (test_config.py): generate_kwargs reads temperature 0 as greedy even with do_sample (transformers
        # rejects 0 when sampling), and the top_p/top_k set beside it were dropped without a word.
        keys: tuple[str, ...] = ("top_p", "top_k")
        message = (
            "ignored: `temperature: 0` means greedy decoding (always the most likely token), even with "
            "`do_sample: true`; set a temperature above 0 to sample"
        )
    else:
        # temperature 0 asks for greedy decoding, which is what it gets.
        keys = ("top_p", "top_k") if g.temperature == 0 else ("temperature", "top_p", "top_k")
        message = "ignored: `do_sample` is false, so decoding is greedy (always the most likely token); set `do_sample: true`"
    return [Problem(f"generation.{k}", message, "warning") for k in _changed(cfg, "generation") if k in keys]


ADAM_KEYS = ("adam_beta1", "adam_beta2", "adam_epsilon")


def _adam_settings_unused(cfg: TunewiseConfig) -> list[Problem]:
    """Fix (test_config.py): with sgd the adam_* values were dropped without a word (adafactor's note came only
    in `train`, and for the defaults too): a value set there is a warning, in the plan."""
    t = cfg.training
    why = {
        "sgd": "SGD keeps no Adam moments and has no epsilon",
        "adafactor": "Adafactor has decay rates and epsilons of its own, which HF leaves at their defaults",
    }.get(t.optim)
    if why is None:
        return []
    message = f"ignored: `optim: {t.optim}` does not read it ({why}); remove it, or use an AdamW optim"
    return [Problem(f"training.{k}", message, "warning") for k in _changed(cfg, "training") if k in ADAM_KEYS]


def _batch(cfg: TunewiseConfig) -> list[Problem]:
    t = cfg.training
    autos = [
        k for k in ("per_device_train_batch_size", "gradient_accumulation_steps") if getattr(t, k) == "auto"
    ]
    if autos and t.effective_batch_size is None:
        message = (
            f"not set: `{autos[0]}: auto` targets {DEFAULT_EFFECTIVE_BATCH_SIZE} sequences per optimizer "
            "update (tunewise's default); set `effective_batch_size` to choose another"
        )
        return [Problem("training.effective_batch_size", message, "info")]
    if not autos and t.effective_batch_size is not None:
        message = (
            "ignored: it only drives the `auto` batch rule, and per_device_train_batch_size and "
            "gradient_accumulation_steps are both numbers; set one of them to auto"
        )
        return [Problem("training.effective_batch_size", message, "warning")]
    return []


def _token_budget(cfg: TunewiseConfig) -> list[Problem]:
    budget, d, path = cfg.training.max_tokens_per_micro_batch, cfg.data, "training.max_tokens_per_micro_batch"
    if budget is None:
        return []
    if not d.packing:
        message = (
            "needs `data.packing: true`: it re-cuts each step's examples into packed rows (a padded "
            "micro-batch holds per_device_train_batch_size x its longest example); set packing: true or remove it"
        )
        return [Problem(path, message)]
    if budget < d.max_seq_length:
        message = (
            f"{budget} is below data.max_seq_length ({d.max_seq_length}), so an example of that length "
            f"would not fit in a row; set it to at least {d.max_seq_length} or lower max_seq_length"
        )
        return [Problem(path, message)]
    return []


def _metric(cfg: TunewiseConfig) -> list[Problem]:
    t, path = cfg.training, "training.metric_for_best_model"
    metric, task = t.metric_for_best_model, cfg.evaluation.task_metric
    if metric not in METRICS:
        match = suggest(metric, METRICS)
        hint = f"; did you mean `{match}`?" if match else ""
        return [Problem(path, f"unknown metric `{metric}`; choose one of {', '.join(METRICS)}{hint}")]
    if metric not in LOWER_IS_BETTER and task not in ("auto", metric):
        message = f"`{metric}` is computed only when `task_metric` is {metric} or auto (it is {task})"
        return [Problem(path, message)]
    if t.greater_is_better is not None and t.greater_is_better == (metric in LOWER_IS_BETTER):
        better = "lower" if metric in LOWER_IS_BETTER else "higher"
        message = (
            f"`{metric}` is {better}-is-better; remove `greater_is_better` (the default follows the metric)"
        )
        return [Problem("training.greater_is_better", message)]
    return []


QDORA_PEFT = (0, 10, 0)
"""PEFT release that added DoRA on bitsandbytes 4/8-bit layers (QDoRA, huggingface/peft#1518)."""


def peft_version() -> tuple[int, ...] | None:
    try:
        return tuple(int(p) for p in re.findall(r"\d+", metadata.version("peft"))[:3])
    except metadata.PackageNotFoundError:
        return None


def _dora(cfg: TunewiseConfig) -> list[Problem]:
    quantized = _loads_in_4bit(cfg) or cfg.quantization.load_in_8bit
    version = peft_version()
    if not (cfg.adapter.use_dora and quantized and version is not None and version < QDORA_PEFT):
        return []
    installed, needed = ".".join(map(str, version)), ".".join(map(str, QDORA_PEFT))
    message = f"DoRA on a quantised base needs peft >= {needed} (installed {installed}); upgrade peft or set it false"
    return [Problem("adapter.use_dora", message)]


def _changed(cfg: TunewiseConfig, section: str) -> list[str]:
    """Keys of a section whose value differs from the default (a saved config sets every key)."""
    values = getattr(cfg, section)
    fields = type(values).model_fields
    return [k for k, f in fields.items() if getattr(values, k) != f.get_default(call_default_factory=True)]


def _ignored_settings(cfg: TunewiseConfig) -> list[Problem]:
    problems = []
    if cfg.adapter.method == "full":
        why = "ignored: `method: full` trains every weight and builds no adapter"
        problems += [
            Problem(f"adapter.{k}", why, "warning") for k in _changed(cfg, "adapter") if k != "method"
        ]
    if not _loads_in_4bit(cfg):
        why = "ignored: the base is not loaded in 4 bit (`load_in_4bit`, or `method: qlora`)"
        keys = [k for k in _changed(cfg, "quantization") if k.startswith("bnb_4bit")]
        problems += [Problem(f"quantization.{k}", why, "warning") for k in keys]
    return problems


def _validation_twice(cfg: TunewiseConfig) -> list[Problem]:
    """Two sources of validation rows: refused (as `build_data` would, after loading the model) before loading."""
    data = cfg.data
    if data.validation_split is None:
        return []
    if data.validation_file is not None:
        why = "`validation_file` supplies the validation rows; remove one of `validation_file` and `validation_split`"
        return [Problem("data.validation_split", why)]
    builtins = [
        d
        for d in ([data.dataset] if isinstance(data.dataset, str) else data.dataset)
        if d.startswith(BUILTIN_PREFIX)
    ]
    if builtins:
        why = f"`{builtins[0]}` brings its own validation rows; remove `validation_split`"
        return [Problem("data.validation_split", why)]
    return []


_ADAPTER_KEYS = tuple(SECTIONS["adapter"].model_fields)
_QUANT_KEYS = tuple(SECTIONS["quantization"].model_fields)

_RULES: tuple[tuple[tuple[str, ...], Callable[[TunewiseConfig], list[Problem]]], ...] = (
    # (the keys a rule reads, the rule)
    (("precision", "bf16", "fp16"), _precision_flags),
    (("warmup_steps", "warmup_ratio"), _warmup_twice),
    (("lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "warmup_ratio"), _schedule),
    (("method", *_QUANT_KEYS), _quantization),
    (("load_best_model_at_end", "eval_steps", "save_steps"), _load_best),
    (("early_stopping_patience", "eval_steps"), _early_stopping),
    (("max_steps", "num_train_epochs"), _max_steps_wins),
    (("do_sample", "temperature", "top_p", "top_k"), _greedy_ignores_sampling),
    (("optim", *ADAM_KEYS), _adam_settings_unused),
    (("per_device_train_batch_size", "gradient_accumulation_steps", "effective_batch_size"), _batch),
    (("max_tokens_per_micro_batch", "packing", "max_seq_length"), _token_budget),
    (("metric_for_best_model", "greater_is_better", "task_metric"), _metric),
    (("use_dora", "method", *_QUANT_KEYS), _dora),
    ((*_ADAPTER_KEYS, *_QUANT_KEYS), _ignored_settings),
    (("dataset", "validation_file", "validation_split"), _validation_twice),
)
