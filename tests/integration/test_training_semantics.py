"""What one optimizer step of our loop means, each property shown against an independent reference.

Two levels: `train_step` on a tiny llama with hand-made batches (gradients compared tensor by tensor), and
`tunewise.run.train` end to end on the tiny model (loss curves, metrics.jsonl, checkpoints, summary.json).
References are HF's own code where HF defines the behaviour (`get_scheduler`, `EarlyStoppingCallback`,
`Trainer._determine_best_metric`), or a plain re-computation from the logits (losses, gradients, updates).
Step counts, schedulers, weight-decay groups and optimizers are checked against HF in
tests/unit/test_hf_equivalence.py and not repeated here.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Self

import datasets
import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from peft import get_peft_model_state_dict
from rich.console import Console
from safetensors.torch import load_file
from transformers import (
    EarlyStoppingCallback,
    Trainer,
    TrainerControl,
    TrainerState,
    TrainingArguments,
    get_scheduler,
)
from transformers.trainer_utils import SaveStrategy

import tunewise.run
from tunewise.config.problems import ConfigError
from tunewise.config.resolve import Hardware, choose_precision
from tunewise.data.collate import collate_padded, iterate_batches
from tunewise.data.tokenize import IGNORE
from tunewise.models.adapters import LoraSettings, apply_method
from tunewise.models.fast import VARLEN_SDPA, LoraDropout, MergedLoraLinear
from tunewise.report import plan_summary
from tunewise.testing import build_tiny_model, build_tiny_tokenizer, tiny_chat_rows
from tunewise.training.loop import (
    Hooks,
    LoopSettings,
    LoopState,
    epoch_windows,
    fit,
    make_collate,
    train_step,
)
from tunewise.training.loss import CausalLMLoss

VOCAB = 64  # train_step-level tests: random token ids below this
STEPS_PER_EPOCH = 8  # 64 training rows / per-device batch 8


@pytest.fixture(autouse=True, scope="module")
def one_cpu_thread() -> Iterator[None]:
    """Width-32 matmuls only pay for extra threads, and other jobs share this machine's 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fresh_accelerator(**kwargs: Any) -> Accelerator:
    """An Accelerator with the precision asked for.

    accelerate keeps one process-wide state and refuses a second Accelerator with another mixed_precision;
    HF's TrainingArguments resets it before building its own, and so do we between runs of one process.
    """
    AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(cpu=True, **kwargs)


# ------------------------------------------------------------------------------------- end-to-end runs


@dataclass
class Run:
    summary: dict
    rows: list[dict]
    out: Path
    printed: str = ""  # what the run printed

    @property
    def train_rows(self) -> list[dict]:
        return [r for r in self.rows if "loss" in r]

    @property
    def eval_rows(self) -> list[dict]:
        return [r for r in self.rows if "eval_loss" in r]

    def curve(self, key: str = "loss") -> list[float]:
        return [r[key] for r in self.train_rows]

    def checkpoints(self) -> list[int]:
        return sorted(int(p.name.split("-")[1]) for p in self.out.glob("checkpoint-*"))


