"""`tunewise generate` and `chat` on the tiny model: what they print, and how they refuse; the user's and the
model's text in what the other commands print."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.main import get_command
from typer.testing import CliRunner

from tunewise.cli import app
from tunewise.config.load import dump_config, load_config
from tunewise.infer import chat
from tunewise.infer.generate import SamplingSettings
from tunewise.testing import CHATML, build_tiny_model, build_tiny_tokenizer, save_tiny_model


def tiny_run(tiny_model_dir: Path, folder: Path, config: dict) -> Path:
    """A full fine-tune's run directory, cheaply: the tiny model with a config.yaml beside it."""
    shutil.copytree(tiny_model_dir, folder)
    (folder / "config.yaml").write_text(dump_config(load_config(config)))
    return folder


def with_template(folder: Path, template: str | None) -> Path:
    """The tiny model with its tokenizer's chat template replaced."""
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = template
    build_tiny_model(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def custom_code_model(folder: Path) -> Path:
    """The tiny model as a trust_remote_code model: its config and model classes are .py files beside it."""
    save_tiny_model(folder)
    (folder / "configuration_tiny.py").write_text(
        "from transformers import LlamaConfig\n\n\nclass TinyConfig(LlamaConfig):\n    model_type = 'tinycustom'\n"
    )
    (folder / "modeling_tiny.py").write_text(
        "from transformers import LlamaForCausalLM\n\nfrom .configuration_tiny import TinyConfig\n\n\n"
        "class TinyForCausalLM(LlamaForCausalLM):\n    config_class = TinyConfig\n"
    )
    config = json.loads((folder / "config.json").read_text())
    config |= {
        "model_type": "tinycustom",
        "architectures": ["TinyForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_tiny.TinyConfig",
            "AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM",
        },
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder


ANSWERS = ["x = arr[i] + arr[b]", "end [/code]", "[bold]not bold[/] :smile:", "a long line " * 20]


@pytest.mark.parametrize("text", ANSWERS)
def test_answers_are_printed_verbatim(
    text: str, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rich markup ate `[i]` and raised on `[/code]`; the answer is text, and one line stays one line."""
    monkeypatch.setattr(chat, "generate", lambda *args: [text])
    result = CliRunner().invoke(app, ["generate", "hi", "--model", str(tiny_model_dir)])
    assert result.exit_code == 0, result.output
    assert result.stdout == text + "\n"
    result = CliRunner().invoke(app, ["chat", "--model", str(tiny_model_dir)], input="hi\n\n")
    assert result.exit_code == 0, result.output
    assert " ".join(f"model> {text}".split()) in " ".join(result.stdout.split())  # wrapped at 80 columns


def test_chat_refuses_a_template_before_the_first_prompt(tiny_model_dir: Path, tmp_path: Path) -> None:
    no_template = with_template(tmp_path / "no-template", None)
    cases = {
        "has no chat template": ["--model", str(no_template)],
        "'chatmll' is neither a known template": [
            "--model",
            str(tiny_model_dir),
            "--set",
            "chat_template=chatmll",
        ],
    }
    for message, args in cases.items():
        result = CliRunner().invoke(app, ["chat", *args], input="hi\n\n")
        assert result.exit_code == 2, result.output
        assert message in " ".join(result.output.split()) and "you>" not in result.output


def test_a_template_that_cannot_render_a_turn_is_an_error_not_a_traceback(tmp_path: Path) -> None:
    """The first prompt renders when chat starts; a later turn the template refuses ends the chat cleanly."""
    one_turn = "{% if messages|length > 1 %}{{ raise_exception('one turn only') }}{% endif %}" + CHATML
    model = with_template(tmp_path / "one-turn", one_turn)
    args = ["--model", str(model), "--set", "max_new_tokens=2"]
    result = CliRunner().invoke(app, ["chat", *args], input="hi\nagain\n\n")
    assert result.exit_code == 2, result.output  # an uncaught exception exits 1
    assert result.output.count("model>") == 1
    assert (
        "error: the chat template cannot render a conversation of user, assistant, user (one turn only)"
        in (" ".join(result.output.split()))
    )
    # With a system prompt the very first conversation has two turns: refused before anyone types.
    result = CliRunner().invoke(app, ["chat", *args, "--set", "system_prompt=Be brief."], input="hi\n\n")
    assert result.exit_code == 2 and "you>" not in result.output
    assert "conversation of system, user (one turn only)" in " ".join(result.output.split())


def record_sampling(monkeypatch: pytest.MonkeyPatch) -> list[SamplingSettings]:
    """Stands in for generation; returns the list of settings each answer was asked with."""
    seen: list[SamplingSettings] = []

    def generate(
        model: object, tokenizer: object, conversations: list, settings: SamplingSettings, *rest: object
    ) -> list[str]:
        seen.append(settings)
        return ["ok"]

    monkeypatch.setattr(chat, "generate", generate)
    return seen


def test_sampling_keys_greedy_decoding_ignores(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--set temperature=0.7` alone decoded greedily and said nothing; the same in a run's config.yaml warns."""
    seen = record_sampling(monkeypatch)
    model = ["generate", "hi", "--model", str(tiny_model_dir)]
    result = CliRunner().invoke(app, [*model, "--set", "temperature=0.7"])
    assert result.exit_code == 2 and seen == []
    said = " ".join(result.output.split())
    assert "generation.temperature: ignored: `do_sample` is false" in said and "[--set]" in said
    result = CliRunner().invoke(app, [*model, "--set", "do_sample=true", "--set", "temperature=0.7"])
    assert result.exit_code == 0 and result.stderr == ""
    assert (seen[-1].do_sample, seen[-1].temperature) == (True, 0.7)

    run = tiny_run(tiny_model_dir, tmp_path / "run", {"generation": {"temperature": 0.7}})
    result = CliRunner().invoke(app, ["generate", "hi", "--model", str(run)])
    assert result.exit_code == 0, result.output
    warning = " ".join(result.stderr.split())
    assert warning.startswith("warning: generation.temperature: ignored: `do_sample` is false")
    assert f"[{run / 'config.yaml'}:" in warning
    assert result.stdout == "ok\n" and seen[-1].generate_kwargs()["do_sample"] is False  # as it said


def test_the_help_example_samples() -> None:
    """The --help example was `--set temperature=0.7`, which greedy decoding ignored (refused now)."""
    for command in ("generate", "chat"):
        option = next(p for p in get_command(app).commands[command].params if p.name == "set_")  # type: ignore[attr-defined]
        assert "e.g. --set do_sample=true --set temperature=0.7 " in option.help


def test_a_run_config_from_another_version_answers_with_a_warning(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = record_sampling(monkeypatch)
    run = tiny_run(tiny_model_dir, tmp_path / "run", {"generation": {"max_new_tokens": 7}})
    saved = yaml.safe_load((run / "config.yaml").read_text())
    saved["training"]["old_removed_key"] = 1
    saved["future_section"] = {"x": 1}
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    result = CliRunner().invoke(app, ["generate", "hi", "--model", str(run)])
    assert result.exit_code == 0, result.output
    warnings = [" ".join(w.split()) for w in result.stderr.split("warning: ")[1:]]
    assert {w.split(":")[0] for w in warnings} == {"training.old_removed_key", "future_section"}
    assert all("ignored (written by another tunewise version?)" in w for w in warnings)
    assert (
        result.stdout == "ok\n" and seen[-1].max_new_tokens == 7
    )  # the rest of the run's config still applies
    # The user's own typo is still an error.
    result = CliRunner().invoke(
        app, ["generate", "hi", "--model", str(run), "--set", "generation.tempreature=1"]
    )
    assert result.exit_code == 2
    assert "generation.tempreature: unknown key; did you mean `temperature`?" in " ".join(
        result.output.split()
    )


def test_plan_prints_bracketed_paths_as_text(
    tiny_model_dir: Path, tiny_config: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rich markup ate `[v2]` from a path: the plan showed another output directory than the run's."""
    from rich.console import Console

    from tunewise import cli

    monkeypatch.setattr(cli, "console", Console(width=400))  # no wrapping: the paths stay on one line
    model = shutil.copytree(tiny_model_dir, tmp_path / "tiny[best]")
    tiny_config["model"]["model_name_or_path"] = str(model)
    tiny_config["training"]["output_dir"] = str(tmp_path / "runs[v2]")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tiny_config))
    result = CliRunner().invoke(app, ["plan", str(path)])
    assert result.exit_code == 0, result.output
    assert f"model {model} (" in result.stdout
    assert f"training.output_dir {tmp_path / 'runs[v2]'} " in " ".join(result.stdout.split())


def test_a_custom_code_model_answers_as_its_run_says_or_with_trust_remote_code_set(tmp_path: Path) -> None:
    """A full fine-tune of a trust_remote_code model loads as its run's config.yaml says; its merge (no
    config.yaml) with `--set trust_remote_code=true`. Both were refused: the setting was read for adapters only,
    and the --set was "does nothing when answering"."""
    merged = custom_code_model(tmp_path / "merged")
    model = {"model_name_or_path": str(merged), "trust_remote_code": True}
    run = tiny_run(merged, tmp_path / "run", {"model": model})
    assert type(chat.load_generation_model(str(run))[0]).__name__ == "TinyForCausalLM"
    short = ["--set", "max_new_tokens=3"]
    refused = CliRunner().invoke(app, ["generate", "hi", "--model", str(merged), *short])
    assert refused.exit_code == 2, refused.output
    said = " ".join(refused.output.split())
    assert "needs custom code" in said and "(`--set trust_remote_code=true` for generate and chat)" in said
    answers = []
    for args in (
        ["--model", str(run)],
        ["--model", str(merged), "--set", "trust_remote_code=true"],
        ["--model", str(merged), "--set", "model.trust_remote_code=true"],
    ):
        result = CliRunner().invoke(app, ["generate", "hi", *args, *short])
        assert result.exit_code == 0, result.output
        answers.append(result.stdout)
    assert answers[0] == answers[1] == answers[2]
    # The --set wins over the run's config.yaml.
    refused = CliRunner().invoke(
        app, ["generate", "hi", "--model", str(run), "--set", "trust_remote_code=false"]
    )
    assert refused.exit_code == 2 and "needs custom code" in " ".join(refused.output.split())


def test_a_templates_own_end_of_turn_marker_stops_generation_though_no_list_names_it() -> None:
    # A marker outside END_OF_TURN_MARKERS is found by rendering the template: what it ends an assistant turn with.
    from tunewise.data.tokenize import NAMED_TEMPLATES
    from tunewise.infer.generate import stop_token_ids
    from tunewise.testing import build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|turn_over|>"]})
    template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|turn_over|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    model = build_tiny_model(len(tokenizer))
    marker = tokenizer.convert_tokens_to_ids("<|turn_over|>")
    assert marker in stop_token_ids(model, tokenizer, template)
    assert marker not in stop_token_ids(model, tokenizer, NAMED_TEMPLATES["chatml"])
