"""load_config / check_config / dump_config: every rule on its exact message, plus property tests."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunewise.config import problems as problems_module
from tunewise.config import rules as rules_module
from tunewise.config.load import _Loader, dump_config, load_config, user_set_paths
from tunewise.config.problems import ConfigError, Problem
from tunewise.config.rules import check_config
from tunewise.config.schema import SECTIONS, TunewiseConfig, all_keys


def problems_of(source: Any, overrides: tuple[str, ...] = ()) -> list[Problem]:
    with pytest.raises(ConfigError) as info:
        load_config(source, list(overrides))
    return info.value.problems


def one(source: Any, overrides: tuple[str, ...] = ()) -> tuple[str, str]:
    found = problems_of(source, overrides)
    assert len(found) == 1, [str(p) for p in found]
    return found[0].path, found[0].message


def checks(raw: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(severity, path, message) of every cross-field problem of a schema-valid dict."""
    cfg = TunewiseConfig.model_validate(raw)
    return [(p.severity, p.path, p.message) for p in check_config(cfg)]


def write(tmp_path: Path, text: str, name: str = "train.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------ field domains


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("training", "learning_rate", -1, "must be > 0 (got -1)"),
        ("training", "learning_rate", 0, "must be > 0 (got 0)"),
        ("generation", "top_p", 1.5, "must be in (0, 1] (got 1.5)"),
        ("adapter", "r", 0, "must be >= 1 (got 0)"),
        ("adapter", "lora_dropout", 1.0, "must be in [0, 1) (got 1.0)"),
        ("generation", "temperature", -0.5, "must be >= 0 (got -0.5)"),
        ("training", "per_device_train_batch_size", 0, "must be >= 1 (got 0)"),
        ("training", "gradient_accumulation_steps", -2, "must be >= 1 (got -2)"),
        ("training", "max_steps", -2, "must be >= -1 (got -2)"),
        (
            "training",
            "max_steps",
            0,
            (
                "must be -1 (train for num_train_epochs) or a step count >= 1; 0 would be one update at "
                "learning rate 0 in transformers (got 0)"
            ),
        ),
        ("training", "warmup_steps", -0.1, "must be >= 0 (got -0.1)"),
        ("training", "warmup_steps", 2.5, "must be a whole number of steps, or a fraction below 1 (got 2.5)"),
        ("training", "seed", -1, "must be in [0, 4294967295] (got -1)"),
        ("training", "eval_steps", 0, "must be > 0 (got 0)"),
        ("training", "warmup_ratio", 1.5, "must be in [0, 1] (got 1.5)"),
        ("training", "learning_rate", "fast", "must be a number > 0 or `auto` (got 'fast')"),
        (
            "training",
            "learning_rate",
            "autoo",
            "must be a number > 0 or `auto` (got 'autoo'); did you mean `auto`?",
        ),
        ("training", "learning_rate", math.inf, "must be a number > 0 or `auto` (got inf)"),
        ("training", "eval_steps", "often", "must be a number > 0 or null (got 'often')"),
        ("adapter", "r", True, "must be an integer >= 1 (got true)"),
        ("adapter", "r", 2.5, "must be an integer >= 1 (got 2.5)"),
        ("data", "packing", "maybe", "must be true or false (got 'maybe')"),
        (
            "model",
            "torch_dtype",
            "bf16",
            "must be one of `auto`, `float32`, `bfloat16`, `float16` (got 'bf16'); did you mean `bfloat16`?",
        ),
        ("adapter", "target_modules", [], "must not be empty (got [])"),
        ("adapter", "target_modules", [1], "must be a string or a list of strings (got [1])"),
        ("training", "lr_scheduler_kwargs", 3, "must be a mapping (got 3)"),
        ("data", "validation_split", 1.5, "must be a fraction in (0, 1) or a row count >= 1 (got 1.5)"),
        ("data", "validation_split", 0, "must be a fraction in (0, 1) or a row count >= 1 (got 0)"),
        (
            "training",
            "logging_steps",
            2.5,
            "must be a whole number of steps, or a fraction below 1 (got 2.5)",
        ),
        (
            "adapter",
            "init_lora_weights",
            "pisa",
            (
                "must be one of true, false, gaussian, eva, olora, pissa, corda, astra, loftq, orthogonal, "
                "mica, nora, pissa_niter_N (got 'pisa')"
            ),
        ),
    ],
)
def test_field_domain_messages(section: str, key: str, value: Any, message: str) -> None:
    assert one({section: {key: value}}) == (f"{section}.{key}", message)


