"""Resolve `auto` values into concrete ones, each with its provenance.

Every automatic choice is a small pure function returning the value and the reason; an explicit
user value always wins and is recorded as such. Hardware is passed in (`Hardware`) so tests can fake
it. Step-dependent values (total steps, warmup, cadence) need the dataset size and are resolved
after the data is built, by `resolve_steps`; the task metric needs the validation answers (`resolve_task_metric`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tunewise.config.load import user_set_paths
from tunewise.config.problems import ConfigError, Problem
from tunewise.config.rules import LOWER_IS_BETTER
from tunewise.config.schema import DEFAULT_EFFECTIVE_BATCH_SIZE, TunewiseConfig
from tunewise.eval.metrics import choose_task_metric
from tunewise.models.kernels import cpu_has_bf16_matmuls
from tunewise.training.schedule import StepPlan, compute_step_plan, resolve_interval, resolve_warmup_steps


@dataclass(frozen=True)
class Hardware:
    device_type: str  # "cpu" | "cuda" | "mps"
    # On a GPU, bf16 support. On CPU, bf16 matmuls in hardware (AMX or AVX512_BF16), measured faster than
    # fp32 (bench/cpu_bf16.py, docs/performance.md); without them oneDNN emulates bf16, several times slower.
    bf16_supported: bool
    world_size: int = 1


def probe_hardware(world_size: int = 1) -> Hardware:
    if torch.cuda.is_available():
        return Hardware("cuda", torch.cuda.is_bf16_supported(), world_size)
    return Hardware("cpu", _cpu_has_bf16_matmuls(), world_size)


def _cpu_has_bf16_matmuls() -> bool:
    return cpu_has_bf16_matmuls()  # a seam of its own: the test suite patches this one, not the kernel's


# Where accelerate's PartialState, which `tunewise train` asks, finds the process count (accelerate/state.py:
# _prepare_backend; utils/environment.py: get_cpu_distributed_information): torchrun and `accelerate launch` set
# WORLD_SIZE and LOCAL_RANK; on CPU it also reads MPI launchers' variables.
_WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def choose_world_size(
    environ: Mapping[str, str], device_type: str, requested: int | None = None
) -> tuple[int, str]:
    """The processes `tunewise train` would run with, read from `environ` as accelerate reads it, and why: the
    launcher's count under torchrun or `accelerate launch`; otherwise `requested` (`tunewise plan --processes N`,
    a launch planned from outside it), else 1. A `requested` count that the launcher contradicts is an error."""
    names = _WORLD_SIZE_VARIABLES if device_type == "cpu" else ("WORLD_SIZE",)
    found = [(name, int(environ[name])) for name in names if int(environ.get(name, -1)) >= 0]
    name, size = found[0] if found else ("WORLD_SIZE", 1)
    # On a GPU accelerate starts a process group only under LOCAL_RANK; on CPU also for a size above 1.
    launched = int(environ.get("LOCAL_RANK", -1)) != -1 or (device_type == "cpu" and size > 1)
    if launched and requested is not None and requested != size:
        raise ValueError(
            f"--processes {requested}, but the launcher started {size} ({name}={size}), which train would use: "
            f"leave out --processes, or launch {requested} processes"
        )
    if launched:
        return size, f"{name}={size}, set by the launcher"
    if requested is not None:
        return requested, f"--processes {requested}: a torchrun or accelerate launch of {requested}"
    return 1, "not started by a launcher; --processes N plans a torchrun or accelerate launch of N"


@dataclass(frozen=True)
class Choice:
    value: Any
    source: str  # "user" | "default" | "auto"
    reason: str = ""


@dataclass
class Resolution:
    config: TunewiseConfig
    choices: dict[str, Choice] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    user: set[str] = field(default_factory=set)  # paths the user set, taken before any resolution

    def record(self, path: str, value: Any, source: str, reason: str = "") -> None:
        self.choices[path] = Choice(value, source, reason)


# ---------------------------------------------------------------- rules (pure, value + reason)


def choose_precision(hw: Hardware) -> tuple[str, str]:
    if hw.device_type == "cuda":
        if hw.bf16_supported:
            return "bf16", "GPU supports bf16: fp32's exponent range, no loss scaling needed"
        return "fp16", "GPU lacks bf16; fp16 with dynamic loss scaling"
    if hw.bf16_supported:
        # A compiled packed LoRA step in bf16 against fp32: 1.49x with AMX (Xeon), 1.45-1.76x with
        # AVX512_BF16 alone (AMD EPYC Zen 4); its matmuls 5.7x and 2.2x fp32's rate.
        why = "this CPU multiplies bf16 in hardware (AMX or AVX512_BF16): bf16 autocast measured 1.5x fp32"
        return "bf16", f"{why} on such CPUs (docs/performance.md)"
    why = f"on {hw.device_type} without bf16 matmul instructions bf16 autocast is not faster than fp32"
    return "fp32", f"{why} (docs/performance.md)"


CPU_BF16_PAD_MULTIPLE = 64
CPU_MICRO_BATCH_CAP = 4


def choose_cpu_bf16_pad_multiple() -> tuple[int, str]:
    # oneDNN, which runs torch's bf16 matmuls on CPU, JIT-compiles a kernel for every new matrix shape
    # (fp32 goes to MKL, which does not). Batches whose token count differs every step pay that each
    # time: four bf16 matmuls of a new row count each took 15 ms against 2.7 ms for a repeated one
    # (fp32: 11 ms). Rounding each micro-batch up to a multiple of 64 tokens lets a few shapes recur.
    why = (
        f"bf16 on CPU: oneDNN compiles a kernel per new batch shape; {CPU_BF16_PAD_MULTIPLE} lets shapes "
        "recur for a few pad tokens (docs/performance.md)"
    )
    return CPU_BF16_PAD_MULTIPLE, why


def choose_learning_rate(method: str) -> tuple[float, str]:
    # 2e-4 is the QLoRA paper's rate for models up to 13B (Dettmers et al. 2023, table 9) and
    # PEFT's usual LoRA default; full fine-tuning moves every weight, so ~10x lower (Alpaca: 2e-5).
    if method == "full":
        return 2e-5, "full fine-tuning default (Alpaca recipe: 2e-5)"
    return 2e-4, f"{method} default (QLoRA paper: 2e-4)"


def choose_batch(effective: int, world_size: int, cap: int) -> tuple[int, int, str]:
    """Both batch keys `auto`: the largest per-device batch <= cap that divides the per-device share of
    `effective`, and the accumulation that makes up the rest."""
    if effective % world_size:
        raise ValueError(f"{effective} is not divisible by the {world_size} devices")
    share = effective // world_size
    per_device = max(d for d in range(1, min(cap, share) + 1) if share % d == 0)
    accumulation = share // per_device
    reason = f"{effective} = {per_device} per device x {accumulation} accumulation x {world_size} devices"
    return per_device, accumulation, reason


def choose_batch_key(effective: int, world_size: int, given_key: str, given: int) -> tuple[int, str]:
    """One batch key `auto`, the other (`given_key`) a number the user set: the auto one is `effective` /
    (given x devices). The number is kept as it is, so an effective batch it does not divide is an error, not a
    rounding of either."""
    per_given = given * world_size
    if effective % per_given:
        nearest = sorted(
            {n for n in (effective // per_given * per_given, -(-effective // per_given) * per_given) if n}
        )
        raise ValueError(
            f"{effective} sequences per step is not a multiple of {given_key} {given} x {world_size} device(s) "
            f"(yours, so it is kept); set effective_batch_size to {' or '.join(map(str, nearest))}, or "
            f"{given_key}: auto too"
        )
    derived = effective // per_given
    per_device, accumulation = (
        (given, derived) if given_key == "per_device_train_batch_size" else (derived, given)
    )
    reason = (
        f"{effective} = {per_device} per device x {accumulation} accumulation x {world_size} devices, "
        f"{given_key} yours"
    )
    return derived, reason


def choose_torch_dtype(precision: str, method: str) -> str:
    """The dtype the base loads in: adapters keep fp32 master weights, so a frozen base can live in bf16 to
    halve its memory; a full fine-tune trains its weights, which stay fp32 under autocast."""
    return "bfloat16" if precision == "bf16" and method != "full" else "float32"


def choose_warmup_ratio() -> tuple[float, str]:
    # 3% warmup is the Alpaca / QLoRA recipes' value: enough to tame Adam's first noisy steps.
    return 0.03, "3% of total steps (Alpaca/QLoRA recipes)"


# ---------------------------------------------------------------- resolution


def choose_output_dir(config_file: Path | None) -> tuple[str, str] | None:
    """runs/<the config file's name>, so two experiments' configs write two run directories; None without a
    file (defaults, a dict), which keeps the schema's runs/quickstart."""
    if config_file is None:
        return None
    return f"runs/{config_file.stem}", f"named after {config_file.name}"