def train(config: dict, **kwargs: Any) -> Run:
    """tunewise.run.train (`kwargs`: resume=...) and what it wrote."""
    AcceleratorState._reset_state(reset_partial_state=True)  # see fresh_accelerator
    printed = io.StringIO()
    summary = tunewise.run.train(config, console=Console(file=printed, width=200), **kwargs)
    out = Path(config["training"]["output_dir"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return Run(summary, rows, out, printed.getvalue())


@pytest.fixture(scope="module")
def data_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("data")
    files = root / "train.jsonl", root / "validation.jsonl"
    for path, rows in zip(files, (tiny_chat_rows(64, seed=1), tiny_chat_rows(16, seed=2)), strict=True):
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return files


ConfigMaker = Callable[..., dict]


@pytest.fixture(scope="module")
def make_config(
    tiny_model_dir: Path, data_files: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> ConfigMaker:
    """`make_config(validation=False, training={...}, ...)`: a fast config, each call its own output_dir.

    No validation set unless asked (no evaluations), no generation, LoRA dropout 0 so runs are comparable.
    """
    train_file, validation_file = data_files
    counter = itertools.count()

    def make(validation: bool = False, **sections: dict) -> dict:
        config: dict[str, dict] = {
            "model": {"model_name_or_path": str(tiny_model_dir)},
            "data": {"dataset": str(train_file), "max_seq_length": 128},
            "adapter": {"method": "lora", "r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
            "training": {
                "output_dir": str(tmp_path_factory.mktemp(f"run{next(counter)}")),
                "max_steps": 4,
                "per_device_train_batch_size": 8,
                "gradient_accumulation_steps": 1,
                "learning_rate": 1e-2,
                "warmup_steps": 0,
                "logging_steps": 1,
            },
            "evaluation": {"num_sample_prompts": 0, "task_metric": "none", "max_eval_samples": 8},
        }
        if validation:
            config["data"]["validation_file"] = str(validation_file)
        for section, values in sections.items():
            config.setdefault(section, {}).update(values)
        return config

    return make


# ---------------------------------------------------------------------------- train_step-level helpers


def random_examples(n: int, seed: int) -> list[dict]:
    """Examples of 4-40 tokens whose first 1..n-1 tokens are prompt: lengths and target counts vary a lot."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(n):
        length = int(torch.randint(4, 41, (1,), generator=g))
        prompt = int(torch.randint(1, length - 1, (1,), generator=g))
        ids = torch.randint(3, VOCAB, (length,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [IGNORE] * prompt + ids[prompt:]})
    return examples


def micro_batches(examples: list[dict], sizes: list[int]) -> list[dict[str, torch.Tensor]]:
    bounds = list(itertools.accumulate([0, *sizes]))
    return [collate_padded(examples[a:b], pad_token_id=0) for a, b in itertools.pairwise(bounds)]


def step_gradients(
    accelerator: Accelerator,
    loss_module: torch.nn.Module,
    window: list[dict[str, torch.Tensor]],
    max_grad_norm: float | None = None,
) -> tuple[float, float, int, dict[str, torch.Tensor]]:
    """train_step on a fresh gradient: (loss, grad_norm, targets, gradients by parameter name)."""
    loss_module.train()  # as fit() does: checkpointing and dropout act only in training mode
    loss_module.zero_grad(set_to_none=True)
    unused = torch.optim.SGD(loss_module.parameters(), lr=0.0)
    loss, norm, targets = train_step(accelerator, loss_module, unused, window, max_grad_norm)
    grads = {n: p.grad.clone() for n, p in loss_module.named_parameters() if p.grad is not None}
    return loss, norm, targets, grads


def assert_same_gradients(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-5) -> None:
    assert a.keys() == b.keys() and a
    worst = max(float((a[n] - b[n]).abs().max()) for n in a)
    assert worst <= atol, f"largest gradient difference {worst:.3g} > {atol}"


def reference_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over target tokens from the full logits: independent of our chunked loss."""
    inputs = {k: v for k, v in batch.items() if k != "targets"}
    logits = model(**inputs).logits.float()
    keep = batch["targets"] != IGNORE
    return F.cross_entropy(logits[keep], batch["targets"][keep], reduction="sum") / keep.sum()


def first_window(prep: tunewise.run.Prepared) -> dict[str, torch.Tensor]:
    """The micro-batch of step 1 of a run with accumulation 1, in the loop's data order."""
    settings = tunewise.run.loop_settings(prep)
    ids = epoch_windows(settings, list(prep.data.train["length"]), epoch=0, rank=0, world=1)[0][0]
    return next(iterate_batches(prep.data.train, [ids], make_collate(settings)))[1]


def global_norm(grads: list[torch.Tensor]) -> float:
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


def fit_tiny_model(total_steps: int, hooks: Hooks, **settings: Any) -> LoopState:
    """`fit` itself on the tiny llama, 16 random examples in micro-batches of 4, SGD at a constant 0.1."""
    loss_module = CausalLMLoss(build_tiny_model(VOCAB, seed=0))
    optimizer = torch.optim.SGD(loss_module.parameters(), lr=0.1)
    examples = random_examples(16, seed=5)
    dataset = datasets.Dataset.from_list([{**e, "length": len(e["input_ids"])} for e in examples])
    loop = {
        "per_device_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "total_steps": total_steps,
        "batches_per_epoch": 4,
        "max_steps_overrides": True,
        "logging_steps": 1,
        "eval_steps": None,
        "save_steps": None,
        "max_grad_norm": None,
        "data_seed": 0,
        "pad_token_id": 0,
    }
    return fit(
        fresh_accelerator(),
        loss_module,
        optimizer,
        get_scheduler("constant", optimizer),
        dataset,
        LoopSettings(**{**loop, **settings}),
        LoopState(),
        hooks,
    )


# ------------------------------------------------------------------------------------- accumulation


def test_accumulation_is_exact_in_train_step() -> None:
    """8 x 1, 2 x 4, 1 x 8 and an uneven 3+3+2 give one gradient: each loss is divided by the window's targets."""
    accelerator = fresh_accelerator()
    loss_module = CausalLMLoss(build_tiny_model(VOCAB, seed=0))
    examples = random_examples(8, seed=0)
    counts = [sum(t != IGNORE for t in e["labels"][1:]) for e in examples]
    assert len(set(counts)) > 4, "the test needs examples with different target counts"

    loss, _, targets, grads = step_gradients(accelerator, loss_module, micro_batches(examples, [8]))
    assert targets == sum(counts)
    for sizes in ([2, 2, 2, 2], [1] * 8, [3, 3, 2]):
        split_loss, _, split_targets, split_grads = step_gradients(
            accelerator, loss_module, micro_batches(examples, sizes)
        )
        assert split_targets == targets
        assert split_loss == pytest.approx(loss, abs=1e-6)
        assert_same_gradients(split_grads, grads)

    # The test can tell: averaging per-micro-batch means (transformers < 4.46) moves the gradient well past 1e-5.
    loss_module.zero_grad(set_to_none=True)
    for batch in micro_batches(examples, [2, 2, 2, 2]):
        summed = loss_module(**batch)
        (summed / (batch["targets"] != IGNORE).sum() / 4).backward()
    naive = {n: p.grad for n, p in loss_module.named_parameters()}
    assert max(float((naive[n] - grads[n]).abs().max()) for n in grads) > 1e-3


@pytest.mark.parametrize("packing", [False, True])
def test_accumulation_is_exact_end_to_end(make_config: ConfigMaker, packing: bool) -> None:
    """Per-device 8 x accumulation 1 and 2 x 4 follow the same loss curve (LoRA dropout 0, fp32), though
    padded 2 x 4 regroups each step's examples by length across its micro-batches (group_window_by_length)."""
    data = {"packing": packing}
    one = train(make_config(data=data))
    four = train(
        make_config(data=data, training={"per_device_train_batch_size": 2, "gradient_accumulation_steps": 4})
    )
    assert one.curve() == pytest.approx(four.curve(), abs=1e-5)
    assert one.curve("grad_norm") == pytest.approx(four.curve("grad_norm"), rel=1e-5)
    assert one.curve("tokens") == four.curve("tokens")
    assert one.curve("learning_rate") == four.curve("learning_rate")
    assert len(set(one.curve())) == len(one.curve()), "the weights moved between steps"


def test_a_token_budget_recuts_packed_steps_and_keeps_the_loss_curve(make_config: ConfigMaker) -> None:
    """max_tokens_per_micro_batch: each step's 8 examples run as several packed rows of at most 128 tokens
    instead of one row, with the same loss curve, gradient norms and tokens (LoRA dropout 0, fp32)."""
    packed, budget = {"packing": True}, 128
    whole = train(make_config(data=packed))
    config = make_config(data=packed, training={"max_tokens_per_micro_batch": budget})
    cut = train(config)
    assert cut.curve() == pytest.approx(whole.curve(), abs=1e-5)
    assert cut.curve("grad_norm") == pytest.approx(whole.curve("grad_norm"), rel=1e-5)
    assert cut.curve("tokens") == whole.curve("tokens")
    assert len(set(whole.curve())) == len(whole.curve()), "the weights moved between steps"
    # The run's own windows: every step of 8 examples became rows within the budget, largest first.
    prep = tunewise.run.prepare(config)
    lengths = list(prep.data.train["length"])
    settings = tunewise.run.loop_settings(prep)
    assert settings.max_tokens_per_micro_batch == budget
    steps = epoch_windows(settings, lengths, epoch=0, rank=0, world=1)
    rows = [[sum(lengths[i] for i in row) for row in step] for step in steps]
    assert all(sum(len(row) for row in step) == 8 for step in steps)
    assert all(len(step) > 1 and max(step) <= budget and step == sorted(step, reverse=True) for step in rows)
    # The plan reports the run's largest micro-batch as cut (its 4 steps; fp32 on CPU: no rounding of rows).
    assert settings.total_steps == 4 < len(rows)
    assert plan_summary(prep)["largest_micro_batch_tokens"] == max(max(step) for step in rows[:4])
    whole_prep = tunewise.run.prepare(make_config(data=packed))
    assert plan_summary(whole_prep)["largest_micro_batch_tokens"] > budget  # one row of 8 examples


@pytest.mark.parametrize("head", ["plain", "modules_to_save"])
def test_a_micro_batch_without_targets_adds_nothing_but_reaches_every_parameter(head: str) -> None:
    """The stand-in micro-batch a rank runs when its share of an epoch's last batch is empty (one pad token,
    no target): it must change no gradient, and yet give every trainable parameter one, as DDP's all-reduce
    waits for all of them. A wrapped LM head (PEFT modules_to_save) takes the loss's unfused path."""
    accelerator = fresh_accelerator()
    lora = LoraSettings(r=4, lora_dropout=0.0, modules_to_save=["lm_head"] if head != "plain" else None)
    model = apply_method(
        build_tiny_model(VOCAB, seed=0), "lora", lora, quantized=False, gradient_checkpointing=False
    )
    loss_module = CausalLMLoss(model)
    real = micro_batches(random_examples(2, seed=4), [2])
    pad = torch.tensor([[0]])
    stand_in = {
        "input_ids": pad,
        "attention_mask": torch.ones_like(pad),
        "targets": torch.full_like(pad, IGNORE),
    }
    loss, _, targets, grads = step_gradients(accelerator, loss_module, real)
    with_stand_in = step_gradients(accelerator, loss_module, [*real, stand_in])
    assert with_stand_in[0] == pytest.approx(loss, abs=1e-7) and with_stand_in[2] == targets
    assert_same_gradients(with_stand_in[3], grads, atol=1e-7)
    alone = step_gradients(accelerator, loss_module, [stand_in])[3]
    trainable = {n for n, p in loss_module.named_parameters() if p.requires_grad}
    assert alone.keys() == trainable and all(float(g.abs().max()) == 0.0 for g in alone.values())


# --------------------------------------------------------------------------------------------- clipping


def test_clipping_in_train_step() -> None:
    """Global-norm clipping to max_grad_norm; 0 and None leave the gradient alone; the norm returned is pre-clip."""
    accelerator = fresh_accelerator()
    loss_module = CausalLMLoss(build_tiny_model(VOCAB, seed=0))
    window = micro_batches(random_examples(4, seed=3), [2, 2])
    _, norm, _, grads = step_gradients(accelerator, loss_module, window, max_grad_norm=None)
    assert norm == pytest.approx(global_norm(list(grads.values())), rel=1e-6)
    for off in (0.0, 1e9):
        _, same_norm, _, same = step_gradients(accelerator, loss_module, window, max_grad_norm=off)
        assert same_norm == pytest.approx(norm, rel=1e-6)
        assert_same_gradients(same, grads, atol=0.0)
    limit = norm / 4
    _, logged, _, clipped = step_gradients(accelerator, loss_module, window, max_grad_norm=limit)
    assert logged == pytest.approx(norm, rel=1e-6), "grad_norm is the norm before clipping"
    assert global_norm(list(clipped.values())) == pytest.approx(limit, rel=1e-5)
    assert_same_gradients(clipped, {n: g * limit / norm for n, g in grads.items()}, atol=1e-7)


@pytest.mark.parametrize(
    "max_grad_norm", [0.05, 0.0, None], ids=["clipped", "zero-disables", "null-disables"]
)
def test_logged_grad_norm_is_pre_clip_and_update_uses_clipped_gradient(
    make_config: ConfigMaker, max_grad_norm: float | None
) -> None:
    """Step 1 against a re-computation from the logits: loss, pre-clip norm, and the SGD update applied."""
    lr = 0.5
    config = make_config(
        training={
            "max_steps": 1,
            "optim": "sgd",
            "lr_scheduler_type": "constant",
            "learning_rate": lr,
            "max_grad_norm": max_grad_norm,
        }
    )
    AcceleratorState._reset_state(reset_partial_state=True)
    prep = tunewise.run.prepare(config)  # same seed, so the same adapter initialisation as the run
    batch = first_window(prep)
    loss = reference_loss(prep.model, batch)
    loss.backward()
    trainable = [p for p in prep.model.parameters() if p.requires_grad]
    norm = global_norm([p.grad for p in trainable])
    scale = min(1.0, max_grad_norm / (norm + 1e-6)) if max_grad_norm else 1.0  # torch's clip_grad_norm_
    with torch.no_grad():
        for p in trainable:
            p -= lr * scale * p.grad
    expected = get_peft_model_state_dict(prep.model)

    run = train(config)
    (row,) = run.train_rows
    assert row["loss"] == pytest.approx(loss.item(), abs=1e-5)
    assert row["grad_norm"] == pytest.approx(norm, rel=1e-5)
    if max_grad_norm:
        assert norm > 2 * max_grad_norm, "the case must really clip"
    saved = load_file(run.out / "adapter_model.safetensors")
    assert saved.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(saved[name], tensor, rtol=0, atol=1e-6, msg=name)


# -------------------------------------------------------------------------------------------- precision


@pytest.mark.real_cpu_precision
def test_auto_precision_is_bf16_on_a_cpu_with_bf16_matmuls_else_fp32_and_trains(
    make_config: ConfigMaker,
) -> None:
    """The real probe: bf16 where AMX or AVX512_BF16 make it faster (docs/performance.md), fp32 elsewhere,
    with the reason."""
    # From torch's own CPU checks, not from the probe under test.
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    native = any(getattr(torch.cpu, check, lambda: False)() for check in checks)
    expected = "bf16" if native else "fp32"
    config = make_config()
    prep = tunewise.run.prepare(config)
    choice = prep.resolution.choices["training.precision"]
    assert (choice.value, choice.source) == (expected, "auto")
    assert ("AVX512_BF16" in choice.reason) is native and ("not faster" in choice.reason) is not native
    # LoRA on bf16: the frozen base in bf16 (half the memory), the adapters' master weights in fp32.
    frozen = {p.dtype for p in prep.model.parameters() if not p.requires_grad}
    trained = {p.dtype for p in prep.model.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16 if native else torch.float32} and trained == {torch.float32}
    run = train(config)
    losses = run.curve()
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    # bf16 on CPU only with bf16 matmul instructions; elsewhere oneDNN emulates it, slower than fp32.
    assert choose_precision(Hardware("cpu", bf16_supported=False))[0] == "fp32"
    assert choose_precision(Hardware("cpu", bf16_supported=True))[0] == "bf16"


def test_bf16_autocast_runs_on_cpu_close_to_fp32(make_config: ConfigMaker) -> None:
    """bf16 keeps 8 significant bits: each matmul input is rounded by up to 2^-9 (0.2%) of its value.

    Tolerances: the loss within 1% and the gradient norm within 3% of fp32 (measured here: 1e-5 and 0.3%;
    the loss moves less because the tiny model's logits are small). The gradient norms must also differ
    by more than 1e-4 somewhere, or autocast never ran and we compared fp32 with itself.
    """
    fp32 = train(make_config(training={"precision": "fp32"}))
    bf16 = train(make_config(training={"precision": "bf16"}))
    assert bf16.curve() == pytest.approx(fp32.curve(), rel=1e-2)
    assert bf16.curve("grad_norm") == pytest.approx(fp32.curve("grad_norm"), rel=3e-2)
    gaps = [abs(a / b - 1) for a, b in zip(bf16.curve("grad_norm"), fp32.curve("grad_norm"), strict=True)]
    assert max(gaps) > 1e-4


def test_fp16_on_cpu_is_refused_before_the_first_step(make_config: ConfigMaker) -> None:
    """accelerate gives fp16 no autocast and no loss scaler on CPU: it would silently train in fp32."""
    config = make_config(training={"precision": "fp16"})
    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.raises(ConfigError, match=r"fp16.*(bf16|fp32)") as error:
        tunewise.run.train(config, console=Console(file=io.StringIO()))
    assert "training.precision" in str(error.value)
    metrics = Path(config["training"]["output_dir"]) / "metrics.jsonl"
    assert not metrics.exists() or '"loss"' not in metrics.read_text()


# -------------------------------------------------------------------------------- gradient checkpointing


@pytest.mark.parametrize("method", ["lora", "full"])
def test_gradient_checkpointing_changes_memory_not_gradients(make_config: ConfigMaker, method: str) -> None:
    """Same loss and gradients with checkpointing on (non-reentrant) and off, for LoRA and full fine-tuning."""
    results = {}
    for checkpointing in (False, True):
        config = make_config(adapter={"method": method}, training={"gradient_checkpointing": checkpointing})
        accelerator = fresh_accelerator()
        prep = tunewise.run.prepare(config)
        base = prep.model.get_base_model() if method == "lora" else prep.model
        layer = base.model.layers[0]
        assert layer.gradient_checkpointing is checkpointing
        if checkpointing:
            assert layer._gradient_checkpointing_func.keywords == {"use_reentrant": False}
        mlp_calls: list[int] = []

        # A pre-hook: torch stops the recompute once the last saved tensor is back, before the MLP returns.
        # Forwards without gradient (the loss's first-call check of the LM head) are not the step's.
        def count(*args: object, calls: list[int] = mlp_calls) -> None:
            if torch.is_grad_enabled():
                calls.append(1)

        hook = layer.mlp.register_forward_pre_hook(count)
        loss, _, _, grads = step_gradients(accelerator, CausalLMLoss(prep.model), [first_window(prep)])
        hook.remove()
        # Checkpointing recomputes each layer in the backward pass: the MLP runs twice per step.
        assert len(mlp_calls) == (2 if checkpointing else 1)
        results[checkpointing] = loss, grads
    assert results[True][0] == pytest.approx(results[False][0], abs=1e-5)
    assert_same_gradients(results[True][1], results[False][1])


def test_gradient_checkpointing_end_to_end_full_fine_tuning(make_config: ConfigMaker) -> None:
    runs = [
        train(
            make_config(adapter={"method": "full"}, training={"gradient_checkpointing": on, "max_steps": 3})
        )
        for on in (False, True)
    ]
    assert runs[1].curve() == pytest.approx(runs[0].curve(), abs=1e-5)
    assert runs[1].curve("grad_norm") == pytest.approx(runs[0].curve("grad_norm"), rel=1e-5)


# ---------------------------------------------------------------------------------- speed paths


def test_packing_compile_and_checkpointing_follow_the_plain_loss_curve(make_config: ConfigMaker) -> None:
    """Packed rows (per-example sdpa), torch.compile and checkpointing change speed, not the math."""
    packed = {"packing": True}
    plain = train(make_config(data=packed, training={"max_steps": 3}))
    fast = train(
        make_config(
            data=packed,
            training={"max_steps": 3, "torch_compile": True, "gradient_checkpointing": True},
        )
    )
    assert fast.curve() == pytest.approx(plain.curve(), abs=1e-4)
    assert fast.curve("grad_norm") == pytest.approx(plain.curve("grad_norm"), rel=1e-4)
    assert len(set(plain.curve())) == 3, "the weights moved between steps"


def test_full_fine_tuning_in_bf16_trains_packed_rows_as_padded_ones(make_config: ConfigMaker) -> None:
    """fp32 weights under bf16 autocast hand the packed attention fp32 queries and bf16 values (rotary embeddings
    run in fp32): the run trains, on the padded run's curve within bf16's rounding."""
    runs = [
        train(
            make_config(
                adapter={"method": "full"},
                data={"packing": packing},
                training={"max_steps": 3, "precision": "bf16", "learning_rate": 1e-3},
            )
        )
        for packing in (False, True)
    ]
    padded, packed = runs
    assert packed.curve() == pytest.approx(padded.curve(), abs=3e-2)
    assert len(set(packed.curve())) == 3, "the weights moved between steps"


def test_rounding_packed_rows_changes_neither_the_math_nor_the_token_count(make_config: ConfigMaker) -> None:
    """pad_to_multiple_of (bf16 on CPU sets 64) adds a filler example: no targets, attends to nothing else."""
    runs = [
        train(
            make_config(
                data={"packing": True, "pad_to_multiple_of": multiple},
                training={"max_steps": 3, "precision": "fp32"},
            )
        )
        for multiple in (1, 64)
    ]
    plain, rounded = runs
    assert rounded.curve() == pytest.approx(plain.curve(), abs=1e-5)
    assert rounded.curve("grad_norm") == pytest.approx(plain.curve("grad_norm"), rel=1e-4)
    # tokens counts the examples' own tokens, not the filler, so tokens_per_second stays honest
    assert [r["tokens"] for r in rounded.train_rows] == [r["tokens"] for r in plain.train_rows]
    assert all(r["tokens"] % 64 for r in plain.train_rows), "the filler had something to round"


def test_a_compiled_run_evaluates_and_generates_as_an_eager_one(make_config: ConfigMaker) -> None:
    """Evaluation and generation after compiled training (eager there: set_stance) give the eager run's results."""
    sections = {"evaluation": {"task_metric": "exact_match", "num_sample_prompts": 2, "max_eval_samples": 4}}
    runs = [
        train(make_config(validation=True, training={"max_steps": 2, "torch_compile": on}, **sections))
        for on in (False, True)
    ]
    eager, compiled = (r.summary for r in runs)
    assert compiled["eval_before"] == eager["eval_before"]
    assert compiled["eval_after"]["eval_loss"] == pytest.approx(eager["eval_after"]["eval_loss"], abs=1e-4)
    assert "exact_match" in compiled["eval_after"]
    assert [x["after"] for x in compiled["samples"]] == [x["after"] for x in eager["samples"]]


def test_packed_runs_use_per_example_attention_and_lora_dropout_is_swapped(make_config: ConfigMaker) -> None:
    prep = tunewise.run.prepare(make_config(data={"packing": True}, adapter={"lora_dropout": 0.1}))
    assert prep.model.config._attn_implementation == VARLEN_SDPA
    dropouts = [m.lora_dropout["default"] for m in prep.model.modules() if hasattr(m, "lora_dropout")]
    assert dropouts and all(type(d) is LoraDropout and d.p == 0.1 for d in dropouts)
    assert tunewise.run.prepare(make_config()).model.config._attn_implementation == "sdpa"


def test_lora_by_default_has_no_dropout_and_trains_each_layer_as_one_merged_matmul(
    make_config: ConfigMaker,
) -> None:
    config = make_config()
    del config["adapter"]["lora_dropout"]  # the default, as PEFT's: 0
    model = tunewise.run.prepare(config).model.train()
    layers = [m for m in model.modules() if isinstance(m, MergedLoraLinear)]
    assert len(layers) == 2 * 7  # every linear of the tiny 2-layer llama
    for layer in layers:
        assert isinstance(layer.lora_dropout["default"], torch.nn.Identity)
        out = layer(torch.randn(3, layer.in_features))
        assert type(out.grad_fn).__name__ == "_MergedLoraBackward"  # the fold, not PEFT's forward


# ----------------------------------------------------------------------------------------------- dropout


def test_dropout_overrides_reach_the_model_and_the_plan(make_config: ConfigMaker) -> None:
    config = make_config(model={"attention_dropout": 0.2}, adapter={"lora_dropout": 0.1})
    prep = tunewise.run.prepare(config)
    assert plan_summary(prep)["model_config_overrides"] == {"attention_dropout": 0.2}
    base = prep.model.get_base_model()
    assert base.config.attention_dropout == 0.2
    assert {layer.self_attn.attention_dropout for layer in base.model.layers} == {0.2}
    lora_dropouts = [m.lora_dropout["default"] for m in prep.model.modules() if hasattr(m, "lora_dropout")]
    assert lora_dropouts and {d.p for d in lora_dropouts} == {0.1}
    assert all(isinstance(d, torch.nn.Dropout) for d in lora_dropouts)


def test_dropout_overrides_use_the_models_own_config_names(make_config: ConfigMaker, tmp_path: Path) -> None:
    """GPT-NeoX calls them hidden_dropout and attention_dropout; model.dropout sets the first."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    tokenizer = build_tiny_tokenizer()
    tiny = GPTNeoXConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
    )
    GPTNeoXForCausalLM(tiny).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    config = make_config(
        model={"model_name_or_path": str(tmp_path), "dropout": 0.1, "attention_dropout": 0.2}
    )
    prep = tunewise.run.prepare(config)
    overrides = plan_summary(prep)["model_config_overrides"]
    assert overrides["hidden_dropout"] == 0.1 and overrides["attention_dropout"] == 0.2
    base = prep.model.get_base_model()
    assert (base.config.hidden_dropout, base.config.attention_dropout) == (0.1, 0.2)
    layer = base.gpt_neox.layers[0]
    assert (layer.post_attention_dropout.p, layer.post_mlp_dropout.p) == (0.1, 0.1)
    assert layer.attention.attention_dropout == 0.2


# ----------------------------------------------------------------------------------------------- cadence


CADENCES = {
    # 64 rows / batch 8 = 8 steps per epoch; 1.25 epochs = 10 steps (stop_reason "epochs").
    "integers": ({"logging_steps": 3, "eval_steps": 4, "save_steps": 5, "save_total_limit": 1}, [4, 8], [10]),
    # Fractions of the 10 steps, rounded up as HF: 0.25 -> 3, 0.5 -> 5, 0.2 -> 2.
    "fractions": (
        {"logging_steps": 0.25, "eval_steps": 0.5, "save_steps": 0.2, "save_total_limit": 2},
        [5, 10],
        [8, 10],
    ),
}


@pytest.mark.parametrize("case", CADENCES.values(), ids=CADENCES.keys())
def test_logging_eval_and_save_cadence(
    make_config: ConfigMaker, case: tuple[dict, list[int], list[int]]
) -> None:
    cadence, eval_steps, checkpoints = case
    run = train(make_config(validation=True, training={"max_steps": -1, "num_train_epochs": 1.25, **cadence}))
    # Every logging_steps-th step, and always the last one (HF logs only the multiples).
    assert [r["step"] for r in run.train_rows] == [3, 6, 9, 10]
    # Before training (step 0), every eval_steps-th step, and the final evaluation at the last step.
    assert sorted({r["step"] for r in run.eval_rows}) == sorted({0, *eval_steps, 10})
    assert (
        run.eval_rows[-1]["step"] == 10
        and run.summary["eval_after"]["eval_loss"] == run.eval_rows[-1]["eval_loss"]
    )
    # Saved every save_steps-th step and at the end; save_total_limit keeps the newest.
    assert run.checkpoints() == checkpoints
    assert run.summary["stop_reason"] == "epochs"


def test_save_minutes_checkpoints_by_the_clock_and_a_step_save_resets_it() -> None:
    """Each step takes 25 s on a fake clock; save_seconds 60 saves the step that ends 60 s or more after the
    last checkpoint (or the start), and always the last step."""

    def saves(**settings: Any) -> list[int]:
        now = [0.0]
        saved: list[int] = []

        def tick(row: dict) -> None:  # logged once a step, after it
            now[0] += 25.0

        fit_tiny_model(
            7, Hooks(save=lambda s: saved.append(s.step), log=tick, clock=lambda: now[0]), **settings
        )
        return saved

    assert saves(save_seconds=60.0) == [3, 6, 7]
    assert saves(save_seconds=None) == [7]
    assert saves(save_seconds=60.0, save_steps=2) == [2, 4, 6, 7]  # 50 s after each step save: never due
    assert saves(save_seconds=75.0) == [3, 6, 7]  # due at exactly save_seconds
    assert saves(save_seconds=76.0) == [4, 7]


def test_logged_loss_is_the_mean_since_the_last_log() -> None:
    """As HF: with logging_steps 3 the row of step 3 holds the mean loss of steps 1-3; other keys are step 3's."""
    every: list[dict] = []
    fit_tiny_model(7, Hooks(log=every.append))
    sparse: list[dict] = []
    fit_tiny_model(7, Hooks(log=sparse.append), logging_steps=3)
    assert [r["step"] for r in sparse] == [3, 6, 7]
    for row, window in zip(sparse, ([0, 1, 2], [3, 4, 5], [6]), strict=True):
        mean = sum(every[i]["loss"] for i in window) / len(window)
        assert row["loss"] == pytest.approx(mean, abs=1e-12)
        same_step = every[window[-1]]
        assert {k: v for k, v in row.items() if k not in ("loss", "tokens_per_second")} == {
            k: v for k, v in same_step.items() if k not in ("loss", "tokens_per_second")
        }
    assert len({r["loss"] for r in every}) == 7, "the loss moves from step to step"


def test_a_run_that_stops_early_logs_its_last_step_once() -> None:
    """docs/training.md (Cadence): a row at the last step however the run stops, its loss the mean of the steps
    since the previous row; never two rows for one step."""
    every: list[dict] = []
    fit_tiny_model(7, Hooks(log=every.append))

    def mean_loss(steps: range) -> float:
        return sum(every[s - 1]["loss"] for s in steps) / len(steps)

    def rising(step: int) -> dict:  # with patience 2, training stops at step 3
        return {"eval_loss": 3.0 + step}

    for logging_steps, rows, last in ((2, [2, 3], range(3, 4)), (3, [3], range(1, 4)), (4, [3], range(1, 4))):
        logged: list[dict] = []
        hooks = Hooks(evaluate=rising, log=logged.append)
        state = fit_tiny_model(7, hooks, eval_steps=1, early_stopping_patience=2, logging_steps=logging_steps)
        assert state.stop_reason == "early_stopping" and [r["step"] for r in logged] == rows
        assert logged[-1]["loss"] == pytest.approx(mean_loss(last), abs=1e-12)

    calls = itertools.count(1)
    logged = []
    state = fit_tiny_model(7, Hooks(log=logged.append, should_stop=lambda: next(calls) >= 5), logging_steps=4)
    assert state.stop_reason == "interrupted" and [r["step"] for r in logged] == [4, 5]
    assert logged[-1]["loss"] == pytest.approx(every[4]["loss"], abs=1e-12)

    def fail_at_6(step: int) -> dict:
        if step == 6:
            raise RuntimeError("a failing evaluation")
        return {"eval_loss": 1.0}

    logged = []
    with pytest.raises(RuntimeError, match="a failing evaluation"):
        fit_tiny_model(7, Hooks(log=logged.append, evaluate=fail_at_6), eval_steps=1, logging_steps=4)
    assert [r["step"] for r in logged] == [4, 6]
    assert logged[-1]["loss"] == pytest.approx(mean_loss(range(5, 7)), abs=1e-12)


# ------------------------------------------------------------------------------------------ early stopping


def hf_early_stopping(
    values: list[float], greater: bool, patience: int | None, threshold: float
) -> tuple[int | None, int | None]:
    """(step training stops at, best step) by HF's own code: EarlyStoppingCallback, then _determine_best_metric."""
    args = SimpleNamespace(
        greater_is_better=greater, metric_for_best_model="eval_loss", save_strategy=SaveStrategy.STEPS
    )
    state, control = TrainerState(), TrainerControl()
    trainer = SimpleNamespace(args=args, state=state)
    callback = EarlyStoppingCallback(patience or 10**9, threshold)
    for step, value in enumerate(values, 1):
        state.global_step = step
        callback.on_evaluate(args, state, control, metrics={"eval_loss": value})  # inside Trainer.evaluate
        Trainer._determine_best_metric(trainer, {"eval_loss": value}, None)  # type: ignore[arg-type]
        if control.should_training_stop:
            return step, state.best_global_step
    return None, state.best_global_step


EARLY_STOPPING = {
    "rises": ([5.0, 5.1, 5.2, 5.3, 5.4], False, 2, 0.0),
    "small-gains-under-threshold": ([5.0, 4.95, 4.87, 4.8, 4.79, 4.7], False, 2, 0.1),
    "greater-is-better": ([0.1, 0.3, 0.3, 0.2, 0.5, 0.6], True, 2, 0.0),
    "greater-with-threshold": ([0.1, 0.15, 0.3, 0.32, 0.33, 0.34], True, 2, 0.05),
    "patience-1": ([3.0, 2.0, 2.0, 1.0], False, 1, 0.0),
    "no-patience": ([3.0, 2.0, 4.0, 5.0, 1.5, 6.0], False, None, 0.0),
    "nan": ([float("nan"), 3.0, float("nan"), 2.0, 2.5, 2.6], False, 2, 0.0),
}


@pytest.mark.parametrize("case", EARLY_STOPPING.values(), ids=EARLY_STOPPING.keys())
def test_early_stopping_and_best_step_match_hf(case: tuple[list[float], bool, int | None, float]) -> None:
    """The loop with a scripted metric per evaluation, against HF's callback and best-metric code."""
    values, greater, patience, threshold = case
    hooks = Hooks(evaluate=lambda step: {"eval_loss": values[step - 1]})
    state = fit_tiny_model(
        len(values),
        hooks,
        eval_steps=1,
        greater_is_better=greater,
        early_stopping_patience=patience,
        early_stopping_threshold=threshold,
    )
    stop_step, best_step = hf_early_stopping(values, greater, patience, threshold)
    assert (state.stop_reason == "early_stopping") == (stop_step is not None)
    assert state.step == (stop_step or len(values))
    assert state.best_step == best_step
    if best_step is not None:
        assert state.best_metric == values[best_step - 1]


def early_stopping_config(make_config: ConfigMaker) -> dict:
    """Full fine-tuning at a learning rate 10^4 too high: eval_loss falls, then rises, and training stops."""
    return make_config(
        validation=True,
        adapter={"method": "full"},
        training={
            "max_steps": 12,
            "learning_rate": 0.2,
            "lr_scheduler_type": "constant",
            "eval_steps": 1,
            "save_steps": 1,
            "save_total_limit": 1,
            "early_stopping_patience": 2,
            "load_best_model_at_end": True,
        },
    )


def test_early_stopping_and_load_best_model_end_to_end(make_config: ConfigMaker) -> None:
    run = train(early_stopping_config(make_config))
    during = [r["eval_loss"] for r in run.eval_rows[1:-1]]  # drop "before" (step 0) and the final evaluation
    stop_step, best_step = hf_early_stopping(during, greater=False, patience=2, threshold=0.0)
    assert stop_step is not None and stop_step < 12, f"eval_loss never rose for long enough: {during}"
    assert run.summary["stop_reason"] == "early_stopping"
    assert run.summary["total_steps"] == stop_step == run.train_rows[-1]["step"]
    assert run.summary["best_step"] == best_step and run.summary["best_metric"] == min(during)
    assert best_step is not None and best_step < stop_step
    # The best checkpoint survives save_total_limit=1 and is what the final weights are.
    assert run.checkpoints() == [best_step, stop_step]
    best = load_file(run.out / f"checkpoint-{best_step}" / "model.safetensors")
    final = load_file(run.out / "model.safetensors")
    assert best.keys() <= final.keys()
    assert all(torch.equal(final[name], tensor) for name, tensor in best.items())
    assert run.summary["eval_after"]["eval_loss"] == pytest.approx(min(during), abs=1e-6)


def test_save_total_limit_1_keeps_the_last_checkpoint_beside_the_best_so_the_run_still_resumes(
    make_config: ConfigMaker,
) -> None:
    """HF deletes every checkpoint but the best when training ends with save_total_limit 1 and
    load_best_model_at_end; tunewise keeps the last one (docs/checkpoints.md), because a finished run resumes
    from it: here an early-stopped run, whose resume evaluates and writes it without training again."""
    config = early_stopping_config(make_config)
    run = train(config)
    stop, best = run.summary["total_steps"], run.summary["best_checkpoint"]
    assert run.summary["stop_reason"] == "early_stopping"
    assert best is not None and best["loaded"] and best["step"] < stop
    assert run.checkpoints() == [best["step"], stop]  # HF would leave [best["step"]]
    assert weights_equal(run.out / f"checkpoint-{best['step']}", run.out)

    resumed = train(config, resume=True)
    assert f"from{run.out / f'checkpoint-{stop}'}(step{stop}," in "".join(resumed.printed.split())
    assert resumed.train_rows == run.train_rows  # no step trained again, none dropped
    assert resumed.summary["stop_reason"] == "early_stopping" and resumed.summary["total_steps"] == stop
    assert resumed.summary["best_checkpoint"] == best
    assert resumed.summary["eval_after"]["eval_loss"] == pytest.approx(run.summary["eval_after"]["eval_loss"])
    assert resumed.checkpoints() == [best["step"], stop]
    assert weights_equal(run.out / f"checkpoint-{best['step']}", run.out)


def hf_best_checkpoint(evals: dict[int, float], saves: list[int]) -> tuple[int | None, int | None]:
    """(best_global_step, the step of best_model_checkpoint) by HF's own _determine_best_metric after each
    evaluation, and _save_checkpoint's rule (trainer.py) at each save: best_global_step's checkpoint, if saved."""
    args = SimpleNamespace(
        greater_is_better=False, metric_for_best_model="eval_loss", save_strategy=SaveStrategy.STEPS
    )
    state = TrainerState()
    trainer = SimpleNamespace(args=args, state=state)
    saved: set[int] = set()
    best_checkpoint = None
    for step in sorted({*evals, *saves}):
        state.global_step = step
        if step in evals:  # evaluation comes before the save of the same step (_maybe_log_save_evaluate)
            Trainer._determine_best_metric(trainer, {"eval_loss": evals[step]}, None)  # type: ignore[arg-type]
        if step in saves:
            saved.add(step)
            if state.best_global_step in saved:
                best_checkpoint = state.best_global_step
    return state.best_global_step, best_checkpoint


def weights_equal(a: Path, b: Path) -> bool:
    first, second = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return first.keys() <= second.keys() and all(torch.equal(second[k], t) for k, t in first.items())


@pytest.mark.parametrize("learning_rate", [0.5, 1.0])
def test_load_best_model_at_end_loads_the_best_saved_checkpoint(
    make_config: ConfigMaker, learning_rate: float
) -> None:
    """eval_steps 2 with save_steps 4, HF's usual pair: the best evaluation can fall between checkpoints. As HF, the
    weights loaded are best_model_checkpoint's, the newest checkpoint whose evaluation was the best so far (0.5:
    the best is step 10's, so checkpoint-8), or none (1.0: the best is step 2's); rotation keeps that one."""
    config = make_config(
        validation=True,
        adapter={"method": "full"},
        training={
            "max_steps": 12,
            "learning_rate": learning_rate,
            "lr_scheduler_type": "constant",
            "eval_steps": 2,
            "save_steps": 4,
            "save_total_limit": 1,
            "load_best_model_at_end": True,
        },
    )
    run = train(config)  # checkpoint-<best_step> does not exist: this raised "checkpoint damaged"
    evals = {r["step"]: r["eval_loss"] for r in run.eval_rows[1:-1]}  # not "before" nor the final one
    best_step, best_saved = hf_best_checkpoint(evals, [4, 8, 12])
    assert best_step is not None and best_step % 4, f"the best evaluation fell on a checkpoint: {evals}"
    assert (run.summary["best_step"], run.summary["best_metric"]) == (best_step, evals[best_step])
    if best_saved is None:
        assert run.summary["best_checkpoint"] is None
        assert run.checkpoints() == [12] and weights_equal(run.out / "checkpoint-12", run.out)
        assert "the final weights stay: no checkpoint had the best evaluation so far" in run.printed
        return
    assert run.summary["best_checkpoint"] == {"step": best_saved, "metric": evals[best_saved], "loaded": True}
    assert (
        f"loaded the best checkpoint, checkpoint-{best_saved} (eval_loss {evals[best_saved]:.4f}); the "
        f"best evaluation, eval_loss {evals[best_step]:.4f} at step {best_step}, fell between" in run.printed
    )
    assert run.checkpoints() == [best_saved, 12]
    assert weights_equal(run.out / f"checkpoint-{best_saved}", run.out)
    assert run.summary["eval_after"]["eval_loss"] == pytest.approx(evals[best_saved], abs=1e-6)

    # A resume (here after the last step, as after an out-of-memory final evaluation) keeps the best checkpoint
    # from checkpoint-12's state (best_step there is 10); once that checkpoint is gone it is forgotten, as in HF.
    resumed = train(config, resume=True)
    assert resumed.summary["best_checkpoint"] == run.summary["best_checkpoint"]
    assert resumed.summary["stop_reason"] == "max_steps"  # not null: the run ended at max_steps
    assert weights_equal(run.out / f"checkpoint-{best_saved}", run.out)
    shutil.rmtree(run.out / f"checkpoint-{best_saved}")
    resumed = train(config, resume=True)
    assert resumed.summary["best_checkpoint"] is None and resumed.summary["best_step"] == best_step
    assert weights_equal(run.out / "checkpoint-12", run.out)


def test_task_metric_can_pick_the_best_model(make_config: ConfigMaker) -> None:
    config = make_config(
        validation=True,
        training={"max_steps": 2, "eval_steps": 1, "metric_for_best_model": "exact_match"},
        evaluation={"task_metric": "exact_match", "max_eval_samples": 2},
        generation={"max_new_tokens": 4},
    )
    run = train(config)
    assert all("exact_match" in row for row in run.eval_rows)
    assert run.summary["best_step"] in (1, 2)


def test_a_best_model_metric_the_run_would_not_compute_is_refused_before_training(
    make_config: ConfigMaker, tmp_path: Path
) -> None:
    """task_metric auto picks json_exact_match for JSON answers (and nothing for plain text): a metric_for_best_model
    naming the other task metric would never be seen by the loop, so early stopping and the best model would
    silently do nothing. `prepare` (and so `plan`) refuses it, naming what auto chose and what to set."""
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"n {i}"},
                {"role": "assistant", "content": json.dumps({"n": i})},
            ]
        }
        for i in range(24)
    ]
    json_file = tmp_path / "json.jsonl"
    json_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    text_file = tmp_path / "text.jsonl"
    text_file.write_text("".join(json.dumps({"text": f"plain words {i}"}) + "\n" for i in range(24)))
    training = {
        "eval_steps": 2,
        "save_steps": 2,
        "load_best_model_at_end": True,
        "early_stopping_patience": 1,
    }

    def prepare(data_file: Path, metric: str) -> tunewise.run.Prepared:
        data = {"dataset": str(data_file), "validation_split": 0.25}
        return tunewise.run.prepare(
            make_config(
                data=data,
                training={**training, "metric_for_best_model": metric},
                evaluation={"task_metric": "auto"},
            )
        )

    with pytest.raises(ConfigError) as refused:
        prepare(json_file, "exact_match")
    [problem] = refused.value.problems
    assert problem.path == "training.metric_for_best_model"
    assert "task_metric auto chose json_exact_match" in problem.message
    assert "set metric_for_best_model: json_exact_match" in problem.message
    with pytest.raises(ConfigError) as refused:
        prepare(text_file, "exact_match")
    assert "plain-text data has no prompt to answer" in str(refused.value)

    chosen = prepare(json_file, "json_exact_match")
    assert chosen.task_metric == "json_exact_match"
    assert chosen.resolution.choices["evaluation.task_metric"].value == "json_exact_match"
    assert prepare(text_file, "eval_loss").resolution.choices["evaluation.task_metric"].value == "none"


