"""Model sources and dropout overrides (no weights loaded except the tiny model)."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig

from tunewise.config.load import load_config
from tunewise.config.problems import ConfigError
from tunewise.config.resolve import Hardware, resolve_static
from tunewise.models.load import ModelLoadError, materialize, model_overrides, resolve_source


def test_dropout_overrides_use_each_models_own_names() -> None:
    assert model_overrides(LlamaConfig(), None, 0.1) == {"attention_dropout": 0.1}
    assert model_overrides(GPT2Config(), 0.1, 0.2) == {
        "resid_pdrop": 0.1,
        "embd_pdrop": 0.1,
        "attn_pdrop": 0.2,
    }
    assert model_overrides(GPTNeoXConfig(), 0.1, 0.2) == {"hidden_dropout": 0.1, "attention_dropout": 0.2}
    assert model_overrides(LlamaConfig(), None, None) == {}


def test_dropout_override_the_model_lacks_is_an_error_not_a_no_op() -> None:
    with pytest.raises(ModelLoadError, match="model.dropout: LlamaConfig has no such dropout setting"):
        model_overrides(LlamaConfig(), 0.1, None)


def test_sources(tiny_model_dir: Path, tmp_path: Path) -> None:
    assert resolve_source(str(tiny_model_dir)).kind == "dir"
    assert materialize(resolve_source(str(tiny_model_dir))) == tiny_model_dir
    assert resolve_source("HuggingFaceTB/SmolLM2-135M").kind == "hub"
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_source(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_source("./no/such/dir")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="without config.json"):
        resolve_source(str(tmp_path / "empty"))


def test_hub_id_offline_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as err:
        materialize(resolve_source("someone/some-model"))
    message = str(err.value)
    assert "someone/some-model" in message and "offline" in message and "smollm2-135m-instruct" in message


def test_a_bare_name_that_is_no_directory_says_both(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`--model merged` before `merge -o merged` ran: a hub id to try, but also maybe a mistyped path."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError) as err:
        materialize(resolve_source("merged"))
    assert str(err.value).startswith(
        f"model_name_or_path: `merged` is no local directory (no {tmp_path.resolve() / 'merged'}) and could not "
        "be fetched from the Hugging Face hub"
    )


def test_fp16_on_cpu_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="training.precision: fp16 needs a GPU"):
        resolve_static(load_config({"training": {"precision": "fp16"}}), Hardware("cpu", False))