def resolve_static(cfg: TunewiseConfig, hw: Hardware, config_file: Path | None = None) -> Resolution:
    """Resolve everything that does not depend on the dataset; `config_file`: the YAML it came from."""
    user = user_set_paths(cfg)
    cfg = cfg.model_copy(deep=True)
    res = Resolution(cfg, user=user)
    t, a, q = cfg.training, cfg.adapter, cfg.quantization

    def keep(path: str, value: Any) -> None:
        res.record(path, value, "user" if path in user else "default")

    if t.bf16 or t.fp16:
        precision, src, why = ("bf16" if t.bf16 else "fp16"), "user", "from the HF flag"
    elif t.precision == "auto":
        (precision, why), src = choose_precision(hw), "auto"
    else:
        precision, src, why = t.precision, "user" if "training.precision" in user else "default", ""
    if precision == "fp16" and hw.device_type == "cpu":
        # accelerate applies neither fp16 autocast nor loss scaling on CPU: the run would silently be fp32.
        raise ConfigError(
            [
                Problem(
                    "training.precision",
                    "fp16 needs a GPU (no fp16 autocast or loss scaling on CPU); use fp32 or bf16",
                )
            ]
        )
    t.precision, t.bf16, t.fp16 = precision, precision == "bf16", precision == "fp16"  # type: ignore[assignment]
    res.record("training.precision", precision, src, why)

    if t.learning_rate == "auto":
        lr, why = choose_learning_rate(a.method)
        t.learning_rate = lr
        res.record("training.learning_rate", lr, "auto", why)
    else:
        keep("training.learning_rate", t.learning_rate)

    batch_keys = ("per_device_train_batch_size", "gradient_accumulation_steps")
    autos = [k for k in batch_keys if getattr(t, k) == "auto"]
    if autos:
        effective = t.effective_batch_size or DEFAULT_EFFECTIVE_BATCH_SIZE
        # CPU: micro-batches of 4 packed examples trained as fast as one of 8 at 60-70% of its peak RSS
        # (SmolLM2 LoRA: bf16 on an AMX Xeon 520 vs 517 tokens/s, 2.8 vs 4.6 GiB; fp32 on an older Xeon
        # 353 vs 354, 3.3 vs 4.7 GiB), and smaller padded batches pad less (docs/performance.md).
        cap = CPU_MICRO_BATCH_CAP if hw.device_type == "cpu" else 16
        # Fix (test_resolve.py): with one key auto, a number the user set for the other was chosen afresh too
        # (accumulation 1 became 4, a per-device batch 8 became 6), recorded as auto; now it stays. One left at
        # its default is no choice of theirs: the rule picks it with the auto one.
        given = [k for k in batch_keys if k not in autos and f"training.{k}" in user]
        try:
            if given:
                value, why = choose_batch_key(effective, hw.world_size, given[0], getattr(t, given[0]))
                chosen = {other: value for other in batch_keys if other != given[0]}
            else:
                per_device, accumulation, why = choose_batch(effective, hw.world_size, cap)
                chosen = dict(zip(batch_keys, (per_device, accumulation), strict=True))
        except ValueError as error:
            raise ConfigError([Problem("training.effective_batch_size", str(error))]) from None
        for key in batch_keys:
            if key in chosen:
                setattr(t, key, chosen[key])
                res.record(f"training.{key}", chosen[key], "auto", why)
            else:
                res.record(f"training.{key}", getattr(t, key), "user")
        t.effective_batch_size = None  # now spelled out by the two keys above, as config.yaml records
    else:
        keep("training.per_device_train_batch_size", t.per_device_train_batch_size)
        keep("training.gradient_accumulation_steps", t.gradient_accumulation_steps)

    if precision == "bf16" and hw.device_type == "cpu" and "data.pad_to_multiple_of" not in user:
        multiple, why = choose_cpu_bf16_pad_multiple()
        cfg.data.pad_to_multiple_of = multiple
        res.record("data.pad_to_multiple_of", multiple, "auto", why)
    else:
        keep("data.pad_to_multiple_of", cfg.data.pad_to_multiple_of)

    if q.load_in_4bit == "auto":
        q.load_in_4bit = a.method == "qlora"
        res.record("quantization.load_in_4bit", q.load_in_4bit, "auto", f"method is {a.method}")
    compute = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[precision]
    if q.bnb_4bit_compute_dtype == "auto" and q.load_in_4bit:
        q.bnb_4bit_compute_dtype = compute  # type: ignore[assignment]
        res.record("quantization.bnb_4bit_compute_dtype", compute, "auto", f"follows precision {precision}")
    if cfg.model.torch_dtype == "auto":
        dtype = choose_torch_dtype(precision, a.method)
        cfg.model.torch_dtype = dtype  # type: ignore[assignment]
        res.record("model.torch_dtype", dtype, "auto", f"{precision} training, method {a.method}")
    if t.memory_check == "auto":
        t.memory_check = hw.device_type != "cpu"
        why = (
            "an out-of-memory there raises, after the first step rather than hours in"
            if t.memory_check
            else "on CPU the kernel's OOM killer ends the process instead of an error (a failed allocation is "
            "still caught and saved)"
        )
        res.record("training.memory_check", t.memory_check, "auto", f"{hw.device_type}: {why}")
    else:
        keep("training.memory_check", t.memory_check)
    if t.data_seed is None:
        t.data_seed = t.seed
        res.record("training.data_seed", t.seed, "auto", "same as seed")
    if "training.output_dir" not in user and (named := choose_output_dir(config_file)):
        t.output_dir, why = named
        res.record("training.output_dir", t.output_dir, "auto", why)
    if t.greater_is_better is None:
        t.greater_is_better = t.metric_for_best_model not in LOWER_IS_BETTER
    return res