def test_accepted_edge_values() -> None:
    cfg = load_config(
        {
            "training": {
                "learning_rate": 1e-4,
                "max_steps": 1,
                "eval_steps": 0.25,
                "save_steps": 30.0,
                "warmup_steps": 0.05,
            },
            "adapter": {"init_lora_weights": "pissa_niter_4", "lora_dropout": 0.0},
            "data": {"dataset": "train.jsonl", "validation_split": 100},
            "generation": {"top_p": 1.0, "temperature": 0},
        }
    )
    assert cfg.training.save_steps == 30 and isinstance(cfg.training.save_steps, int)
    assert cfg.training.warmup_steps == 0.05  # transformers 5's spelling of a 5% warmup
    whole = load_config({"training": {"warmup_steps": 10.0}}).training.warmup_steps
    assert whole == 10 and isinstance(whole, int)
    assert cfg.data.validation_split == 100


def test_section_and_root_must_be_mappings(tmp_path: Path) -> None:
    assert one({"training": 5}) == ("training", "must be a mapping of `training` keys (got 5)")
    path = write(tmp_path, "- a\n- b\n")
    sections = ", ".join(SECTIONS)
    assert one(path) == (str(path), f"must be a mapping of sections ({sections}), got a list")


def test_empty_file_and_empty_section_mean_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")) == TunewiseConfig()
    assert load_config(write(tmp_path, "training:\n")) == TunewiseConfig()


def test_non_string_keys(tmp_path: Path) -> None:
    assert one(write(tmp_path, "training:\n  yes: 1\n")) == (
        "training.true",
        "key names must be strings (got true; quote it in YAML)",
    )


# -------------------------------------------------------------------------------------- unknown keys


def test_other_tools_names_point_to_real_keys_and_shadow_none() -> None:
    keys = all_keys()
    assert {alias: target for alias, target in problems_module.ALIASES.items() if target not in keys} == {}
    assert [alias for alias in problems_module.ALIASES if alias in keys or alias in SECTIONS] == []


@pytest.mark.parametrize(
    ("raw", "path", "message"),
    [
        ({"data": {"max_seq_len": 100}}, "data.max_seq_len", "unknown key; did you mean `max_seq_length`?"),
        (
            {"learning_rate": 1e-4},
            "learning_rate",
            "unknown key here; `learning_rate` belongs under `training:`",
        ),
        (
            {"adapter": {"learning_rate": 1}},
            "adapter.learning_rate",
            "unknown key here; `learning_rate` belongs under `training:`",
        ),
        ({"trainin": {}}, "trainin", "unknown key; did you mean `training`?"),
        ({"training": {"lr": 1e-4}}, "training.lr", "unknown key; did you mean `learning_rate`?"),
        ({"adapter": {"lora_r": 8}}, "adapter.lora_r", "unknown key; did you mean `r`?"),
        # HF's run_clm name: difflib alone would point to `validation_file`.
        ({"data": {"train_file": "a.jsonl"}}, "data.train_file", "unknown key; did you mean `dataset`?"),
        (
            {"data": {"cutoff_len": 1024}},
            "data.cutoff_len",
            "unknown key; did you mean `max_seq_length`?",
        ),
        (
            {"training": {"lora_rank": 8}},
            "training.lora_rank",
            "unknown key; did you mean `r` (under `adapter:`)?",
        ),
        (
            {"data": {"learnin_rate": 1}},
            "data.learnin_rate",
            "unknown key; did you mean `learning_rate` (under `training:`)?",
        ),
        (
            {"learnin_rate": 1},
            "learnin_rate",
            "unknown key; did you mean `learning_rate` (under `training:`)?",
        ),
        (
            {"data": {"zzzz": 1}},
            "data.zzzz",
            "unknown key; `tunewise explain data` lists the keys of `data:`",
        ),
        ({"zzzz": 1}, "zzzz", "unknown key; the sections are " + ", ".join(SECTIONS)),
    ],
)
def test_unknown_keys_did_you_mean(raw: dict[str, Any], path: str, message: str) -> None:
    assert one(raw) == (path, message)


