"""The walking skeleton on a tiny model: the run directory contract, adapter-only training, the CLI."""

from __future__ import annotations

import io
import itertools
import json
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from rich.console import Console
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import tunewise
from tunewise.cli import app
from tunewise.config.problems import ConfigError
from tunewise.run import prepare, train

QUIET = Console(file=io.StringIO(), width=120)


@pytest.fixture
def trained(tiny_config: dict) -> tuple[dict, dict]:
    summary = train(tiny_config, console=QUIET)
    return tiny_config, summary


def test_run_directory_contract(trained: tuple[dict, dict]) -> None:
    config, summary = trained
    out = Path(config["training"]["output_dir"])
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "summary.json",
        "adapter_config.json",
        "adapter_model.safetensors",
    ):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 13))
    for row in train_rows:
        assert {
            "step",
            "epoch",
            "loss",
            "learning_rate",
            "grad_norm",
            "tokens",
            "tokens_per_second",
        } <= row.keys()
    assert all(b["tokens"] > a["tokens"] for a, b in itertools.pairwise(train_rows))
    eval_rows = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in eval_rows] == [0, 12]
    on_disk = json.loads((out / "summary.json").read_text())
    for key in (
        "eval_before",
        "eval_after",
        "task_metric",
        "train_seconds",
        "peak_memory_bytes",
        "output_dir",
    ):
        assert key in on_disk
    assert on_disk["task_metric"] == "exact_match"
    assert on_disk["eval_after"]["eval_loss"] == pytest.approx(summary["eval_after"]["eval_loss"])
    assert on_disk["stop_reason"] == "max_steps"
    printed = QUIET.file.getvalue()  # type: ignore[attr-defined]  # the StringIO above
    assert "host memory: glibc malloc keeps freed blocks for reuse" in printed  # a CPU run on glibc


def test_sample_answers_come_without_a_task_metric(tiny_config: dict) -> None:
    """Samples are generation alone: `task_metric: none` answers the num_sample_prompts prompts (and only those)
    before and after training, where it showed no samples at all."""
    tiny_config["training"]["max_steps"] = 2
    tiny_config["evaluation"] |= {"task_metric": "none", "num_sample_prompts": 2}
    summary = train(tiny_config, console=QUIET)
    assert summary["task_metric"] is None and set(summary["eval_after"]) == {"eval_loss", "eval_perplexity"}
    validation = Path(tiny_config["data"]["validation_file"]).read_text().splitlines()[:2]
    references = [json.loads(line)["messages"][-1]["content"] for line in validation]
    assert [s["reference"] for s in summary["samples"]] == references
    assert all(isinstance(s["before"], str) and isinstance(s["after"], str) for s in summary["samples"])


def test_the_run_directory_has_a_model_card_of_its_own_numbers(trained: tuple[dict, dict]) -> None:
    config, summary = trained
    out = Path(config["training"]["output_dir"])
    card = (out / "README.md").read_text()
    assert "More Information Needed" not in card  # PEFT's empty template, replaced
    front = yaml.safe_load(card.split("---")[1])
    assert front == {
        "base_model": config["model"]["model_name_or_path"],
        "library_name": "peft",
        "pipeline_tag": "text-generation",
        "tags": ["tunewise", "lora"],
    }
    before, after = summary["eval_before"], summary["eval_after"]
    assert f"| eval_loss | {before['eval_loss']:.4f} | {after['eval_loss']:.4f} |" in card
    exact = f"| exact_match | {100 * before['exact_match']:.1f}% | {100 * after['exact_match']:.1f}% |"
    assert exact in card
    assert f"- {summary['total_steps']} optimizer steps (max_steps) of " in card
    assert f"tunewise merge {out} --output {out}-merged" in card