@dataclass(frozen=True)
class StepsResolution:
    plan: StepPlan
    warmup_steps: int
    logging_steps: int
    eval_steps: int | None
    save_steps: int | None


def resolve_steps(res: Resolution, num_train_examples: int, world_size: int) -> StepsResolution:
    t = res.config.training
    user = res.user
    plan = compute_step_plan(
        num_train_examples,
        int(t.per_device_train_batch_size),
        int(t.gradient_accumulation_steps),
        world_size,
        t.num_train_epochs,
        t.max_steps,
    )
    if t.warmup_steps is None and t.warmup_ratio is None and t.lr_scheduler_type == "constant":
        warmup = 0
        res.record("training.warmup_steps", 0, "auto", "the `constant` schedule has no warmup (HF)")
    elif t.warmup_steps is None and t.warmup_ratio is None:
        ratio, why = choose_warmup_ratio()
        warmup = math.ceil(ratio * plan.total_steps)
        why = f"{why}: ceil({ratio} x {plan.total_steps})"
        if warmup >= plan.total_steps:
            # Fix (test_resolve.py): ceil gave a 1-step run 1 warmup step, so its one update ran at rate 0.
            warmup, why = plan.total_steps - 1, f"{why}, less than the {plan.total_steps}-step run"
        res.record("training.warmup_steps", warmup, "auto", why)
    else:
        warmup, why = resolve_warmup_steps(plan.total_steps, t.warmup_steps, t.warmup_ratio)
        res.record("training.warmup_steps", warmup, "user", why)
    intervals = {}
    for key in ("logging_steps", "eval_steps", "save_steps"):
        value = resolve_interval(getattr(t, key), plan.total_steps)
        intervals[key] = value
        source = "user" if f"training.{key}" in user else "default"
        res.record(f"training.{key}", value, source)
    res.record("training.total_steps", plan.total_steps, "auto", plan.reason)
    return StepsResolution(
        plan, warmup, intervals["logging_steps"] or 1, intervals["eval_steps"], intervals["save_steps"]
    )