def test_problems_carry_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "training:\n  seed: 1\n  learning_rate: -1\n")
    [problem] = problems_of(path)
    assert problem.source == f"{path}:3"
    assert str(problem) == f"training.learning_rate: must be > 0 (got -1)  [{path}:3]"


def test_three_mistakes_three_problems_one_error(tmp_path: Path) -> None:
    text = "data:\n  max_seq_len: 100\ntraining:\n  learning_rate: -1\ngeneration:\n  top_p: 1.5\n"
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert [(p.path, p.source) for p in info.value.problems] == [
        ("data.max_seq_len", f"{path}:2"),
        ("training.learning_rate", f"{path}:4"),
        ("generation.top_p", f"{path}:6"),
    ]
    assert isinstance(info.value, ValueError)
    assert str(info.value).splitlines()[0] == f"invalid config {path} (3 errors):"
    assert "  generation.top_p: must be in (0, 1] (got 1.5)" in str(info.value)


def test_schema_errors_and_cross_field_errors_together(tmp_path: Path) -> None:
    path = write(tmp_path, "training:\n  learning_rate: -1\n  bf16: true\n  fp16: true\n")
    found = problems_of(path)
    assert [(p.path, p.source) for p in found] == [
        ("training.learning_rate", f"{path}:2"),
        ("training.fp16", f"{path}:4"),
    ]


def test_cross_field_rule_skipped_when_its_key_is_invalid() -> None:
    # eval_steps is wrong; the early-stopping rule must not judge the default (null) in its place.
    assert one({"training": {"eval_steps": -1, "early_stopping_patience": 2}}) == (
        "training.eval_steps",
        "must be > 0 (got -1)",
    )


# ------------------------------------------------------------------------------------- YAML reading


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "training:\n  seed: 1\n  learning_rate: [1, 2\nadapter:\n  r: 8\n")
    [problem] = problems_of(path)
    assert problem.path.startswith(f"{path}:")
    assert int(problem.path.rsplit(":", 1)[1]) in (4, 5)
    assert problem.message.startswith("YAML syntax error: ")


def test_yaml_duplicate_key(tmp_path: Path) -> None:
    path = write(tmp_path, "training:\n  seed: 1\n  seed: 2\n")
    assert one(path) == ("training.seed", f"given twice ({path}:2 and line 3); keep one")


def test_missing_file(tmp_path: Path) -> None:
    assert one(tmp_path / "nope.yaml") == (str(tmp_path / "nope.yaml"), "config file not found")


def test_a_directory_as_the_config_says_which_file_to_give(tmp_path: Path) -> None:
    """It said "cannot read the config file: Is a directory"; a run or checkpoint folder holds its config.yaml."""
    assert one(tmp_path) == (str(tmp_path), "is a directory, not a config file: give a YAML config file")
    run_dir = tmp_path / "runs" / "my run"
    checkpoint = run_dir / "checkpoint-6"
    checkpoint.mkdir(parents=True)
    for folder in (run_dir, checkpoint):
        write(folder, "training:\n  max_steps: 6\n", "config.yaml")
    (checkpoint / "manifest.json").write_text("{}")
    path, message = one(run_dir)
    assert path == str(run_dir)
    assert message == (
        "is a directory, not a config file: give its config.yaml (in a run directory, the config the run was "
        f"trained with: tunewise train '{run_dir}/config.yaml' --resume continues that run)"
    )
    assert one(checkpoint)[1] == (
        "is a checkpoint, not a config file; to resume from it with the config it was trained with: "
        f"tunewise train '{checkpoint}/config.yaml' --resume '{checkpoint}'"
    )


def test_yaml_exponent_without_dot_is_a_number(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "training:\n  learning_rate: 1e-4\n  adam_epsilon: 1E-8\n"))
    assert cfg.training.learning_rate == 1e-4 and cfg.training.adam_epsilon == 1e-8


# ----------------------------------------------------------------------------------------- --set