def test_a_full_fine_tunes_card_names_its_system_prompt(tiny_config: dict) -> None:
    tiny_config["adapter"] = {"method": "full"}
    tiny_config["data"]["system_prompt"] = 'Say "ok".'
    tiny_config["training"] |= {"max_steps": 1, "learning_rate": 1e-5}
    summary = train(tiny_config, console=QUIET)
    card = (Path(summary["output_dir"]) / "README.md").read_text()
    assert yaml.safe_load(card.split("---")[1])["library_name"] == "transformers"
    assert "full fine-tuning (" in card and "tunewise merge" not in card  # nothing to merge
    assert 'began with the system prompt "Say \\"ok\\".": send it first' in card
    assert "this directory's chat template opens a conversation without a system message with it" in card
    # The directory is the model servers load: its chat template opens with the system prompt, as training did,
    # and a conversation with its own system message keeps it.
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(summary["output_dir"])
    user = [{"role": "user", "content": "hi"}]
    with_prompt = [{"role": "system", "content": 'Say "ok".'}, *user]
    assert saved.apply_chat_template(user, tokenize=False) == saved.apply_chat_template(
        with_prompt, tokenize=False
    )
    assert 'Say "ok".' in saved.apply_chat_template(user, tokenize=False)
    own = [{"role": "system", "content": "Be brief."}, *user]
    assert 'Say "ok".' not in saved.apply_chat_template(own, tokenize=False)


