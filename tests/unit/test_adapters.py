"""Methods (full, LoRA), what may train where, and the memory model, on the tiny llama."""

from __future__ import annotations

import copy
import io
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from rich.console import Console
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tunewise import run
from tunewise.models.adapters import (
    LoraSettings,
    apply_method,
    check_method_support,
    count_parameters,
    memory_by_method,
    resolve_target_modules,
)
from tunewise.models.load import ModelLoadError, load_model
from tunewise.models.memory import (
    MemoryEstimate,
    ParamSpec,
    estimate_memory,
    gradient_bytes,
    optimizer_state_bytes,
    weight_bytes,
)
from tunewise.testing import build_tiny_model, build_tiny_tokenizer

LINEARS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def lora(model_dir: Path, **settings: Any) -> PeftModel:
    model = load_model(model_dir)
    return apply_method(
        model, "lora", LoraSettings(**settings), quantized=False, gradient_checkpointing=False
    )


def trainable(model: torch.nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------------- target modules


@pytest.mark.parametrize(
    ("targets", "expected"),
    [
        ("q_proj", {"q_proj"}),  # PEFT alone would read this as a regex over the full path: no match
        (["q_proj", "v_proj"], {"q_proj", "v_proj"}),
        (r".*\.(q|v)_proj", {"q_proj", "v_proj"}),
        ("all-linear", LINEARS),  # every linear layer but the LM head
    ],
)
def test_target_modules_select_these_layers(
    tiny_model_dir: Path, targets: str | list[str], expected: set[str]
) -> None:
    model = lora(tiny_model_dir, r=2, target_modules=targets)
    names = trainable(model)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names} == expected
    assert len(names) == 2 * 2 * len(expected)  # 2 layers x (lora_A, lora_B)


def test_a_plain_name_becomes_a_list_and_regexes_stay() -> None:
    assert resolve_target_modules("q_proj") == ["q_proj"]
    assert resolve_target_modules("model.layers.0.self_attn.q_proj") == ["model.layers.0.self_attn.q_proj"]
    assert resolve_target_modules(r".*\.q_proj") == r".*\.q_proj"
    assert resolve_target_modules("all-linear") == "all-linear"
    assert resolve_target_modules(["q_proj"]) == ["q_proj"]


def test_a_target_matching_nothing_names_the_models_linear_layers(tiny_model_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="adapter.target_modules: 'qkv'.*gate_proj"):
        lora(tiny_model_dir, target_modules="qkv")


# ---------------------------------------------------------------------------------- LoRA options


def test_rslora_scales_by_the_square_root_of_r(tiny_model_dir: Path) -> None:
    plain = lora(tiny_model_dir, r=4, lora_alpha=16, target_modules="q_proj")
    stable = lora(tiny_model_dir, r=4, lora_alpha=16, target_modules="q_proj", use_rslora=True)
    assert plain.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"] == 4.0
    assert stable.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"] == 8.0


def test_dora_trains_a_magnitude_per_output_row(tiny_model_dir: Path) -> None:
    model = lora(tiny_model_dir, r=2, target_modules="q_proj", use_dora=True)
    magnitudes = {n: p for n, p in model.named_parameters() if "lora_magnitude_vector" in n}
    assert len(magnitudes) == 2 and all(p.requires_grad and p.shape == (32,) for p in magnitudes.values())


def test_modules_to_save_trains_a_copy_and_freezes_the_original(tiny_model_dir: Path) -> None:
    model = lora(tiny_model_dir, r=2, target_modules="q_proj", modules_to_save=["lm_head", "embed_tokens"])
    names = trainable(model)
    assert "base_model.model.lm_head.modules_to_save.default.weight" in names
    assert "base_model.model.model.embed_tokens.modules_to_save.default.weight" in names
    assert "base_model.model.lm_head.original_module.weight" not in names
    assert len(names) == 4 + 2