def test_an_evaluation_without_the_best_model_metric_stops_the_run() -> None:
    """Fix: a metric missing from an evaluation was skipped silently, for every evaluation of the run."""
    hooks = Hooks(evaluate=lambda step: {"eval_loss": 1.0, "eval_perplexity": math.e})
    with pytest.raises(
        ConfigError, match="`exact_match` is not among the metrics of the evaluation after step 1"
    ):
        fit_tiny_model(3, hooks, eval_steps=1, metric_for_best_model="exact_match", early_stopping_patience=1)


@pytest.mark.parametrize(("eval_steps", "save_steps", "refused"), [(0.3, 0.6, True), (0.25, 0.5, False)])
def test_load_best_model_checks_fractional_cadences_once_resolved(
    make_config: ConfigMaker, eval_steps: float, save_steps: float, refused: bool
) -> None:
    """0.6 is twice 0.3, but of 7 steps they come to ceil(2.1) = 3 and ceil(4.2) = 5: no checkpoint would have
    an evaluation, so none could be the best. Of 8 steps, 0.25 and 0.5 come to 2 and 4, which is fine."""
    training = {"eval_steps": eval_steps, "save_steps": save_steps, "load_best_model_at_end": True}
    config = make_config(validation=True, training={**training, "max_steps": 7 if refused else 8})
    if not refused:
        prep = tunewise.run.prepare(config)
        assert (prep.steps.eval_steps, prep.steps.save_steps) == (2, 4)
        return
    with pytest.raises(ConfigError) as error:
        tunewise.run.prepare(config)
    [problem] = error.value.problems
    assert problem.path == "training.load_best_model_at_end"
    assert "come to 5 and 3 of the 7 steps" in problem.message
    assert "e.g. eval_steps: 3 and save_steps: 6" in problem.message


