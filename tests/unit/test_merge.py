"""Merging adapters into full models, finding moved bases, and generating from runs, adapters and merges."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from tunewise.cli import app
from tunewise.infer.chat import answer, load_generation_model
from tunewise.models.load import ModelLoadError, load_model, load_tokenizer
from tunewise.models.merge import find_adapter_base, merge_adapter
from tunewise.run import train
from tunewise.testing import build_tiny_model, build_tiny_tokenizer, tiny_chat_rows

IDS = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(0))


def logits(model: torch.nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def save_adapter(base_dir: Path, out: Path, **lora: object) -> Path:
    """A PEFT adapter with non-zero updates (init_lora_weights=False), as a trained one would have."""
    torch.manual_seed(0)
    config = LoraConfig(
        task_type="CAUSAL_LM", r=4, target_modules="all-linear", init_lora_weights=False, **lora
    )
    get_peft_model(load_model(base_dir), config).save_pretrained(out)
    load_tokenizer(base_dir).save_pretrained(out)
    return out


@pytest.mark.parametrize(
    "lora", [{}, {"use_dora": True, "modules_to_save": ["lm_head"]}], ids=["lora", "dora+lm_head"]
)
def test_merged_model_equals_base_plus_adapter(tiny_model_dir: Path, tmp_path: Path, lora: dict) -> None:
    adapter = save_adapter(tiny_model_dir, tmp_path / "adapter", **lora)
    result = merge_adapter(adapter, tmp_path / "merged")
    files = {p.name for p in result.output_dir.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= files
    assert "adapter_config.json" not in files
    merged = AutoModelForCausalLM.from_pretrained(result.output_dir)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    with_adapter = PeftModel.from_pretrained(load_model(tiny_model_dir), adapter)
    assert torch.allclose(logits(merged), logits(with_adapter), atol=1e-4, rtol=0)
    assert not torch.allclose(logits(merged), logits(load_model(tiny_model_dir)), atol=1e-2)
    assert result.notes == [f"base model {tiny_model_dir} (recorded in adapter_config.json)"]


def test_a_half_precision_merge_is_the_float32_merge_rounded_once(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    adapter = save_adapter(tiny_model_dir, tmp_path / "adapter")
    full = merge_adapter(adapter, tmp_path / "fp32").output_dir
    result = CliRunner().invoke(
        app, ["merge", str(adapter), "-o", str(tmp_path / "bf16"), "--dtype", "bfloat16"]
    )
    assert result.exit_code == 0, result.output
    exact = AutoModelForCausalLM.from_pretrained(full, dtype=torch.float32).state_dict()
    half = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype="auto")
    assert half.dtype == torch.bfloat16 and half.config.dtype == torch.bfloat16
    for name, tensor in half.state_dict().items():
        assert torch.equal(tensor, exact[name].to(torch.bfloat16)), name
    sizes = [(folder / "model.safetensors").stat().st_size for folder in (full, tmp_path / "bf16")]
    assert sizes[1] < 0.55 * sizes[0]
    refused = CliRunner().invoke(app, ["merge", str(adapter), "-o", str(tmp_path / "x"), "--dtype", "int8"])
    assert refused.exit_code == 2 and "choose one of float32, bfloat16, float16" in refused.output


def test_a_moved_base_is_found_through_the_runs_config(tiny_model_dir: Path, tmp_path: Path) -> None:
    adapter = save_adapter(tiny_model_dir, tmp_path / "adapter")
    config_path = adapter / "adapter_config.json"
    recorded = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**recorded, "base_model_name_or_path": str(tmp_path / "gone")}))
    with pytest.raises(ModelLoadError, match="does not exist"):
        find_adapter_base(adapter)
    (adapter / "config.yaml").write_text(
        yaml.safe_dump({"model": {"model_name_or_path": str(tiny_model_dir)}})
    )
    found = find_adapter_base(adapter)
    assert found.model_dir == tiny_model_dir and "config.yaml" in found.source
    assert find_adapter_base(adapter, base=str(tiny_model_dir)).source == f"--base {tiny_model_dir}"


def test_merge_refuses_what_it_cannot_do(tiny_model_dir: Path, tmp_path: Path) -> None:
    adapter = save_adapter(tiny_model_dir, tmp_path / "adapter")
    with pytest.raises(ModelLoadError, match="full model"):
        merge_adapter(tiny_model_dir, tmp_path / "out")
    with pytest.raises(ModelLoadError, match="not empty"):
        merge_adapter(adapter, adapter)
    with pytest.raises(ModelLoadError, match="no adapter_config.json"):
        merge_adapter(tmp_path, tmp_path / "out")


def test_a_base_without_a_pad_token_merges_into_a_model_that_pads_and_answers(tmp_path: Path) -> None:
    """A checkpoint-N directory or bare adapter has no tokenizer of its own: the merge took the base's, which for
    Llama or Mistral has no pad token, unlike the tokenizer a run saves. It pads with EOS, as the run did, and
    `generate` answers from the merge, the adapter and the base alike; the base's own tokenizer is unchanged."""
    base = tmp_path / "base"
    tokenizer = build_tiny_tokenizer()
    tokenizer.pad_token = None
    build_tiny_model(len(tokenizer)).save_pretrained(base)
    tokenizer.save_pretrained(base)
    adapter = save_adapter(base, tmp_path / "adapter")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (adapter / name).unlink()  # as a checkpoint-N directory holds it
    merged = merge_adapter(adapter, tmp_path / "merged").output_dir
    assert load_tokenizer(merged).pad_token == "<|im_end|>" == tokenizer.eos_token
    assert load_tokenizer(base).pad_token is None
    hi = [{"role": "user", "content": "hi"}]
    answers = [answer(str(m), hi, ["max_new_tokens=4"]) for m in (merged, adapter, base)]
    assert answers[0] == answers[1] != answers[2]


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA run of two steps from adapters that start non-zero, so it answers unlike the base."""
    root = tmp_path_factory.mktemp("merge-run")
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in tiny_chat_rows(16, seed=1)))
    config = {
        "model": {"model_name_or_path": str(tiny_model_dir)},
        "data": {"dataset": str(data), "max_seq_length": 64},
        "adapter": {"method": "lora", "r": 4, "lora_dropout": 0.0, "init_lora_weights": False},
        "training": {"output_dir": str(root / "run"), "max_steps": 2, "per_device_train_batch_size": 4},
        "generation": {"max_new_tokens": 8},
        "evaluation": {"task_metric": "none", "num_sample_prompts": 0},
    }
    return Path(train(config)["output_dir"])


def test_generate_answers_alike_from_a_run_its_adapter_and_its_merge(run_dir: Path, tmp_path: Path) -> None:
    bare_adapter = tmp_path / "adapter"  # only PEFT's files and the tokenizer: no config.yaml
    shutil.copytree(
        run_dir, bare_adapter, ignore=shutil.ignore_patterns("config.yaml", "checkpoint-*", "*.jsonl")
    )
    merged = tmp_path / "merged"
    result = CliRunner().invoke(app, ["merge", str(run_dir), "--output", str(merged)])
    assert result.exit_code == 0, result.output
    assert "Merged model written to" in result.output

    models = {
        name: load_generation_model(str(path))[0]
        for name, path in [("run", run_dir), ("adapter", bare_adapter), ("merged", merged)]
    }
    assert isinstance(models["run"], PeftModel) and isinstance(models["adapter"], PeftModel)
    assert not isinstance(models["merged"], PeftModel)
    reference = logits(models["run"])
    for name in ("adapter", "merged"):
        assert torch.allclose(logits(models[name]), reference, atol=1e-4, rtol=0), name

    messages = [{"role": "user", "content": "reverse: red blue"}]
    answers = {
        name: answer(str(path), messages, ["generation.max_new_tokens=8"])
        for name, path in [("run", run_dir), ("adapter", bare_adapter), ("merged", merged)]
    }
    assert answers["run"] == answers["adapter"] == answers["merged"]
    assert len(answers["run"]) > 0


def test_cli_merge_says_what_is_wrong(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["merge", str(tmp_path), "--output", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "has no adapter_config.json: give a run directory" in " ".join(result.output.split())


def test_a_runs_system_prompt_opens_its_conversations(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run trained with data.system_prompt saw it first in every example; generate and chat start with it."""
    from tunewise.infer import chat

    prompted = tmp_path / "run"
    shutil.copytree(run_dir, prompted, ignore=shutil.ignore_patterns("checkpoint-*"))
    config = yaml.safe_load((prompted / "config.yaml").read_text())
    config["data"] |= {"system_prompt": "Answer in French.", "max_seq_length": 128}
    (prompted / "config.yaml").write_text(yaml.safe_dump(config))
    seen: list[list[dict]] = []

    def record(model: object, tokenizer: object, conversations: list[list[dict]], *rest: object) -> list[str]:
        seen.extend(conversations)
        return ["ok"]

    monkeypatch.setattr(chat, "generate", record)

    user = [{"role": "user", "content": "hi"}]
    own = [{"role": "system", "content": "Be brief."}, *user]
    answer(str(prompted), user, [])
    answer(str(prompted), own, [])
    answer(str(run_dir), user, [])  # trained without one
    answer(str(run_dir), user, ["system_prompt=Answer in German."])
    assert seen == [
        [{"role": "system", "content": "Answer in French."}, *user],
        own,
        user,
        [{"role": "system", "content": "Answer in German."}, *user],
    ]