def test_an_output_dir_that_cannot_be_written_is_a_config_error_before_loading(
    tiny_config: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file as output_dir, or under one, failed at the first write, after the model and data had loaded."""
    import tunewise.run

    loaded: list[str] = []
    monkeypatch.setattr(tunewise.run, "prepare_model", lambda cfg: loaded.append("model"))
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    for output_dir, says in ((a_file, "is a file"), (a_file / "run", f"is under {a_file}, a file")):
        tiny_config["training"]["output_dir"] = str(output_dir)
        with pytest.raises(ConfigError) as info:
            train(tiny_config, console=QUIET)
        (problem,) = info.value.problems
        assert problem.path == "training.output_dir"
        assert problem.message == f"{output_dir} {says}: give a directory (it is created if missing)"
    assert loaded == [] and a_file.read_text() == "mine"


def test_loss_falls_and_only_adapter_weights_change(trained: tuple[dict, dict], tiny_model_dir: Path) -> None:
    config, summary = trained
    out = Path(config["training"]["output_dir"])
    losses = [
        json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x
    ]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05
    assert summary["eval_after"]["eval_loss"] < summary["eval_before"]["eval_loss"] - 0.1

    adapter = load_file(out / "adapter_model.safetensors")
    lora_b = [t for k, t in adapter.items() if "lora_B" in k]
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b)  # B starts at zero: nonzero means trained
    assert not any("lora" not in k for k in adapter), "only adapter tensors are saved"

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)
    merged_base = reloaded.get_base_model().state_dict()
    for name, tensor in base.state_dict().items():
        peft_name = name.replace(".weight", ".base_layer.weight")
        frozen = merged_base.get(peft_name, merged_base.get(name))
        assert torch.equal(tensor, frozen), f"base weight {name} changed"


def test_config_yaml_reproduces_the_run(trained: tuple[dict, dict]) -> None:
    config, summary = trained
    out = Path(config["training"]["output_dir"])
    again = yaml.safe_load((out / "config.yaml").read_text())
    again["training"]["output_dir"] = str(out.parent / "again")
    second = train(again, console=QUIET)
    assert second["eval_after"]["eval_loss"] == pytest.approx(summary["eval_after"]["eval_loss"], abs=1e-6)


def test_python_api_accepts_a_yaml_path(tiny_config: dict, tmp_path: Path) -> None:
    tiny_config["training"]["max_steps"] = 2
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_config))
    summary = tunewise.train(str(path), overrides=["training.learning_rate=1e-3"])
    assert summary["total_steps"] == 2
    assert yaml.safe_load((Path(tiny_config["training"]["output_dir"]) / "config.yaml").read_text())[
        "training"
    ]["learning_rate"] == pytest.approx(1e-3)


def test_cli_plan_json(tiny_config: dict, tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_config))
    result = CliRunner().invoke(
        app, ["plan", str(path), "--json", "--set", "max_steps=-1", "--set", "num_train_epochs=2"]
    )
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    # 64 rows, batch 8, accumulation 1 -> 8 steps per epoch, 2 epochs
    assert plan["steps_per_epoch"] == 8 and plan["total_steps"] == 16
    assert plan["effective_batch_size"] == 8
    assert plan["precision"] == "fp32"
    assert 0 < plan["trainable_parameters"] < plan["total_parameters"]
    assert plan["errors"] == []
    assert isinstance(plan["lints"], list)
    # Activations measured on the largest micro-batch itself, added to this method's static memory.
    a, lora = plan["activations"], plan["memory_by_method"]["lora"]
    assert a["largest_micro_batch_bytes"] > 100 * plan["largest_micro_batch_tokens"] > 0
    assert a["per_token_bytes"] == round(a["largest_micro_batch_bytes"] / plan["largest_micro_batch_tokens"])
    assert a["run_bytes"] == lora["total_bytes"] + a["largest_micro_batch_bytes"]
    assert a["device_memory_bytes"] > a["run_bytes"] and a["out_of_memory"] is None and a["measured"]


@pytest.mark.parametrize("torch_dtype", ["auto", "bfloat16"])
def test_plan_counts_each_method_in_the_dtype_it_would_load(
    tiny_config: dict, tmp_path: Path, torch_dtype: str
) -> None:
    """A bf16 LoRA run loads its frozen base in bf16; a full fine-tune would keep fp32 weights (torch_dtype auto),
    so the plan's full row counts 4 bytes a weight, not the run's 2. A torch_dtype the user set holds for all."""
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_config))
    sets = ["--set", "precision=bf16", "--set", f"torch_dtype={torch_dtype}"]
    result = CliRunner().invoke(app, ["plan", str(path), "--json", *sets])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    full, lora = plan["memory_by_method"]["full"], plan["memory_by_method"]["lora"]
    weight_bytes = 4 if torch_dtype == "auto" else 2
    assert full["weights_bytes"] == weight_bytes * full["trainable_parameters"]
    # LoRA's frozen base in bf16 either way, its adapters in fp32 (PEFT's autocast_adapter_dtype).
    frozen = plan["total_parameters"] - lora["trainable_parameters"]
    assert lora["weights_bytes"] == 2 * frozen + 4 * lora["trainable_parameters"]


def test_cli_plan_warns_when_the_largest_micro_batch_will_not_fit(
    tiny_config: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A device smaller than the measured run, and a device where the forward itself runs out: a warning with the
    fixes, before anything trains."""
    import psutil

    from tunewise.models import activations

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_config))

    def memory_lints() -> list[dict]:
        result = CliRunner().invoke(app, ["plan", str(path), "--json"])
        assert result.exit_code == 0, result.output
        return [
            x
            for x in json.loads(result.stdout)["lints"]
            if "GiB" in x["message"] or "of memory" in x["message"]
        ]

    assert memory_lints() == []
    small = psutil.virtual_memory()._replace(total=2**20)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: small)
    (tight,) = memory_lints()
    assert tight["key"] == "training.per_device_train_batch_size"
    assert "more than the 0.0 GiB of this cpu" in tight["message"]
    assert "set data.packing: true;" in tight["fix"]  # no budget fits a 1 MiB device

    # A device a little short of this run: the suggested budget fills at most 70% of it with what the plan counts.
    plan = json.loads(CliRunner().invoke(app, ["plan", str(path), "--json", "--set", "packing=true"]).stdout)
    static, per_token = (
        plan["memory_by_method"]["lora"]["total_bytes"],
        plan["activations"]["per_token_bytes"],
    )
    device = plan["activations"]["run_bytes"] - 1
    monkeypatch.setattr(psutil, "virtual_memory", lambda: small._replace(total=device))
    result = CliRunner().invoke(app, ["plan", str(path), "--json", "--set", "packing=true"])
    (short,) = [x for x in json.loads(result.stdout)["lints"] if "GiB" in x["message"]]
    budget = int(short["fix"].split("max_tokens_per_micro_batch: ")[1].split(";")[0])
    assert budget % 64 == 0 and budget >= 128  # on the pad multiple, at least max_seq_length
    assert static + per_token * budget <= 0.7 * device < static + per_token * (budget + 64)
    monkeypatch.undo()

    def out_of_memory(*args: object) -> int:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB.")

    monkeypatch.setattr(activations, "saved_for_backward", out_of_memory)
    (failed,) = memory_lints()
    assert failed["message"] == (
        "the plan ran out of memory measuring the largest micro-batch's forward (CUDA out of memory. Tried to "
        "allocate 9.00 GiB.)"
    )


AUTO_BATCH = {
    "per_device_train_batch_size": "auto",
    "gradient_accumulation_steps": "auto",
    "effective_batch_size": 16,
}