def cadence_problems(cfg: TunewiseConfig, steps: StepsResolution) -> list[Problem]:
    """`load_best_model_at_end` on the resolved cadence: every checkpoint needs an evaluation of its own step.

    Fix (test_resolve.py): the config rule (rules.py) compares the values as written, and fractions that are
    multiples there (save_steps 0.6, eval_steps 0.3) are each rounded up on their own (of 7 steps: 5 and 3), so
    no checkpoint had an evaluation and none could be loaded as the best."""
    t, every, save = cfg.training, steps.eval_steps, steps.save_steps
    if not t.load_best_model_at_end or every is None or save is None or save % every == 0:
        return []
    multiple = -(-save // every) * every
    message = (
        f"`save_steps` {t.save_steps} and `eval_steps` {t.eval_steps} come to {save} and {every} of the "
        f"{steps.plan.total_steps} steps, and {save} is not a multiple of {every}, so no checkpoint would have an "
        f"evaluation to be the best; give both as step counts, e.g. eval_steps: {every} and save_steps: {multiple}"
    )
    return [Problem("training.load_best_model_at_end", message)]


def resolve_task_metric(res: Resolution, references: list[str] | None) -> tuple[str | None, list[Problem]]:
    """The task metric every evaluation computes, chosen once from the validation answers (`references`; None
    for plain-text data, which has no prompt to answer) and recorded when it was `auto`, with the problem of a
    metric_for_best_model it does not compute.

    Fix (test_resolve.py): `metric_for_best_model: exact_match` passed the config rules under `task_metric: auto`,
    auto then chose json_exact_match (or the data was plain text), and the loop never saw the metric: no best
    checkpoint and no early stopping, silently. A metric the run will not compute is refused here, so `plan` says
    so too.
    """
    requested, wanted = res.config.evaluation.task_metric, res.config.training.metric_for_best_model
    metric = None if references is None else choose_task_metric(requested, references)
    if references is None:
        why = "plain-text data has no prompt to answer"
    elif metric == "json_exact_match":
        why = "every validation answer is a JSON object or array"
    else:
        why = "the validation answers are not all JSON"
    if requested == "auto":
        res.record("evaluation.task_metric", metric or "none", "auto", why)
    elif metric is None and requested != "none":
        res.notes.append(f"evaluation.task_metric: {requested} is not computed: {why}")
    if wanted in LOWER_IS_BETTER or wanted == metric:
        return metric, []
    if metric is None:
        fix = "set metric_for_best_model: eval_loss (or eval_perplexity), or use chat-like data"
        computed = why
    else:
        fix = f"set metric_for_best_model: {metric}, or evaluation.task_metric: {wanted}"
        computed = f"task_metric {requested} chose {metric} ({why})"
    message = (
        f"`{wanted}` is never computed: {computed}, so early stopping and load_best_model_at_end would have no "
        f"metric to follow; {fix}"
    )
    return metric, [Problem("training.metric_for_best_model", message)]
