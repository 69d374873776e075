"""Read a config (YAML file or dict, plus ``--set KEY=VALUE`` overrides) into a validated ``TunewiseConfig``.

Every problem is collected and raised once, in one ``ConfigError``: unknown keys at any depth with a
did-you-mean, wrong types and out-of-range values with the allowed domain, and the cross-field rules
of config/rules.py. Each problem names its config path and, when known, where the value came
from (``train.yaml:7`` or ``--set``).
"""

from __future__ import annotations

import copy
import dataclasses
import re
import shlex
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails

from tunewise.config.problems import ConfigError, Problem, Severity, num, show, suggest
from tunewise.config.rules import cross_field
from tunewise.config.schema import SECTIONS, TunewiseConfig, _leaf_types, all_keys, field_doc

Loc = tuple[str, ...]

# ---------------------------------------------------------------------------------------------- load


def load_config(
    source: str | Path | dict[str, Any] | TunewiseConfig | None, overrides: Sequence[str] = ()
) -> TunewiseConfig:
    """A validated config from a YAML file, a dict, a config or nothing (defaults), plus `--set` overrides.

    Raises ``ConfigError`` listing every problem when any has severity "error"; warnings and infos
    are not raised: ``check_config`` returns them for the plan to show.
    """
    return read_config(source, overrides)[0]


def read_config(
    source: str | Path | dict[str, Any] | TunewiseConfig | None,
    overrides: Sequence[str] = (),
    unknown_keys: Severity = "error",
) -> tuple[TunewiseConfig, list[Problem]]:
    """`load_config`, also returning the warnings and infos it did not raise.

    `unknown_keys="warning"` reads a config another tunewise version wrote (a run's config.yaml): a key of the
    source this version does not know is left out with a warning. An unknown key in `--set` stays an error:
    that one is the user's typo.
    """
    origin = str(source) if isinstance(source, str | Path) else ""
    raw, sources = _read_source(source, origin)
    problems = _apply_overrides(raw, overrides, sources)
    cfg, schema_problems, invalid = _validate(raw, sources, unknown_keys)
    problems += schema_problems
    if cfg is not None:
        problems += [_with_source(p, sources) for p in cross_field(cfg, skip=invalid)]
    if any(p.severity == "error" for p in problems):
        raise ConfigError(problems, origin)
    assert cfg is not None  # no error means the first validation succeeded
    return cfg, problems


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
    if path.is_dir():
        raise ConfigError([Problem(str(path), _directory_given(path))])
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


def _directory_given(path: Path) -> str:
    """Fix (test_config.py, test_crash_safety.py): `tunewise train --resume runs/x/checkpoint-6`, the config
    left out, read the checkpoint as the config and said only "cannot read the config file: Is a directory".
    A run directory and each of its checkpoints hold config.yaml, the config they were trained with."""
    config = path / "config.yaml"
    if not config.is_file():
        return "is a directory, not a config file: give a YAML config file"
    # training/checkpoint.py's MANIFEST, not imported: reading a config does not load torch
    if (path / "manifest.json").is_file():
        command = shlex.join(["tunewise", "train", str(config), "--resume", str(path)])
        resume = "is a checkpoint, not a config file; to resume from it with the config it was trained with"
        return f"{resume}: {command}"
    command = shlex.join(["tunewise", "train", str(config), "--resume"])
    return (
        "is a directory, not a config file: give its config.yaml (in a run directory, the config the run "
        f"was trained with: {command} continues that run)"
    )


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
    raw: dict[Any, Any], sources: dict[Loc, str], unknown_keys: Severity = "error"
) -> tuple[TunewiseConfig | None, list[Problem], set[str]]:
    """The config (with invalid values replaced by defaults, for the cross-field rules), its problems,
    and the leaf keys that were replaced. An unknown key not from `--set` is a problem of `unknown_keys`
    severity."""
    try:
        return TunewiseConfig.model_validate(raw), [], set()
    except ValidationError as exc:
        grouped: dict[Loc, list[ErrorDetails]] = {}
        for error in exc.errors():
            grouped.setdefault(_field_loc(error), []).append(error)
    problems = []
    for loc, errors in grouped.items():
        source = sources.get(loc) or sources.get(loc[:1], "")
        message = _message(loc, errors)
        from_set = any(at[: len(loc)] == loc and where == "--set" for at, where in sources.items())
        tolerated = not from_set and {e["type"] for e in errors} == {"extra_forbidden"}
        severity: Severity = unknown_keys if tolerated else "error"
        if severity != "error":
            message += "; ignored (written by another tunewise version?)"
        problems.append(Problem(_dotted(loc), message, severity, source))
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
        return f"in {low[0]}{num(low[1])}, {num(high[1])}{high[0]}"
    if low:
        return f"{'>=' if low[0] == '[' else '>'} {num(low[1])}"
    if high:
        return f"{'<=' if high[0] == ']' else '<'} {num(high[1])}"
    return ""


def _bounds(field: FieldInfo) -> dict[str, float]:
    metadata = list(field.metadata)
    for arg in getattr(field.annotation, "__args__", ()):
        for extra in getattr(arg, "__metadata__", ()):
            metadata += getattr(extra, "metadata", [])
    return {op: getattr(m, op) for m in metadata for op in ("ge", "gt", "le", "lt") if hasattr(m, op)}


# ---------------------------------------------------------------------------------------- did you mean


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