@pytest.mark.parametrize("launch", ["torchrun", "--processes"])
@pytest.mark.parametrize("batch", [AUTO_BATCH, {}], ids=["auto", "8x1"])
def test_cli_plan_resolves_for_the_processes_train_would_run(
    tiny_config: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, launch: str, batch: dict
) -> None:
    """Auto batch keys and step counts depend on the process count: `plan` under a launcher (WORLD_SIZE, as
    torchrun sets it) or with --processes must resolve them as `train` does with that many processes (auto: 4 x 2
    accumulation a process, not 4 x 4; a fixed 8 x 1: 4 steps of 16, not 8 of 8)."""
    tiny_config["training"].update(max_steps=-1, num_train_epochs=1, warmup_ratio=0.5, **batch)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_config))
    if launch == "torchrun":
        for name, value in {"WORLD_SIZE": "2", "LOCAL_RANK": "0", "RANK": "0"}.items():
            monkeypatch.setenv(name, value)
    args = ["plan", str(path), "--json", *(["--processes", "2"] if launch == "--processes" else [])]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)

    trained = prepare(tiny_config, world_size=2)  # what `train` resolves with PartialState's 2 processes
    alone = prepare(tiny_config)
    keys = ("per_device_train_batch_size", "gradient_accumulation_steps", "total_steps", "warmup_steps")
    resolved = {key: plan["choices"][f"training.{key}"]["value"] for key in keys}
    assert resolved == {key: trained.resolution.choices[f"training.{key}"].value for key in keys}
    assert resolved != {key: alone.resolution.choices[f"training.{key}"].value for key in keys}
    assert plan["total_steps"] == trained.steps.plan.total_steps == 4  # 64 rows / 16 a step
    assert (
        plan["world_size"] == 2
        and ("WORLD_SIZE=2" if launch == "torchrun" else "--processes 2") in (plan["world_size_reason"])
    )
    # Another rank of the launch prints nothing; a count the launcher contradicts is an error.
    if launch == "torchrun":
        monkeypatch.setenv("RANK", "1")
        assert CliRunner().invoke(app, ["plan", str(path), "--json"]).stdout == ""
        monkeypatch.setenv("RANK", "0")
        refused = CliRunner().invoke(app, ["plan", str(path), "--json", "--processes", "4"])
        assert refused.exit_code == 2
        assert "--processes 4, but the launcher started 2" in json.loads(refused.stdout)["errors"][0]


@pytest.mark.parametrize("bnb_runs", [True, False])
def test_cli_plan_names_the_optimizer_train_builds(
    tiny_config: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bnb_runs: bool
) -> None:
    """paged_adamw_8bit on CPU: paging needs CUDA, so train builds adamw_8bit (or torch's AdamW where bitsandbytes
    cannot step); the plan names that one and why, counts its state, and train builds the very same."""
    from tunewise.run import build_optimization
    from tunewise.training import optim

    monkeypatch.setattr(optim, "_bnb_runs_on", lambda device, bits: bnb_runs)
    tiny_config["training"]["optim"] = "paged_adamw_8bit"
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_config))
    result = CliRunner().invoke(app, ["plan", str(path)], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    built = "adamw_8bit" if bnb_runs else "adamw_torch"
    row = next(line for line in result.stdout.splitlines() if line.startswith("training.optim"))
    assert row.split()[1:4] == [built, "auto", "paged_adamw_8bit"]
    assert f"{built} state" in result.stdout  # the memory table counts its state

    plan = json.loads(CliRunner().invoke(app, ["plan", str(path), "--json"]).stdout)
    choice = plan["choices"]["training.optim"]
    assert (choice["value"], choice["source"]) == (built, "auto")
    assert choice["reason"].startswith(
        "paged_adamw_8bit pages optimizer state through CUDA unified memory; using adamw_8bit on cpu"
    )
    assert (
        "cannot step a 8-bit optimizer on cpu; using adamw_torch instead" in choice["reason"]
    ) is not bnb_runs
    prep = prepare(tiny_config)
    optimizer, _ = build_optimization(prep)
    assert type(optimizer).__module__.startswith("bitsandbytes" if bnb_runs else "torch.optim")
    assert getattr(optimizer, "is_paged", False) is False


def test_cli_plan_says_how_the_steps_were_counted(tiny_config: dict, tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_config))

    def steps_line(*sets: str) -> str:
        args = ["plan", str(path), *[a for s in sets for a in ("--set", s)]]
        result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        (line,) = [x for x in result.stdout.splitlines() if x.startswith("steps:")]
        return line

    # 64 rows, batch 8: 8 steps per epoch. max_steps overrides epochs (HF), and the line says so.
    assert steps_line("max_steps=3", "num_train_epochs=2").startswith(
        "steps: 3 optimizer steps (max_steps; 8 per pass over the data, so 0.375 passes)"
    )
    assert steps_line("max_steps=-1", "num_train_epochs=1.5").startswith(
        "steps: 8/epoch x 1.5 epochs = 12 optimizer steps"
    )
    plan = json.loads(CliRunner().invoke(app, ["plan", str(path), "--json", "--set", "max_steps=3"]).stdout)
    assert plan["max_steps_overrides"] is True and plan["total_steps"] == 3