def test_set_dotted_and_bare_keys_and_yaml_values(tmp_path: Path) -> None:
    path = write(tmp_path, "training:\n  learning_rate: 3e-4\n")
    cfg = load_config(
        path,
        [
            "training.learning_rate=1e-4",
            "target_modules=[q_proj,v_proj]",
            "max_grad_norm=null",
            "bf16=true",
            "lr_scheduler_type=cosine",
            "lr_scheduler_kwargs.num_cycles=2",
            "system_prompt=a=b",
        ],
    )
    assert cfg.training.learning_rate == 1e-4
    assert cfg.adapter.target_modules == ["q_proj", "v_proj"]
    assert cfg.training.max_grad_norm is None
    assert cfg.training.bf16 is True
    assert cfg.training.lr_scheduler_kwargs == {"num_cycles": 2}
    assert cfg.data.system_prompt == "a=b"


def test_set_bad_syntax() -> None:
    assert one(None, ("learning_rate",)) == (
        "--set",
        "`learning_rate` is not KEY=VALUE (e.g. --set learning_rate=1e-4 or --set training.seed=1)",
    )
    assert one(None, ("=3",))[0] == "--set"


def test_set_unknown_key_and_bad_value() -> None:
    [problem] = problems_of(None, ("learnin_rate=1",))
    assert (problem.path, problem.message, problem.source) == (
        "learnin_rate",
        "unknown key; did you mean `learning_rate` (under `training:`)?",
        "--set",
    )
    assert one(None, ("training.max_stepz=4",)) == (
        "training.max_stepz",
        "unknown key; did you mean `max_steps`?",
    )
    assert one(None, ("r=[1,",))[0] == "adapter.r"
    assert one({"training": {"learning_rate": 1e-4}}, ("learning_rate.x=1",)) == (
        "training.learning_rate.x",
        "cannot set it: `training.learning_rate` is not a mapping",
    )
    assert one(None, ("learning_rate=-1",)) == ("training.learning_rate", "must be > 0 (got -1)")


def test_set_does_not_touch_the_callers_dict() -> None:
    raw: dict[str, Any] = {"training": {"seed": 1}}
    load_config(raw, ["seed=2"])
    assert raw == {"training": {"seed": 1}}


# ------------------------------------------------------------------------------- provenance and dump


def test_user_set_paths(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "training:\n  seed: 3\nadapter: {}\n"), ["r=8"])
    assert user_set_paths(cfg) == {"training.seed", "adapter.r"}
    assert user_set_paths(load_config(cfg)) == {"training.seed", "adapter.r"}
    assert user_set_paths(load_config(None)) == set()


def test_dump_has_every_key_with_its_doc_and_round_trips(tmp_path: Path) -> None:
    cfg = load_config(
        {
            "training": {
                "learning_rate": 1e-4,
                "lr_scheduler_type": "cosine",
                "lr_scheduler_kwargs": {"num_cycles": 2},
            },
            "adapter": {"target_modules": ["q_proj", "v_proj"]},
            "data": {"chat_template": "{% for m in messages %}\n{{ m['content'] }}\n{% endfor %}"},
            "model": {"model_name_or_path": "1e-4"},
        }
    )
    text = dump_config(cfg)
    data = yaml.safe_load(text)
    assert {key for section in data.values() for key in section} == set(all_keys())
    assert "  # Peak learning rate;" in text
    reloaded = load_config(write(tmp_path, text))
    assert reloaded == cfg
    assert dump_config(reloaded) == text


# ------------------------------------------------------------------------------------ cross-field


def test_default_config_is_clean() -> None:
    assert check_config(TunewiseConfig()) == []


def test_precision_flags() -> None:
    assert checks({"training": {"fp16": True, "bf16": True}}) == [
        ("error", "training.fp16", "`fp16` and `bf16` are both true; keep one, or set only `precision`")
    ]
    conflict = "set only `precision` (the bf16/fp16 flags are HF's spelling of it)"
    assert checks({"training": {"precision": "fp32", "bf16": True}}) == [
        ("error", "training.precision", f"`precision: fp32` conflicts with `bf16: true`; {conflict}")
    ]
    assert checks({"training": {"precision": "bf16", "bf16": False}}) == [
        ("error", "training.precision", f"`precision: bf16` conflicts with `bf16: false`; {conflict}")
    ]
    assert checks({"training": {"precision": "bf16", "bf16": True, "fp16": False}}) == []


