"""Read a config (YAML file or dict, plus ``--set KEY=VALUE`` overrides) into a validated ``TunewiseConfig``.

Every problem is collected and raised once, in one ``ConfigError``: unknown keys at any depth with a
did-you-mean, wrong types and out-of-range values with the allowed domain, and the cross-field rules
of :func:`check_config`. Each problem names its config path and, when known, where the value came
from (``train.yaml:7`` or ``--set``).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails

from tunewise.config.schema import (
    DEFAULT_EFFECTIVE_BATCH_SIZE,
    SECTIONS,
    TunewiseConfig,
    _leaf_types,
    all_keys,
    field_doc,
)

Severity = Literal["error", "warning", "info"]
Loc = tuple[str, ...]

METRICS = ("eval_loss", "eval_perplexity", "exact_match", "json_exact_match")
"""What `metric_for_best_model` can name: the two loss metrics and the task metrics."""
LOWER_IS_BETTER = ("eval_loss", "eval_perplexity")

# Names other fine-tuning tools use for our keys (HF's example scripts, axolotl, LLaMA-Factory, litgpt,
# torchtune, TRL), so a habit from elsewhere gets a pointer to the right key rather than a bare "unknown key"
# or a near spelling of another one (`train_file` is closer to `validation_file` than to `dataset`).
ALIASES = {
    "train_file": "dataset",
    "dataset_name": "dataset",
    "datasets": "dataset",
    "data_path": "dataset",
    "data_files": "dataset",
    "eval_file": "validation_file",
    "eval_dataset": "validation_file",
    "lora_rank": "r",
    "lora_target": "target_modules",
    "lora_target_linear": "target_modules",
    "cutoff_len": "max_seq_length",
    "block_size": "max_seq_length",
    "template": "chat_template",
    "train_batch_size": "per_device_train_batch_size",
    "eval_batch_size": "per_device_eval_batch_size",
    "num_steps": "max_steps",
    "total_steps": "max_steps",
    "num_warmup_steps": "warmup_steps",
    "mixed_precision": "precision",
    "gradient_clipping": "max_grad_norm",
    "clip_grad_norm": "max_grad_norm",
    "quant_type": "bnb_4bit_quant_type",
    "lr": "learning_rate",
    "lora_r": "r",
    "rank": "r",
    "alpha": "lora_alpha",
    "epochs": "num_train_epochs",
    "num_epochs": "num_train_epochs",
    "batch_size": "per_device_train_batch_size",
    "micro_batch_size": "per_device_train_batch_size",
    "global_batch_size": "effective_batch_size",
    "grad_accum": "gradient_accumulation_steps",
    "gradient_accumulation": "gradient_accumulation_steps",
    "max_length": "max_seq_length",
    "sequence_len": "max_seq_length",
    "base_model": "model_name_or_path",
    "model_name": "model_name_or_path",
    "dtype": "torch_dtype",
    "lora_target_modules": "target_modules",
    "scheduler": "lr_scheduler_type",
    "lr_scheduler": "lr_scheduler_type",
    "optimizer": "optim",
    "grad_clip": "max_grad_norm",
    "sample_packing": "packing",
    "val_set_size": "validation_split",
}


@dataclass(frozen=True)
class Problem:
    path: str
    """Dotted config path (`training.learning_rate`), or file:line for a YAML syntax error."""
    message: str
    """What is wrong and what to do, in one line."""
    severity: Severity = "error"
    source: str = ""
    """Where the value came from: `train.yaml:7`, `--set`, or empty when unknown (a dict, a default)."""

    def __str__(self) -> str:
        where = f"  [{self.source}]" if self.source else ""
        return f"{self.path}: {self.message}{where}"


class ConfigError(ValueError):
    """Every problem found in a config, raised once."""

    def __init__(self, problems: Sequence[Problem], origin: str = "") -> None:
        order = {"error": 0, "warning": 1, "info": 2}
        self.problems = sorted(problems, key=lambda p: order[p.severity])
        errors = sum(p.severity == "error" for p in self.problems)
        head = f"invalid config{f' {origin}' if origin else ''} ({errors} error{'s' * (errors != 1)}):"
        lines = [f"  {'' if p.severity == 'error' else p.severity + ': '}{p}" for p in self.problems]
        super().__init__("\n".join([head, *lines]))


# ---------------------------------------------------------------------------------------------- load


def load_config(
    source: str | Path | dict[str, Any] | TunewiseConfig | None, overrides: Sequence[str] = ()
) -> TunewiseConfig:
    """A validated config from a YAML file, a dict, a config or nothing (defaults), plus `--set` overrides.

    Raises ``ConfigError`` listing every problem when any has severity "error"; warnings and infos
    are not raised: ``check_config`` returns them for the plan to show.
    """
    origin = str(source) if isinstance(source, str | Path) else ""
    raw, sources = _read_source(source, origin)
    problems = _apply_overrides(raw, overrides, sources)
    cfg, schema_problems, invalid = _validate(raw, sources)
    problems += schema_problems
    if cfg is not None:
        problems += [_with_source(p, sources) for p in _cross_field(cfg, skip=invalid)]
    if any(p.severity == "error" for p in problems):
        raise ConfigError(problems, origin)
    assert cfg is not None  # no error means the first validation succeeded
    return cfg


def _with_source(problem: Problem, sources: dict[Loc, str]) -> Problem:
    return dataclasses.replace(problem, source=sources.get(tuple(problem.path.split(".")), ""))


def _read_source(
    source: str | Path | dict[str, Any] | TunewiseConfig | None, origin: str
) -> tuple[dict[Any, Any], dict[Loc, str]]:
    if source is None:
        return {}, {}
    if isinstance(source, TunewiseConfig):
        # Only what was set explicitly, so provenance (`user_set_paths`) survives the round trip.
        return source.model_dump(exclude_unset=True), {}
    if isinstance(source, dict):
        return _as_mapping(copy.deepcopy(source), "config"), {}
    data, sources = _read_yaml(Path(source))
    return _as_mapping(data, origin), sources


def _as_mapping(data: Any, where: str) -> dict[Any, Any]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        sections = ", ".join(SECTIONS)
        got = type(data).__name__
        raise ConfigError([Problem(where, f"must be a mapping of sections ({sections}), got a {got}")])
    # `training:` with nothing under it reads as null; treat it as an empty section.
    return {k: ({} if v is None and k in SECTIONS else v) for k, v in data.items()}


class _Loader(yaml.SafeLoader):
    """Safe YAML with YAML 1.2 floats: PyYAML alone reads `1e-4` (no dot) as a string."""


class _Dumper(yaml.SafeDumper):
    """Quotes every string `_Loader` would read as a number, so dumps load back unchanged."""


_FLOAT_12 = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
    re.VERBOSE,
)
for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_12, list("-+0123456789."))


def _read_yaml(path: Path) -> tuple[Any, dict[Loc, str]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([Problem(str(path), "config file not found")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([Problem(str(path), f"cannot read the config file: {exc}")]) from None
    loader = None
    try:
        loader = _Loader(text)
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        column = f" (column {mark.column + 1})" if mark else ""
        raise ConfigError(
            [Problem(where, f"YAML syntax error: {exc.problem or exc.context}{column}")]
        ) from None
    except yaml.YAMLError as exc:  # e.g. a control character, which YAML forbids anywhere
        raise ConfigError([Problem(str(path), f"YAML error: {exc}")]) from None
    finally:
        if loader is not None:
            loader.dispose()
    lines: dict[Loc, str] = {}
    duplicates = _line_map(node, (), str(path), lines)
    if duplicates:
        raise ConfigError(duplicates, str(path))
    return data, lines


def _line_map(node: yaml.Node | None, prefix: Loc, file: str, lines: dict[Loc, str]) -> list[Problem]:
    """Fill `lines` with path -> file:line for every mapping key; return keys given twice."""
    duplicates: list[Problem] = []
    if not isinstance(node, yaml.MappingNode):
        return duplicates
    for key_node, value_node in node.value:
        loc = (*prefix, str(key_node.value))
        here = f"{file}:{key_node.start_mark.line + 1}"
        if loc in lines:
            message = f"given twice ({lines[loc]} and line {key_node.start_mark.line + 1}); keep one"
            duplicates.append(Problem(".".join(loc), message, source=here))
        lines[loc] = here
        duplicates += _line_map(value_node, loc, file, lines)
    return duplicates


# ------------------------------------------------------------------------------------------ overrides


def override_path(item: str) -> str:
    """The dotted config path a `--set KEY=VALUE` writes (`learning_rate=1` -> `training.learning_rate`)."""
    loc = tuple(item.partition("=")[0].strip().split("."))
    if loc[0] not in SECTIONS and loc[0] in all_keys():
        loc = (all_keys()[loc[0]], *loc)
    return ".".join(loc)


def _apply_overrides(raw: dict[Any, Any], overrides: Iterable[str], sources: dict[Loc, str]) -> list[Problem]:
    """Write each `KEY=VALUE` into `raw`: KEY is `section.key`, a bare key, or deeper (`key.sub`)."""
    problems = []
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            message = f"`{item}` is not KEY=VALUE (e.g. --set learning_rate=1e-4 or --set training.seed=1)"
            problems.append(Problem("--set", message, source="--set"))
            continue
        loc = tuple(override_path(key).split("."))
        try:
            value = yaml.load(text, Loader=_Loader)  # _Loader is a SafeLoader
        except yaml.YAMLError as exc:
            reason = getattr(exc, "problem", None) or exc
            problems.append(
                Problem(".".join(loc), f"cannot read `{text}` as a YAML value: {reason}", source="--set")
            )
            continue
        problems += _set_path(raw, loc, value)
        sources[loc[:2]] = "--set"
    return problems


def _set_path(raw: dict[Any, Any], loc: Loc, value: Any) -> list[Problem]:
    node = raw
    for depth, part in enumerate(loc[:-1]):
        if node.get(part) is None:
            node[part] = {}
        elif not isinstance(node[part], dict):
            parent = ".".join(loc[: depth + 1])
            return [Problem(".".join(loc), f"cannot set it: `{parent}` is not a mapping", source="--set")]
        node = node[part]
    node[loc[-1]] = value
    return []


# ---------------------------------------------------------------------------------- schema validation


def _validate(
    raw: dict[Any, Any], sources: dict[Loc, str]
) -> tuple[TunewiseConfig | None, list[Problem], set[str]]:
    """The config (with invalid values replaced by defaults, for the cross-field rules), its problems,
    and the leaf keys that were replaced."""
    try:
        return TunewiseConfig.model_validate(raw), [], set()
    except ValidationError as exc:
        grouped: dict[Loc, list[ErrorDetails]] = {}
        for error in exc.errors():
            grouped.setdefault(_field_loc(error), []).append(error)
    problems = [
        Problem(_dotted(loc), _message(loc, errors), source=sources.get(loc) or sources.get(loc[:1], ""))
        for loc, errors in grouped.items()
    ]
    invalid = {key for loc in grouped for key in _leaf_names(loc)}
    try:
        return TunewiseConfig.model_validate(_without(raw, grouped)), problems, invalid
    except ValidationError:
        return None, problems, invalid


def _dotted(loc: Loc) -> str:
    return ".".join(part or '""' for part in loc)  # an empty key name still shows where it is


def _field_loc(error: ErrorDetails) -> Loc:
    """(section, key) without pydantic's union-member tags and list indices; (key,) at the top."""
    loc = tuple(str(part) for part in error["loc"][: 2 if error["loc"][0] in SECTIONS else 1])
    if error["type"] == "invalid_key" and len(error["loc"]) == len(loc):
        loc = (*loc[:-1], show(error["input"]))  # pydantic writes a `true` key as 1
    return loc