def test_a_config_without_output_dir_runs_into_runs_named_after_it(tiny_config: dict, tmp_path: Path) -> None:
    del tiny_config["training"]["output_dir"]
    path = tmp_path / "exp-7.yaml"
    path.write_text(yaml.safe_dump(tiny_config))
    result = CliRunner().invoke(app, ["plan", str(path)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    row = next(line.split() for line in result.stdout.splitlines() if line.startswith("training.output_dir"))
    assert row[1:] == ["runs/exp-7", "auto", "named", "after", "exp-7.yaml"]
    plan = json.loads(CliRunner().invoke(app, ["plan", str(path), "--json"]).stdout)
    assert plan["output_dir"] == "runs/exp-7"


def test_cli_plan_fits_80_columns_without_cutting_setting_names(tiny_config: dict, tmp_path: Path) -> None:
    from tunewise.report import PLAN_KEYS

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_config))
    result = CliRunner().invoke(app, ["plan", str(path)], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert max(map(len, lines)) <= 80 and "…" not in result.stdout
    shown = {line.split()[0] for line in lines if line.split() and line.split()[0] in PLAN_KEYS}
    assert {"training.per_device_train_batch_size", "training.gradient_accumulation_steps"} <= shown
    assert "data.pad_to_multiple_of" in shown
    # Settings no rule resolves say where their value came from too: the config file or the schema's default.
    sources = {
        line.split()[0]: line.split()[2] for line in lines if line.split()[:1] and line.split()[0] in shown
    }
    assert sources["training.optim"] == "default"
    assert sources["data.max_seq_length"] == "user"  # tiny_config sets it


def test_cli_plan_shows_the_bf16_cpu_batch_rounding(tiny_config: dict, tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_config))

    def choice(*sets: str) -> dict:
        args = ["plan", str(path), "--json", *[a for s in sets for a in ("--set", s)]]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)["choices"]["data.pad_to_multiple_of"]

    rounded = choice("precision=bf16")
    assert (rounded["value"], rounded["source"]) == (64, "auto") and "oneDNN" in rounded["reason"]
    assert choice("precision=fp32")["value"] is None
    assert choice("precision=bf16", "pad_to_multiple_of=16") == {"value": 16, "source": "user", "reason": ""}


def test_cli_plan_suggests_packing_when_padding_is_heavy(tiny_config: dict, tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_config))

    def packing_lints(*sets: str) -> list[dict]:
        args = ["plan", str(path), "--json", *[a for s in sets for a in ("--set", s)]]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        return [x for x in json.loads(result.stdout)["lints"] if x["key"] == "data.packing"]

    # Examples padded to max_seq_length 128: the lint quotes the waste `data inspect` reports.
    (heavy,) = packing_lints("padding=max_length")
    inspect = CliRunner().invoke(app, ["data", "inspect", str(path), "--json", "--set", "padding=max_length"])
    padding = json.loads(inspect.stdout)["padding"]
    expected = padding[padding["configured_strategy"]]["waste_percent"]
    assert expected > 25 and heavy["message"].startswith(f"{expected:.0f}% of the tokens")
    assert heavy["fix"].startswith("set packing: true")
    assert packing_lints("packing=true") == []


def test_cli_plan_warns_of_bf16_on_a_cpu_without_bf16_instructions(tiny_config: dict, tmp_path: Path) -> None:
    from tunewise.config.resolve import probe_hardware

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_config))

    def precision_lints(precision: str) -> list[str]:
        result = CliRunner().invoke(app, ["plan", str(path), "--json", "--set", f"precision={precision}"])
        assert result.exit_code == 0, result.output
        return [x["message"] for x in json.loads(result.stdout)["lints"] if x["key"] == "training.precision"]

    warned = [m for m in precision_lints("bf16") if m.startswith("bf16 on a CPU without bf16 matmul")]
    assert len(warned) == (0 if probe_hardware().bf16_supported else 1)  # the probe reaches the plan
    assert precision_lints("fp32") == []


