"""The built-in dataset is reproducible and leak-free; sampling settings mean what HF means."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from tunewise.data.build import builtin_files
from tunewise.eval.metrics import choose_task_metric, json_exact_match, score
from tunewise.infer.generate import SamplingSettings, generate, prompt_messages, stop_token_ids
from tunewise.testing import build_tiny_model, build_tiny_tokenizer

ROOT = Path(__file__).resolve().parents[2]


def _load_script() -> object:
    spec = importlib.util.spec_from_file_location(
        "make_builtin_data", ROOT / "scripts" / "make_builtin_data.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_builtin_dataset_regenerates_identically_and_never_leaks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = _load_script()
    monkeypatch.setattr(script, "OUT", tmp_path)
    script.main()  # type: ignore[attr-defined]
    train_file, validation_file = (p[0] for p in builtin_files("builtin:json_extract"))
    assert (tmp_path / "train.jsonl").read_text() == train_file.read_text()
    assert (tmp_path / "validation.jsonl").read_text() == validation_file.read_text()
    train = [json.loads(line) for line in train_file.read_text().splitlines()]
    validation = [json.loads(line) for line in validation_file.read_text().splitlines()]
    assert (len(train), len(validation)) == (800, 60)
    assert not {r["input"] for r in train} & {r["input"] for r in validation}
    for row in validation:
        fields = json.loads(row["output"])
        assert list(fields) == ["name", "city", "item", "quantity", "day"]
        assert all(str(v) in row["input"] for v in fields.values())  # every answer is extractable


def test_temperature_zero_is_greedy_and_sampling_keys_pass_through() -> None:
    assert SamplingSettings(do_sample=True, temperature=0.0).generate_kwargs() == {
        "do_sample": False,
        "repetition_penalty": 1.0,
    }
    assert SamplingSettings(do_sample=False, temperature=0.7).generate_kwargs()["do_sample"] is False
    kwargs = SamplingSettings(
        do_sample=True, temperature=0.7, top_p=0.9, top_k=20, repetition_penalty=1.1
    ).generate_kwargs()
    assert kwargs == {
        "do_sample": True,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 20,
        "repetition_penalty": 1.1,
    }


def test_json_exact_match_ignores_whitespace_not_values() -> None:
    reference = '{"name": "Ravi", "quantity": 46}'
    assert json_exact_match('{"name":"Ravi",  "quantity":46}', reference)
    assert not json_exact_match('{"name": "Ravi", "quantity": "46"}', reference)
    assert not json_exact_match("JSON:\n" + reference, reference)
    assert score("json_exact_match", [reference, "nope"], [reference, reference]) == 0.5
    assert choose_task_metric("auto", [reference]) == "json_exact_match"
    assert choose_task_metric("auto", ["plain words"]) == "exact_match"


@pytest.mark.parametrize(
    ("prediction", "reference", "match"),
    [
        ("1", "true", False),  # Python's True == 1 made these match
        ('{"ok": 1}', '{"ok": true}', False),
        ('{"ok": 0, "n": false}', '{"ok": false, "n": 0}', False),
        ("[true, 0]", "[1, false]", False),
        ('{"ok": true, "n": [false]}', '{"n": [false], "ok": true}', True),
        ('{"n": 1.0}', '{"n": 1}', True),  # JSON has one number type
        ('{"n": null}', '{"n": false}', False),
        ('{"a": [1, 2]}', '{"a": [1, 2, 3]}', False),
    ],
)
def test_json_exact_match_keeps_bools_apart_from_numbers(
    prediction: str, reference: str, match: bool
) -> None:
    assert json_exact_match(prediction, reference) is match


def test_prompt_messages_split_at_the_last_answer() -> None:
    chat = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
    ]
    assert prompt_messages(chat) == (chat[:3], "d")


def test_generation_stops_at_the_templates_end_of_turn_when_eos_is_another_token() -> None:
    """A base model trained with data.chat_template: chatml keeps <|endoftext|> as EOS but ends its answers with
    <|im_end|>: the answer stops there instead of running on into an invented next turn."""
    tok = build_tiny_tokenizer()
    tok.eos_token = "<|endoftext|>"
    model = build_tiny_model(len(tok), eos_token_id=tok.eos_token_id)
    end, letter = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("a")
    forwards: list[int] = []

    def steer(module: torch.nn.Module, args: object, logits: torch.Tensor) -> torch.Tensor:
        """The first new token ends the turn; anything after it is a run of "a"."""
        bias = torch.zeros_like(logits)
        bias[..., letter if forwards else end] = 100.0
        forwards.append(1)
        return logits + bias

    model.lm_head.register_forward_hook(steer)
    user = [{"role": "user", "content": "hi"}]
    assert generate(model, tok, [user], SamplingSettings(max_new_tokens=6), 1, "chatml") == [""]
    assert len(forwards) == 1
    assert stop_token_ids(model, tok, "{{ '<|im_end|>' }}") == [tok.eos_token_id, end]
    assert stop_token_ids(model, tok, "{{ eos_token }}") == [tok.eos_token_id]  # no marker in the template


def test_a_tokenizer_without_a_pad_token_generates_batches_as_single_prompts() -> None:
    """Llama and Mistral tokenizers ship no pad token: the tokenizer refused to pad the batch. Prompts of
    different lengths, left-padded and masked, answer as each does alone, and the tokenizer is left as it was."""
    tok = build_tiny_tokenizer()
    tok.pad_token = None
    model = build_tiny_model(len(tok))
    prompts = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "a much longer question"}]]
    settings = SamplingSettings(max_new_tokens=5)
    batched = generate(model, tok, prompts, settings, 2, "chatml")
    assert batched == [generate(model, tok, [p], settings, 1, "chatml")[0] for p in prompts]
    assert all(batched)  # answers compared, not two empty strings
    assert tok.pad_token is None and tok.padding_side == "right"