def _leaf_names(loc: Loc) -> list[str]:
    if len(loc) == 2:
        return [loc[1]]
    return list(SECTIONS[loc[0]].model_fields) if loc[0] in SECTIONS else []


def _without(raw: dict[Any, Any], locs: Iterable[Loc]) -> dict[Any, Any]:
    """`raw` without the values at `locs`, and without any key that is not a string (never valid)."""

    def strings_only(d: dict[Any, Any]) -> dict[str, Any]:
        return {k: v for k, v in d.items() if isinstance(k, str)}

    cleaned = {k: strings_only(v) if isinstance(v, dict) else v for k, v in strings_only(raw).items()}
    for loc in locs:
        section = cleaned.get(loc[0])
        if len(loc) == 1:
            cleaned.pop(loc[0], None)
        elif isinstance(section, dict):
            section.pop(loc[1], None)
    return cleaned


def _message(loc: Loc, errors: list[ErrorDetails]) -> str:
    kinds = {e["type"] for e in errors}
    value = errors[0]["input"]
    if "invalid_key" in kinds or any("[key]" in e["loc"] for e in errors):  # YAML reads `yes:` as true
        return f"key names must be strings (got {show(value)}; quote it in YAML)"
    if "extra_forbidden" in kinds:
        return unknown_key_message(loc)
    if len(loc) == 1:
        return f"must be a mapping of `{loc[0]}` keys (got {show(value)})"
    field = SECTIONS[loc[0]].model_fields[loc[1]]
    custom = [e for e in errors if e["type"] == "tunewise"]
    if custom:
        return f"{custom[0]['msg']} (got {show(value)})"
    if kinds & {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}:
        return f"must be {bounds_text(field)} (got {show(value)})"
    if kinds & {"string_too_short", "too_short"}:
        return f"must not be empty (got {show(value)})"
    return f"must be {describe(field)} (got {show(value)}){_did_you_mean_value(field, value)}"