def test_cli_plan_reports_config_errors_with_nonzero_exit(tiny_config: dict, tmp_path: Path) -> None:
    tiny_config["training"]["learning_rate"] = -1
    tiny_config["data"]["max_seq_len"] = 10
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(tiny_config))
    result = CliRunner().invoke(app, ["plan", str(path), "--json"])
    assert result.exit_code != 0
    errors = " ".join(json.loads(result.stdout)["errors"])
    assert "training.learning_rate" in errors and "max_seq_length" in errors


def test_cli_train_refuses_bad_config_before_training(tiny_config: dict, tmp_path: Path) -> None:
    tiny_config["generation"]["top_p"] = 1.5
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(tiny_config))
    result = CliRunner().invoke(app, ["train", str(path)])
    assert result.exit_code == 2
    assert "generation.top_p" in result.output
    assert not Path(tiny_config["training"]["output_dir"]).exists()


def test_cli_generate_with_run_directory(trained: tuple[dict, dict]) -> None:
    config, _ = trained
    out = config["training"]["output_dir"]
    result = CliRunner().invoke(
        app, ["generate", "reverse: red blue", "--model", out, "--set", "max_new_tokens=5"]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.strip()


def test_cli_chat_and_generate_with_a_missing_model_fail_with_the_reason(tmp_path: Path) -> None:
    missing = str(tmp_path / "merged")
    for args in (["chat", "--model", missing], ["generate", "hi", "--model", missing]):
        result = CliRunner().invoke(app, args, input="hello\n\n", env={"COLUMNS": "400"})
        assert result.exit_code == 2, result.output
        assert f"error: model_name_or_path: {missing} does not exist" in " ".join(result.output.split())
        assert result.exception is None or isinstance(result.exception, SystemExit)


def test_cli_generate_refuses_a_setting_that_would_do_nothing(trained: tuple[dict, dict]) -> None:
    out = trained[0]["training"]["output_dir"]
    args = ["generate", "hi", "--model", out, "--set", "max_new_tokens=2", "--set", "learning_rate=1"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "400"})
    assert result.exit_code == 2, result.output
    assert (
        "training.learning_rate: does nothing when answering (generate and chat read generation.*"
        in " ".join(result.output.split())
    )


def test_plan_for_a_gpu_run_measures_on_the_gpu_and_says_when_the_weights_do_not_fit(
    tiny_config: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`tunewise plan` loads the model on the host; for a run that trains on a GPU it measures there, against
    the GPU's memory. Where moving the weights runs out of memory, the plan says so instead of measuring."""
    import dataclasses
    from types import SimpleNamespace

    from tunewise.report import activation_memory, largest_micro_batch
    from tunewise.run import prepare

    prep = prepare(tiny_config)
    prep.hardware = dataclasses.replace(prep.hardware, device_type="cuda")
    moved: list[str] = []

    def no_room(device: str) -> None:
        moved.append(device)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB.")

    monkeypatch.setattr(prep.model, "to", no_room)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda index: SimpleNamespace(total_memory=8 * 2**30)
    )
    a = activation_memory(prep, largest_micro_batch(prep), static_bytes=1000)
    assert moved == ["cuda"]
    assert a["out_of_memory"] == "the weights on the GPU (CUDA out of memory. Tried to allocate 20.00 MiB.)"
    assert a["device_memory_bytes"] == 8 * 2**30 and a["largest_micro_batch_bytes"] == 0


def test_train_prints_the_plan_without_an_extra_forward(
    tiny_config: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An eager forward of the largest micro-batch at train start would add its memory to the run's own peak
    (more than a compiled step keeps): `train`'s plan leaves the activations to `tunewise plan`."""
    from rich.console import Console

    from tunewise.models import activations

    def forbidden(*args: object) -> int:
        raise AssertionError("train measured activations")

    monkeypatch.setattr(activations, "saved_for_backward", forbidden)
    tiny_config["training"]["max_steps"] = 2
    console = Console(file=io.StringIO(), width=200)
    summary = train(tiny_config, console=console)
    assert summary["total_steps"] == 2
    assert "activations: not measured here (`tunewise plan` measures them" in console.file.getvalue()  # type: ignore[attr-defined]