def test_warmup_given_twice() -> None:
    assert checks({"training": {"warmup_steps": 10, "warmup_ratio": 0.1}}) == [
        (
            "warning",
            "training.warmup_ratio",
            "ignored: `warmup_steps` (10) is also set and wins, as in HF; remove one of them",
        )
    ]
    assert checks({"training": {"warmup_steps": 0, "warmup_ratio": 0.1}}) == [
        (
            "warning",
            "training.warmup_steps",
            "ignored: 0 means `warmup_ratio` (0.1) applies, as in HF; remove one of them",
        )
    ]
    assert checks({"training": {"warmup_steps": 0.05, "warmup_ratio": 0.1}}) == [
        (
            "warning",
            "training.warmup_ratio",
            (
                "ignored: `warmup_steps` (0.05) (a fraction of the run, as in transformers 5) is also set and "
                "wins, as in HF; remove one of them"
            ),
        )
    ]


def test_quantization_rules() -> None:
    assert checks({"adapter": {"method": "full"}, "quantization": {"load_in_4bit": True}}) == [
        (
            "error",
            "adapter.method",
            (
                "cannot train a 4-bit base in full: quantised weights are frozen integer codes with no gradient; "
                "use `method: qlora` or turn off `load_in_4bit`"
            ),
        )
    ]
    assert checks({"adapter": {"method": "full"}, "quantization": {"load_in_8bit": True}})[0][2].startswith(
        "cannot train a 8-bit base in full"
    )
    assert checks({"quantization": {"load_in_4bit": True, "load_in_8bit": True}}) == [
        ("error", "quantization.load_in_8bit", "`load_in_4bit` and `load_in_8bit` are both true; keep one")
    ]
    assert checks({"adapter": {"method": "qlora"}, "quantization": {"load_in_8bit": True}}) == [
        (
            "error",
            "quantization.load_in_8bit",
            "`method: qlora` loads the base in 4 bit; for an 8-bit base use `method: lora`",
        )
    ]
    assert checks({"adapter": {"method": "qlora"}, "quantization": {"load_in_4bit": False}}) == [
        (
            "error",
            "quantization.load_in_4bit",
            "`method: qlora` is LoRA on a 4-bit base; set `load_in_4bit: true` (or auto), or use `method: lora`",
        )
    ]
    assert checks({"adapter": {"method": "qlora"}}) == []
    assert checks({"adapter": {"method": "lora"}, "quantization": {"load_in_8bit": True}}) == []


@pytest.mark.parametrize(
    ("training", "message"),
    [
        (
            {"eval_steps": None},
            "needs evaluation during training: set `eval_steps`, and `save_steps` a multiple of it",
        ),
        (
            {"eval_steps": 20, "save_steps": None},
            "needs checkpoints to choose from: set `save_steps` to a multiple of `eval_steps` (20)",
        ),
        (
            {"eval_steps": 10, "save_steps": 25},
            (
                "`save_steps` (25) must be a multiple of `eval_steps` (10), as in HF, so every checkpoint has an "
                "evaluation; e.g. save_steps: 30"
            ),
        ),
        (
            {"eval_steps": 10, "save_steps": 0.5},
            (
                "`save_steps` (0.5) and `eval_steps` (10) mix a fraction and a step count, so HF cannot guarantee "
                "each checkpoint was evaluated; give both as steps or both as fractions"
            ),
        ),
        (
            {"eval_steps": 0.2, "save_steps": 0.3},
            (
                "`save_steps` (0.3) must be a multiple of `eval_steps` (0.2), as in HF, so every checkpoint has an "
                "evaluation; e.g. save_steps: 0.4"
            ),
        ),
    ],
)
def test_load_best_model_at_end(training: dict[str, Any], message: str) -> None:
    found = checks({"training": {"load_best_model_at_end": True, **training}})
    assert found == [("error", "training.load_best_model_at_end", message)]


def test_load_best_model_at_end_valid() -> None:
    assert checks({"training": {"load_best_model_at_end": True, "eval_steps": 10, "save_steps": 30}}) == []
    assert checks({"training": {"load_best_model_at_end": True, "eval_steps": 0.1, "save_steps": 0.3}}) == []