def test_bias_all_trains_every_bias() -> None:
    model = build_tiny_model(len(build_tiny_tokenizer()), attention_bias=True)
    settings = LoraSettings(r=2, target_modules="q_proj", bias="all")
    names = trainable(apply_method(model, "lora", settings, quantized=False, gradient_checkpointing=False))
    biases = {n for n in names if n.endswith(".bias")}
    assert len(biases) == 2 * 4  # q, k, v, o biases of 2 layers (attention_bias), adapted or not


@pytest.mark.parametrize(
    ("init", "b_is_zero"), [(True, True), ("gaussian", True), ("nora", True), (False, False)]
)
def test_init_lora_weights_reaches_peft(tiny_model_dir: Path, init: bool | str, b_is_zero: bool) -> None:
    model = lora(tiny_model_dir, r=2, target_modules="q_proj", init_lora_weights=init)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert bool((layer.lora_B["default"].weight == 0).all()) is b_is_zero
    if init == "nora":  # NoRA: each column of A at unit L2 norm
        norms = layer.lora_A["default"].weight.norm(dim=0)
        torch.testing.assert_close(norms, torch.ones_like(norms))


def test_full_trains_every_parameter(tiny_model_dir: Path) -> None:
    model = apply_method(
        load_model(tiny_model_dir), "full", LoraSettings(), quantized=False, gradient_checkpointing=True
    )
    assert all(p.requires_grad for p in model.parameters())
    assert model.model.gradient_checkpointing is True


def test_checkpointed_lora_gets_gradients_in_every_layer(tiny_model_dir: Path) -> None:
    # Non-reentrant checkpointing: no input-grad hook needed for adapters behind frozen embeddings.
    settings = LoraSettings(r=2, target_modules="all-linear")
    model = apply_method(
        load_model(tiny_model_dir), "lora", settings, quantized=False, gradient_checkpointing=True
    )
    ids = torch.randint(3, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]  # A has none while B is 0
    assert len(lora_b) == 14 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b)


# ---------------------------------------------------------------------------------- what can run where


def recording_probe(failing: dict[tuple[int, bool, bool | str], str]) -> tuple[list, Any]:
    calls: list[tuple] = []

    def probe(device: str, bits: int, qt: str, cd: str, dq: bool, dora: bool, init: bool | str) -> str | None:
        calls.append((device, bits, dora, init))
        return failing.get((bits, dora, init))

    return calls, probe


def test_full_and_plain_lora_need_no_probe() -> None:
    calls, probe = recording_probe({})
    assert check_method_support("full", False, False, False, "cpu", probe=probe) == []
    assert check_method_support("lora", False, False, True, "cpu", "pissa", probe=probe) == []
    assert calls == []


def test_a_base_that_cannot_train_is_reported_once_with_the_reason() -> None:
    calls, probe = recording_probe({(4, False, True): "NotImplementedError: no kernel"})
    problems = check_method_support("qlora", True, False, True, "xpu", probe=probe)
    assert [p.key for p in problems] == ["quantization.load_in_4bit"]
    assert "4-bit base on xpu (NotImplementedError: no kernel)" in problems[0].message
    assert calls == [("xpu", 4, False, True)]  # DoRA is not probed on a base that fails anyway


def test_dora_and_named_inits_are_probed_on_the_quantised_base() -> None:
    calls, probe = recording_probe({(8, True, True): "dora broke", (8, False, "olora"): "olora broke"})
    problems = check_method_support("lora", False, True, True, "cpu", "olora", probe=probe)
    assert [(p.key, "broke" in p.message) for p in problems] == [
        ("adapter.use_dora", True),
        ("adapter.init_lora_weights", True),
    ]
    assert calls == [("cpu", 8, False, True), ("cpu", 8, True, True), ("cpu", 8, False, "olora")]