def _did_you_mean_value(field: FieldInfo, value: Any) -> str:
    choices = [str(c) for t in _leaf_types(field.annotation) if _is_literal(t) for c in t.__args__]
    match = suggest(value, choices) if isinstance(value, str) else None
    return f"; did you mean `{match}`?" if match else ""


def _is_literal(t: Any) -> bool:
    return getattr(t, "__origin__", None) is Literal


# ------------------------------------------------------------------------- words for types and domains

_TYPE_WORDS = {
    int: "an integer",
    float: "a number",
    str: "a string",
    bool: "true or false",
    list: "a list of strings",
    dict: "a mapping",
    type(None): "null",
}


def describe(field: FieldInfo) -> str:
    """The values a field accepts, in words: `a number > 0 or `auto``."""
    types = _leaf_types(field.annotation)
    if float in types and int in types:
        types.remove(int)  # "a number" covers integers
    bounds = bounds_text(field)
    words = []
    for t in types:
        if _is_literal(t):
            choices = ", ".join(f"`{c}`" for c in t.__args__)
            words.append(choices if len(t.__args__) == 1 else f"one of {choices}")
        else:
            word = _TYPE_WORDS.get(t, getattr(t, "__name__", str(t)))
            words.append(f"{word} {bounds}" if bounds and t in (int, float) else word)
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def bounds_text(field: FieldInfo) -> str:
    """`> 0`, `>= 1`, `in (0, 1]`, ... from the field's (or its union member's) ge/gt/le/lt."""
    b = _bounds(field)
    low = ("[", b["ge"]) if "ge" in b else ("(", b["gt"]) if "gt" in b else None
    high = ("]", b["le"]) if "le" in b else (")", b["lt"]) if "lt" in b else None
    if low and high:
        return f"in {low[0]}{_num(low[1])}, {_num(high[1])}{high[0]}"
    if low:
        return f"{'>=' if low[0] == '[' else '>'} {_num(low[1])}"
    if high:
        return f"{'<=' if high[0] == ']' else '<'} {_num(high[1])}"
    return ""