def test_early_stopping_needs_evaluation() -> None:
    assert checks({"training": {"early_stopping_patience": 3}}) == [
        (
            "error",
            "training.early_stopping_patience",
            (
                "needs evaluations during training, but `eval_steps` is null (evaluation runs only before and after "
                "training); set `eval_steps` (e.g. 50) or remove early_stopping_patience"
            ),
        )
    ]
    assert checks({"training": {"early_stopping_patience": 3, "eval_steps": 50}}) == []


def test_max_steps_wins_over_explicit_epochs_only() -> None:
    assert checks({"training": {"max_steps": 500, "num_train_epochs": 2}}) == [
        (
            "info",
            "training.num_train_epochs",
            "ignored: `max_steps` (500) > 0 sets the length of training, as in HF",
        )
    ]
    assert checks({"training": {"max_steps": 500}}) == []


def test_sampling_settings_ignored_by_greedy() -> None:
    message = "ignored: `do_sample` is false, so decoding is greedy (always the most likely token); set `do_sample: true`"
    found = checks({"generation": {"temperature": 0.7, "top_p": 0.9, "top_k": 20}})
    assert found == [
        ("warning", "generation.temperature", message),
        ("warning", "generation.top_p", message),
        ("warning", "generation.top_k", message),
    ]
    assert checks({"generation": {"temperature": 0.7, "do_sample": True}}) == []
    assert checks({"generation": {"temperature": 0}}) == []


def test_sampling_settings_ignored_at_temperature_0_even_with_do_sample() -> None:
    """generate_kwargs decodes greedily at temperature 0 whatever do_sample says, dropping top_p and top_k."""
    message = (
        "ignored: `temperature: 0` means greedy decoding (always the most likely token), even with "
        "`do_sample: true`; set a temperature above 0 to sample"
    )
    found = checks({"generation": {"do_sample": True, "temperature": 0, "top_p": 0.5, "top_k": 5}})
    assert found == [("warning", "generation.top_p", message), ("warning", "generation.top_k", message)]
    assert checks({"generation": {"do_sample": True, "temperature": 0}}) == []
    assert checks({"generation": {"do_sample": True, "temperature": 0.5, "top_p": 0.5}}) == []


@pytest.mark.parametrize("optim", ["sgd", "adafactor"])
def test_adam_settings_an_optimizer_does_not_read_are_warned_about(optim: str) -> None:
    """sgd dropped changed adam_* values without a word; adafactor said so only in `train`, not in the plan."""
    found = checks({"training": {"optim": optim, "adam_beta2": 0.95, "adam_epsilon": 1e-6}})
    assert [(severity, path) for severity, path, _ in found] == [
        ("warning", "training.adam_beta2"),
        ("warning", "training.adam_epsilon"),
    ]
    assert all(message.startswith(f"ignored: `optim: {optim}` does not read it") for *_, message in found)
    assert checks({"training": {"optim": optim}}) == []
    assert checks({"training": {"optim": "adamw_torch", "adam_beta2": 0.95}}) == []


def test_batch_rules() -> None:
    assert checks({"training": {"per_device_train_batch_size": "auto"}}) == [
        (
            "info",
            "training.effective_batch_size",
            (
                "not set: `per_device_train_batch_size: auto` targets 16 sequences per optimizer update "
                "(tunewise's default); set `effective_batch_size` to choose another"
            ),
        )
    ]
    assert checks({"training": {"gradient_accumulation_steps": "auto", "effective_batch_size": 32}}) == []
    assert checks({"training": {"effective_batch_size": 32}}) == [
        (
            "warning",
            "training.effective_batch_size",
            (
                "ignored: it only drives the `auto` batch rule, and per_device_train_batch_size and "
                "gradient_accumulation_steps are both numbers; set one of them to auto"
            ),
        )
    ]