def test_a_seed_given_to_generate_makes_sampling_reproducible(run_dir: Path) -> None:
    user = [{"role": "user", "content": "hi"}]
    sampled = ["do_sample=true", "temperature=2.0", "top_k=0", "max_new_tokens=12"]
    first, again = (answer(str(run_dir), user, [*sampled, "seed=5"]) for _ in range(2))
    other = answer(str(run_dir), user, [*sampled, "training.seed=6"])
    assert first == again and other != first


def one_step_run(model_dir: Path, chat_template: str, folder: Path) -> dict:
    """A one-step LoRA run of `model_dir` on 8 chat rows rendered with `chat_template`, written to folder/run."""
    data = folder / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in tiny_chat_rows(8, seed=3)))
    return {
        "model": {"model_name_or_path": str(model_dir)},
        "data": {"dataset": str(data), "max_seq_length": 64, "chat_template": chat_template},
        "training": {"output_dir": str(folder / "run"), "max_steps": 1, "per_device_train_batch_size": 4},
        "evaluation": {"task_metric": "none", "num_sample_prompts": 0},
    }


def test_a_runs_chat_template_travels_with_its_tokenizer_into_the_merge(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """data.chat_template: zephyr. The run directory's tokenizer, and so its merge (and vLLM, or any
    apply_chat_template), render conversations as training did, not with the base tokenizer's own template."""
    from transformers import AutoTokenizer

    from tunewise.data.tokenize import NAMED_TEMPLATES

    run = Path(train(one_step_run(tiny_model_dir, "zephyr", tmp_path))["output_dir"])
    result = CliRunner().invoke(app, ["merge", str(run), "-o", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    conversation = tiny_chat_rows(1, seed=4)[0]["messages"]
    base = AutoTokenizer.from_pretrained(tiny_model_dir).apply_chat_template(conversation, tokenize=False)
    for folder in (run, tmp_path / "merged"):
        tokenizer = AutoTokenizer.from_pretrained(folder)
        assert tokenizer.chat_template == NAMED_TEMPLATES["zephyr"]
        rendered = tokenizer.apply_chat_template(conversation, tokenize=False)
        assert rendered.startswith("<|user|>") and rendered != base


def test_a_base_model_trained_on_chatml_stops_at_its_end_of_turn_merged_or_fully_tuned(
    tmp_path: Path,
) -> None:
    """A base model (EOS <|endoftext|>, no chat template) trained with data.chat_template: chatml: its merge's
    generation config stops at <|im_end|> too, so transformers' generate or vLLM end the answer there."""
    from transformers import GenerationConfig

    from tunewise.testing import build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    tokenizer.eos_token, tokenizer.chat_template = "<|endoftext|>", None
    base = tmp_path / "base"
    build_tiny_model(len(tokenizer), eos_token_id=tokenizer.eos_token_id).save_pretrained(base)
    tokenizer.save_pretrained(base)
    config = one_step_run(base, "chatml", tmp_path)
    run = Path(train(config)["output_dir"])
    merge_adapter(run, tmp_path / "merged")
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert GenerationConfig.from_pretrained(base).eos_token_id == tokenizer.eos_token_id
    assert GenerationConfig.from_pretrained(tmp_path / "merged").eos_token_id == [tokenizer.eos_token_id, end]
    # A full fine-tune writes its model itself: the same.
    config["adapter"] = {"method": "full"}
    config["training"] |= {"output_dir": str(tmp_path / "full"), "learning_rate": 1e-5}
    full = Path(train(config)["output_dir"])
    assert GenerationConfig.from_pretrained(full).eos_token_id == [tokenizer.eos_token_id, end]


def test_a_merge_renders_prompts_as_its_run_trained_from_the_run_or_a_checkpoint(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """data.system_prompt and data.chat_template: zephyr. The merged tokenizer's chat template renders a
    conversation without a system message as training rendered its row (the system prompt first, zephyr), so
    vLLM or any apply_chat_template prompt the merge as `tunewise generate` prompts the run. A checkpoint-N
    directory (no tokenizer of its own) merged with the base's ChatML template before."""
    from transformers import AutoTokenizer

    from tunewise.data.load import load_records
    from tunewise.data.tokenize import NAMED_TEMPLATES

    config = one_step_run(tiny_model_dir, "zephyr", tmp_path)
    config["data"] |= {"system_prompt": "Answer in French.", "max_seq_length": 128}
    run = Path(train(config)["output_dir"])
    checkpoint = next(run.glob("checkpoint-*"))
    assert not (checkpoint / "tokenizer_config.json").exists()
    trained_rows, _ = load_records(
        config["data"]["dataset"], system_prompt="Answer in French.", cache_dir=tmp_path / "rows"
    )
    trained = trained_rows[0]["messages"]
    assert trained[0] == {"role": "system", "content": "Answer in French."}
    user = [{"role": "user", "content": "reverse: red blue"}]
    own = [{"role": "system", "content": "Be brief."}, *user]
    zephyr = AutoTokenizer.from_pretrained(run)
    for source in (checkpoint, run):
        result = merge_adapter(source, tmp_path / f"merged-{source.name}")
        merged = AutoTokenizer.from_pretrained(result.output_dir)
        assert merged.apply_chat_template(trained[1:], tokenize=False) == zephyr.apply_chat_template(
            trained, chat_template=NAMED_TEMPLATES["zephyr"], tokenize=False
        )
        prompt = merged.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        assert prompt == zephyr.apply_chat_template(
            [trained[0], *user], tokenize=False, add_generation_prompt=True
        )  # what `tunewise generate --model RUN` renders
        assert prompt.startswith("<|system|>\nAnswer in French.")
        assert merged.apply_chat_template(own, tokenize=False) == zephyr.apply_chat_template(
            own, tokenize=False
        )
        assert any("data.system_prompt 'Answer in French.'" in note for note in result.notes)


@pytest.mark.parametrize(
    "prompt",
    [
        "Answer in French.",
        'say "hi" \\ then\nnewline\ttab',
        "{{ not jinja }} {% if %} %} '",
        "Réponds 😀 \x00",
    ],
)
@pytest.mark.parametrize("template", ["chatml", "llama3", "zephyr"])
def test_the_system_prompt_block_inserts_any_prompt_verbatim(prompt: str, template: str) -> None:
    from tunewise.data.tokenize import NAMED_TEMPLATES
    from tunewise.models.merge import default_system_block
    from tunewise.testing import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    jinja = NAMED_TEMPLATES[template]
    user = [{"role": "user", "content": "hi"}]

    def render(messages: list[dict], chat_template: str) -> str:
        return tokenizer.apply_chat_template(
            messages, chat_template=chat_template, tokenize=False, add_generation_prompt=True
        )

    with_block = default_system_block(prompt) + jinja
    assert render(user, with_block) == render([{"role": "system", "content": prompt}, *user], jinja)
    own = [{"role": "system", "content": "Be brief."}, *user]
    assert render(own, with_block) == render(own, jinja)


def test_an_interrupted_merge_leaves_nothing_behind(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Interrupted after the weights, the output held a model without a tokenizer, and a second try refused the
    folder as not empty. A file as --output crashed with NotADirectoryError."""
    from rich.console import Console

    from tunewise import cli
    from tunewise.models import merge

    adapter = save_adapter(tiny_model_dir, tmp_path / "adapter")
    out = tmp_path / "out" / "merged[v2]"
    real = merge.load_tokenizer

    def interrupted_on_save(*args: object, **kwargs: object) -> object:
        tokenizer = real(*args, **kwargs)  # type: ignore[arg-type]

        def save_pretrained(*args: object, **kwargs: object) -> None:
            raise KeyboardInterrupt

        tokenizer.save_pretrained = save_pretrained
        return tokenizer

    monkeypatch.setattr(merge, "load_tokenizer", interrupted_on_save)
    with pytest.raises(KeyboardInterrupt):
        merge_adapter(adapter, out)
    assert list(out.parent.iterdir()) == []
    monkeypatch.setattr(merge, "load_tokenizer", real)
    out.mkdir()  # an empty directory given as --output is filled
    monkeypatch.setattr(cli, "console", Console(width=400))  # one line: the path whole, its `[v2]` kept
    result = CliRunner().invoke(app, ["merge", str(adapter), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert f"Merged model written to {out.resolve()}\n" in result.stdout
    assert {"model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert [p.name for p in out.parent.iterdir()] == ["merged[v2]"]

    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    result = CliRunner().invoke(app, ["merge", str(adapter), "-o", str(a_file)])
    assert result.exit_code == 2
    assert f"--output {a_file} is a file; give a new directory" in " ".join(result.output.split())