# ------------------------------------------------------------------------------------------------- seeds


@pytest.fixture(scope="module")
def seeded_runs(make_config: ConfigMaker) -> dict[str, Run]:
    """One epoch, cosine schedule with warmup: the base run, its repeat, and a run with another data_seed."""
    training = {
        "max_steps": -1,
        "num_train_epochs": 1,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 2,
        "seed": 7,
    }
    return {
        "base": train(make_config(training=training)),
        "again": train(make_config(training=training)),
        "data_seed": train(make_config(training={**training, "data_seed": 8})),
    }


def test_same_seed_same_loss_curve(seeded_runs: dict[str, Run]) -> None:
    base, again = seeded_runs["base"], seeded_runs["again"]
    assert again.curve() == pytest.approx(base.curve(), abs=1e-7, rel=0)
    assert again.curve("grad_norm") == pytest.approx(base.curve("grad_norm"), abs=1e-7, rel=0)


def test_data_seed_changes_the_order_not_the_initialisation(
    seeded_runs: dict[str, Run], make_config: ConfigMaker
) -> None:
    base, other = seeded_runs["base"], seeded_runs["data_seed"]
    assert max(abs(a - b) for a, b in zip(base.curve(), other.curve(), strict=True)) > 1e-3
    assert base.summary["tokens"] == other.summary["tokens"], "one epoch each: the same rows, reordered"

    def lora_a(training: dict) -> dict[str, torch.Tensor]:
        prep = tunewise.run.prepare(make_config(training=training))
        return {k: v for k, v in get_peft_model_state_dict(prep.model).items() if "lora_A" in k}

    start = lora_a({"seed": 7})
    assert all(torch.equal(start[k], v) for k, v in lora_a({"seed": 7, "data_seed": 8}).items())
    assert not any(torch.equal(start[k], v) for k, v in lora_a({"seed": 8}).items())