def test_token_budget_rules() -> None:
    path = "training.max_tokens_per_micro_batch"
    [(severity, where, message)] = checks({"training": {"max_tokens_per_micro_batch": 1024}})
    assert (severity, where) == ("error", path) and "needs `data.packing: true`" in message
    budget = {"training": {"max_tokens_per_micro_batch": 256}}
    [(severity, where, message)] = checks({"data": {"packing": True}, **budget})
    assert (severity, where) == ("error", path)
    assert message.startswith("256 is below data.max_seq_length (512)") and "at least 512" in message
    assert checks({"data": {"packing": True, "max_seq_length": 256}, **budget}) == []


def test_metric_rules() -> None:
    assert checks({"training": {"metric_for_best_model": "loss"}}) == [
        (
            "error",
            "training.metric_for_best_model",
            (
                "unknown metric `loss`; choose one of eval_loss, eval_perplexity, exact_match, json_exact_match; "
                "did you mean `eval_loss`?"
            ),
        )
    ]
    assert checks(
        {"training": {"metric_for_best_model": "exact_match"}, "evaluation": {"task_metric": "none"}}
    ) == [
        (
            "error",
            "training.metric_for_best_model",
            "`exact_match` is computed only when `task_metric` is exact_match or auto (it is none)",
        )
    ]
    assert checks({"training": {"greater_is_better": True}}) == [
        (
            "error",
            "training.greater_is_better",
            "`eval_loss` is lower-is-better; remove `greater_is_better` (the default follows the metric)",
        )
    ]
    assert (
        checks({"training": {"metric_for_best_model": "json_exact_match", "greater_is_better": True}}) == []
    )


def test_dora_on_quantised_base_needs_recent_peft(monkeypatch: pytest.MonkeyPatch) -> None:
    raw = {"adapter": {"method": "qlora", "use_dora": True}}
    assert checks(raw) == []  # the installed peft supports QDoRA
    monkeypatch.setattr(rules_module, "peft_version", lambda: (0, 9, 0))
    assert checks(raw) == [
        (
            "error",
            "adapter.use_dora",
            "DoRA on a quantised base needs peft >= 0.10.0 (installed 0.9.0); upgrade peft or set it false",
        )
    ]
    assert checks({"adapter": {"use_dora": True}}) == []


def test_ignored_settings() -> None:
    assert checks({"adapter": {"method": "full", "r": 8}}) == [
        ("warning", "adapter.r", "ignored: `method: full` trains every weight and builds no adapter")
    ]
    assert checks({"quantization": {"bnb_4bit_quant_type": "fp4"}}) == [
        (
            "warning",
            "quantization.bnb_4bit_quant_type",
            "ignored: the base is not loaded in 4 bit (`load_in_4bit`, or `method: qlora`)",
        )
    ]


def test_cosine_with_restarts_without_cycles_is_plain_cosine() -> None:
    restarts = {"lr_scheduler_type": "cosine_with_restarts"}
    message = (
        "one cycle (transformers' default num_cycles) never restarts: it is plain cosine; set "
        "lr_scheduler_kwargs: {num_cycles: 2} or more, or use cosine"
    )
    assert checks({"training": restarts}) == [("warning", "training.lr_scheduler_type", message)]
    assert checks({"training": {**restarts, "lr_scheduler_kwargs": {"num_cycles": 3}}}) == []


def test_two_sources_of_validation_rows_are_refused() -> None:
    # build_data refuses both after the model has loaded; the rule says so in `plan`, before anything loads.
    assert checks({"data": {"validation_file": "v.jsonl", "validation_split": 0.1}}) == [
        (
            "error",
            "data.validation_split",
            "`validation_file` supplies the validation rows; remove one of `validation_file` and `validation_split`",
        )
    ]
    assert checks({"data": {"validation_split": 0.1}}) == [  # the default dataset, builtin:json_extract
        (
            "error",
            "data.validation_split",
            "`builtin:json_extract` brings its own validation rows; remove `validation_split`",
        )
    ]
    assert (
        checks({"data": {"dataset": ["a.jsonl", "builtin:json_extract"], "validation_split": 5}})[0][0]
        == "error"
    )
    assert checks({"data": {"dataset": "train.jsonl", "validation_split": 0.1}}) == []
    assert checks({"data": {"validation_file": "v.jsonl"}}) == []


def test_warnings_do_not_raise() -> None:
    cfg = load_config({"training": {"warmup_steps": 10, "warmup_ratio": 0.1}})
    assert [p.severity for p in check_config(cfg)] == ["warning"]