@pytest.mark.parametrize("init", ["eva", "corda", "astra", "loftq", "pissa_niter_4"])
def test_inits_tunewise_cannot_honour_are_refused(init: str) -> None:
    problems = check_method_support("lora", False, False, False, "cpu", init)
    assert [p.key for p in problems] == ["adapter.init_lora_weights"]
    assert f"`{init}`" in str(problems[0])


def test_prepare_refuses_before_loading_weights(tiny_config: dict) -> None:
    config = copy.deepcopy(tiny_config)
    config["model"]["model_name_or_path"] = "/nonexistent/model"  # never reached
    config["adapter"]["init_lora_weights"] = "eva"
    with pytest.raises(run.ConfigError, match="adapter.init_lora_weights: `eva`"):
        run.prepare(config)


# ---------------------------------------------------------------------------------- memory arithmetic


def test_weight_bytes_per_storage() -> None:
    assert weight_bytes(ParamSpec((3, 5), "float32", True)) == 60
    assert weight_bytes(ParamSpec((3, 5), "bfloat16", False)) == 30
    assert weight_bytes(ParamSpec((4, 100), "int8", False)) == 400 + 4 * 4  # codes + a scale per row
    assert weight_bytes(ParamSpec((64, 64), "4bit", False)) == 2048 + 4 * 64  # + fp32 absmax per 64
    assert weight_bytes(ParamSpec((64, 64), "4bit-double-quant", False)) == 2048 + 64 + 4 * 1
    assert weight_bytes(ParamSpec((640, 640), "4bit-double-quant", False)) == 204800 + 6400 + 4 * 25


def test_gradients_follow_the_parameter_dtype() -> None:
    assert gradient_bytes(ParamSpec((10, 10), "bfloat16", True)) == 200
    assert gradient_bytes(ParamSpec((10, 10), "float32", False)) == 0
    with pytest.raises(ValueError, match="cannot train"):
        gradient_bytes(ParamSpec((10, 10), "4bit", True))


@pytest.mark.parametrize(
    ("spec", "optimizer", "expected"),
    [
        (ParamSpec((10, 10), "float32", True), "adamw_torch", 800),
        (ParamSpec((10, 10), "bfloat16", True), "adamw_torch_fused", 400),  # states are zeros_like(param)
        (ParamSpec((64, 64), "float32", True), "adamw_8bit", 2 * (4096 + 4 * 16)),
        (ParamSpec((10, 10), "float32", True), "paged_adamw_8bit", 800),  # under 4096 values: fp32
        (ParamSpec((64, 64), "float32", True, embedding=True), "adamw_bnb_8bit", 8 * 4096),
        (ParamSpec((10, 10), "bfloat16", True), "paged_adamw_32bit", 800),
        (ParamSpec((6, 10), "bfloat16", True), "adafactor", 4 * (6 + 10)),  # factored, fp32
        (ParamSpec((3, 4, 5), "float32", True), "adafactor", 4 * (12 + 15)),
        (ParamSpec((7,), "float32", True), "adafactor", 28),
        (ParamSpec((10, 10), "float32", True), "sgd", 0),
        (ParamSpec((10, 10), "float32", False), "adamw_torch", 0),
    ],
)
def test_optimizer_state_bytes(spec: ParamSpec, optimizer: str, expected: int) -> None:
    assert optimizer_state_bytes(spec, optimizer) == expected


def test_estimate_sums_a_model() -> None:
    params = [ParamSpec((100, 10), "bfloat16", False), ParamSpec((4, 10), "float32", True)]
    assert estimate_memory(params, "adamw_torch") == MemoryEstimate(40, 1040, 2160, 160, 320)
    assert estimate_memory(params, "adamw_torch").total == 2640
    with pytest.raises(ValueError, match="unknown optimizer"):
        estimate_memory(params, "lion")