# ----------------------------------------------------------------------------------------------- outputs


def test_metrics_rows_and_summary(seeded_runs: dict[str, Run], make_config: ConfigMaker) -> None:
    run = seeded_runs["base"]
    rows = run.train_rows
    assert [r["step"] for r in rows] == list(range(1, STEPS_PER_EPOCH + 1))
    for row in rows:
        assert set(row) == {
            "step",
            "epoch",
            "loss",
            "learning_rate",
            "grad_norm",
            "tokens",
            "tokens_per_second",
        }
        assert row["tokens_per_second"] > 0
    assert [r["epoch"] for r in rows] == [k / STEPS_PER_EPOCH for k in range(1, STEPS_PER_EPOCH + 1)]
    # tokens counts non-pad input tokens: one epoch sees every training row once.
    prep = tunewise.run.prepare(make_config(training={"seed": 7}))
    assert rows[-1]["tokens"] == run.summary["tokens"] == sum(prep.data.train["length"])
    # The rate each update used, as HF logs it: get_scheduler's rate before its step().
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-2)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=2, num_training_steps=STEPS_PER_EPOCH)
    expected = []
    for _ in rows:
        expected.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert [r["learning_rate"] for r in rows] == pytest.approx(expected, rel=1e-12)
    assert expected[0] == 0.0 and max(expected) == pytest.approx(1e-2)
    on_disk = json.loads((run.out / "summary.json").read_text())
    assert on_disk["stop_reason"] == "epochs"
    assert on_disk["best_step"] is None and on_disk["best_metric"] is None  # no validation set
    assert on_disk["total_steps"] == STEPS_PER_EPOCH