# ------------------------------------------------------------------------------------ properties

_KEYS = sorted(all_keys())
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["auto", "lora", "qlora", "full", "bf16", "fp16", "eval_loss", "cosine", "nf4", "1e-4"])
)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
_names = st.sampled_from([*_KEYS, *SECTIONS]) | st.text(max_size=10)


@st.composite
def mutated_configs(draw: st.DrawFn) -> dict[Any, Any]:
    raw: dict[Any, Any] = TunewiseConfig().model_dump(mode="json")
    for _ in range(draw(st.integers(0, 6))):
        action = draw(st.sampled_from(["set", "set", "set", "extra", "delete", "replace", "top"]))
        section = draw(st.sampled_from(sorted(SECTIONS)))
        if action == "set" and isinstance(raw.get(section), dict):
            raw[section][draw(st.sampled_from(_KEYS))] = draw(_values)
        elif action == "extra" and isinstance(raw.get(section), dict):
            raw[section][draw(_names)] = draw(_values)
        elif action == "delete":
            raw.pop(section, None)
        elif action == "replace":
            raw[section] = draw(_values)
        else:
            raw[draw(_names | st.integers() | st.none())] = draw(_values)
    return raw


def _assert_loads_or_reports(source: Any, overrides: list[str] = []) -> TunewiseConfig | None:  # noqa: B006
    try:
        return load_config(source, overrides)
    except ConfigError as exc:
        assert exc.problems
        assert all(p.path for p in exc.problems), [str(p) for p in exc.problems]
        assert any(p.severity == "error" for p in exc.problems)
        return None


_FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_FAST
@given(mutated_configs())
def test_property_mutated_dicts_load_or_report(raw: dict[Any, Any]) -> None:
    cfg = _assert_loads_or_reports(raw)
    if cfg is not None:  # whatever loads also survives a dump/load round trip
        assert load_config(yaml.load(dump_config(cfg), Loader=_Loader)) == cfg


@_FAST
@given(
    mutated_configs(),
    st.lists(st.text(max_size=20) | st.builds("{}={}".format, _names, st.text(max_size=8)), max_size=3),
)
def test_property_yaml_files_and_overrides_load_or_report(
    tmp_path_factory: pytest.TempPathFactory, raw: dict[Any, Any], overrides: list[str]
) -> None:
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True))
    cfg = _assert_loads_or_reports(path, overrides)
    if cfg is not None:
        path.write_text(dump_config(cfg))
        assert load_config(path) == cfg


@_FAST
@given(st.text(max_size=200))
def test_property_arbitrary_yaml_text_loads_or_reports(
    tmp_path_factory: pytest.TempPathFactory, text: str
) -> None:
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_text(text, encoding="utf-8")
    _assert_loads_or_reports(path)


def test_schedules_the_scheduler_would_refuse_are_config_errors() -> None:
    """`plan` printed them as fine and `train` stopped with a traceback once the model and data had loaded."""
    constant = "`constant` ignores warmup in transformers ({}); use constant_with_warmup, or set warmup_steps and warmup_ratio to 0"
    assert checks({"training": {"lr_scheduler_type": "constant", "warmup_steps": 3}}) == [
        ("error", "training.lr_scheduler_type", constant.format("warmup_steps: 3"))
    ]
    assert checks({"training": {"lr_scheduler_type": "constant", "warmup_ratio": 0.1}}) == [
        ("error", "training.lr_scheduler_type", constant.format("warmup_ratio: 0.1"))
    ]
    assert checks({"training": {"lr_scheduler_type": "constant"}}) == []  # no warmup asked for
    assert checks({"training": {"lr_scheduler_type": "constant_with_warmup", "warmup_steps": 3}}) == []
    assert checks({"training": {"lr_scheduler_kwargs": {"num_cycles": 2}}}) == [
        (
            "error",
            "training.lr_scheduler_kwargs",
            "lr_scheduler_kwargs ['num_cycles'] do not apply: 'linear' takes no lr_scheduler_kwargs",
        )
    ]
    assert (
        checks({"training": {"lr_scheduler_type": "cosine", "lr_scheduler_kwargs": {"num_cycles": 2}}}) == []
    )