def _bounds(field: FieldInfo) -> dict[str, float]:
    metadata = list(field.metadata)
    for arg in getattr(field.annotation, "__args__", ()):
        for extra in getattr(arg, "__metadata__", ()):
            metadata += getattr(extra, "metadata", [])
    return {op: getattr(m, op) for m in metadata for op in ("ge", "gt", "le", "lt") if hasattr(m, op)}


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


def show(value: Any) -> str:
    """A value as a YAML user would write it, shortened."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ---------------------------------------------------------------------------------------- did you mean


def suggest(name: Any, candidates: Iterable[str]) -> str | None:
    """The closest candidate to `name` (known aliases from other tools first), or None."""
    candidates = list(candidates)
    name = str(name)
    if ALIASES.get(name) in candidates:
        return ALIASES[name]
    matches = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return matches[0] if matches else None


def unknown_key_message(loc: Loc) -> str:
    """`unknown key; did you mean ...` for a key at `loc` (top level or inside a section)."""
    name, keys = loc[-1], all_keys()
    section = loc[0] if len(loc) == 2 else None
    if name in keys and keys[name] != section:
        return f"unknown key here; `{name}` belongs under `{keys[name]}:`"
    local = list(SECTIONS[section].model_fields) if section in SECTIONS else list(SECTIONS)
    if match := suggest(name, local):
        return f"unknown key; did you mean `{match}`?"
    if match := suggest(name, keys):
        return f"unknown key; did you mean `{match}` (under `{keys[match]}:`)?"
    if section:
        return f"unknown key; `tunewise explain {section}` lists the keys of `{section}:`"
    return f"unknown key; the sections are {', '.join(SECTIONS)}"


# -------------------------------------------------------------------------------------- cross-field


def check_config(cfg: TunewiseConfig) -> list[Problem]:
    """Every cross-field problem of a schema-valid config: errors, warnings and infos, each with its reason."""
    return _cross_field(cfg, skip=set())


def _cross_field(cfg: TunewiseConfig, skip: set[str]) -> list[Problem]:
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
    message = f"ignored: `warmup_steps` ({t.warmup_steps}) is also set and wins, as in HF; remove one of them"
    return [Problem("training.warmup_ratio", message, "warning")]


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
            f"so every checkpoint has an evaluation; e.g. save_steps: {_num(fix)}"
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
    if g.do_sample:
        return []
    changed = [
        k for k in ("temperature", "top_p", "top_k") if getattr(g, k) != type(g).model_fields[k].default
    ]
    message = "ignored: `do_sample` is false, so decoding is greedy (always the most likely token); set `do_sample: true`"
    # temperature 0 asks for greedy decoding, which is what it gets.
    return [
        Problem(f"generation.{k}", message, "warning")
        for k in changed
        if (k, g.temperature) != ("temperature", 0)
    ]


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
    if cfg.data.validation_file is not None and cfg.data.validation_split is not None:
        why = "ignored: `validation_file` supplies the validation data"
        problems.append(Problem("data.validation_split", why, "warning"))
    return problems


_ADAPTER_KEYS = tuple(SECTIONS["adapter"].model_fields)
_QUANT_KEYS = tuple(SECTIONS["quantization"].model_fields)

_RULES: tuple[tuple[tuple[str, ...], Callable[[TunewiseConfig], list[Problem]]], ...] = (
    # (the keys a rule reads, the rule)
    (("precision", "bf16", "fp16"), _precision_flags),
    (("warmup_steps", "warmup_ratio"), _warmup_twice),
    (("method", *_QUANT_KEYS), _quantization),
    (("load_best_model_at_end", "eval_steps", "save_steps"), _load_best),
    (("early_stopping_patience", "eval_steps"), _early_stopping),
    (("max_steps", "num_train_epochs"), _max_steps_wins),
    (("do_sample", "temperature", "top_p", "top_k"), _greedy_ignores_sampling),
    (("per_device_train_batch_size", "gradient_accumulation_steps", "effective_batch_size"), _batch),
    (("max_tokens_per_micro_batch", "packing", "max_seq_length"), _token_budget),
    (("metric_for_best_model", "greater_is_better", "task_metric"), _metric),
    (("use_dora", "method", *_QUANT_KEYS), _dora),
    ((*_ADAPTER_KEYS, *_QUANT_KEYS, "validation_file", "validation_split"), _ignored_settings),
)


# ------------------------------------------------------------------------------------ provenance, dump


def user_set_paths(cfg: TunewiseConfig) -> set[str]:
    """Dotted paths the user set explicitly (in the YAML, the dict or by `--set`), section by section."""
    return {f"{name}.{key}" for name in cfg.model_fields_set for key in getattr(cfg, name).model_fields_set}


def dump_config(cfg: TunewiseConfig) -> str:
    """Every key, grouped by section, each under its one-line doc; `load_config` reads it back equal."""
    out = []
    for section in SECTIONS:
        out.append(f"{section}:")
        for key, value in getattr(cfg, section).model_dump(mode="json").items():
            out += [f"  # {field_doc(section, key)}", f"  {key}: {_flow(value)}"]
    return "\n".join(out) + "\n"


def _flow(value: Any) -> str:
    """One value as single-line YAML (flow style), quoted wherever `_Loader` would misread it."""
    text = yaml.dump(value, Dumper=_Dumper, default_flow_style=True, allow_unicode=True, width=1 << 30)
    return text.removesuffix("\n").removesuffix("\n...")