def test_logged_epoch_counts_micro_batches_as_hf(make_config: ConfigMaker, tmp_path: Path) -> None:
    """8 micro-batches per epoch with accumulation 3 make steps of 3, 3 and 2: HF's Trainer logs the micro-batches
    drawn over those per epoch (3/8, 6/8, 1), not steps over steps per epoch (1/3, 2/3, 1)."""
    run = train(make_config(training={"max_steps": 4, "gradient_accumulation_steps": 3}))
    examples = [{"input_ids": [3, 4, 5, 6], "labels": [3, 4, 5, 6]}] * 64  # 64 rows / batch 8, as the run's
    args = TrainingArguments(
        str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
    )
    trainer = Trainer(
        model=build_tiny_model(VOCAB), args=args, train_dataset=datasets.Dataset.from_list(examples)
    )
    trainer.train()
    hf = [row["epoch"] for row in trainer.state.log_history if "loss" in row]
    assert [r["epoch"] for r in run.train_rows] == pytest.approx(hf, abs=1e-4) == [0.375, 0.75, 1.0, 1.375]


def test_max_steps_stop_reason_and_eval_rows(make_config: ConfigMaker) -> None:
    run = train(make_config(validation=True, training={"max_steps": 2, "eval_steps": 1}))
    assert run.summary["stop_reason"] == "max_steps"
    for row in run.eval_rows:
        assert {"step", "eval_loss", "eval_perplexity"} <= set(row)
    assert run.summary["best_step"] in (1, 2)
    best_row = next(r for r in run.eval_rows if r["step"] == run.summary["best_step"])
    assert run.summary["best_metric"] == best_row["eval_loss"]


def test_interrupted_run_writes_its_summary(
    make_config: ConfigMaker, monkeypatch: pytest.MonkeyPatch
) -> None:
    class StopAtOnce:
        requested = True

        def __enter__(self) -> Self:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

    monkeypatch.setattr(tunewise.run, "GracefulStop", StopAtOnce)
    config = make_config()
    AcceleratorState._reset_state(reset_partial_state=True)
    tunewise.run.train(config, console=Console(file=io.StringIO()))
    summary = json.loads((Path(config["training"]["output_dir"]) / "summary.json").read_text())
    assert summary["stop_reason"] == "interrupted" and summary["total_steps"] == 1