def test_the_estimate_matches_the_models_really_built(tiny_model_dir: Path) -> None:
    settings = LoraSettings(r=4, use_dora=True, modules_to_save=["lm_head"])
    estimate = memory_by_method(
        tiny_model_dir, settings, "adamw_torch", method="lora", torch_dtype="float32", bits=None
    )
    full = load_model(tiny_model_dir)
    adapted = apply_method(
        load_model(tiny_model_dir), "lora", settings, quantized=False, gradient_checkpointing=False
    )
    for method, model in (("full", full), ("lora", adapted)):
        params = list(model.parameters())
        assert estimate[method].trainable_parameters == count_parameters(model)[0]
        assert estimate[method].weights == sum(p.numel() * p.element_size() for p in params)
    assert estimate["full"].optimizer_state == 2 * estimate["full"].weights
    assert estimate["qlora"].trainable_parameters == estimate["lora"].trainable_parameters
    assert estimate["qlora"].weights < estimate["lora"].weights


# ---------------------------------------------------------------------------------- end to end


def quick(config: dict, **adapter: Any) -> dict:
    config = copy.deepcopy(config)
    config["adapter"].update(adapter)
    config["training"].update(max_steps=3, per_device_train_batch_size=4)
    config["data"]["max_seq_length"] = 64
    config["evaluation"] = {"task_metric": "none", "num_sample_prompts": 0, "max_eval_samples": 4}
    return config


def train_recording(config: dict, monkeypatch: pytest.MonkeyPatch) -> tuple[dict, dict, Any, str]:
    """Train; return the summary, the parameters before training, the prepared run after, the printout."""
    seen: dict[str, Any] = {}
    prepare_model, save_final = run.prepare_model, run.save_final

    def recording_prepare(cfg: Any) -> Any:
        out = prepare_model(cfg)
        seen["initial"] = {n: p.detach().clone() for n, p in out[0].named_parameters()}
        return out

    def recording_save(prep: Any, output_dir: Path) -> None:
        seen["prep"] = prep
        save_final(prep, output_dir)

    monkeypatch.setattr(run, "prepare_model", recording_prepare)
    monkeypatch.setattr(run, "save_final", recording_save)
    out = io.StringIO()
    summary = run.train(config, console=Console(file=out, width=200))
    return summary, seen["initial"], seen["prep"], out.getvalue()


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


IDS = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(0))


def test_lora_run_trains_only_adapters_and_reloads_exactly(
    tiny_config: dict, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = quick(tiny_config, target_modules=["q_proj", "v_proj"])
    summary, initial, prep, printed = train_recording(config, monkeypatch)
    names = trainable(prep.model)
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert len(names) == 2 * 2 * 2
    for name, param in prep.model.named_parameters():
        changed = not torch.equal(param.detach(), initial[name])
        assert changed is (name in names), name
    out = Path(summary["output_dir"])
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "config.yaml"} <= {
        p.name for p in out.iterdir()
    }
    assert not (out / "model.safetensors").exists()
    saved = load_file(out / "adapter_model.safetensors")
    assert len(saved) == len(names) and all("lora_" in k for k in saved)
    reloaded = PeftModel.from_pretrained(load_model(tiny_model_dir), out)
    assert torch.allclose(logits(reloaded, IDS), logits(prep.model, IDS), atol=1e-5, rtol=0)
    assert "memory by method" in printed and "lora (this run)" in printed


def test_full_run_trains_every_weight_and_saves_a_model(
    tiny_config: dict, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    summary, initial, prep, _ = train_recording(quick(tiny_config, method="full"), monkeypatch)
    for name, param in prep.model.named_parameters():
        assert param.requires_grad and not torch.equal(param.detach(), initial[name]), name
    out = Path(summary["output_dir"])
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= {
        p.name for p in out.iterdir()
    }
    assert not (out / "adapter_config.json").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    base = load_model(tiny_model_dir)
    assert torch.allclose(logits(reloaded, IDS), logits(prep.model, IDS), atol=1e-5, rtol=0)
    assert not torch.allclose(logits(base, IDS), logits(prep.model, IDS), atol=1e-3)
    assert math.isfinite(summary["eval_after"]["eval_loss"])
