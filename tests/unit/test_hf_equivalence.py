"""Our step plan, warmup, intervals, schedulers and optimizers against the installed transformers.

The reference is always HF's own code: ``Trainer.train()`` on a tiny model, ``Trainer.create_optimizer``/
``create_scheduler``, ``TrainingArguments.get_warmup_steps`` and ``TrainerState.compute_steps``; never a
re-derivation of our own formulas.

Run as a script with ``--ddp-worker`` it is the worker process of the two-process (gloo) test.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)
from transformers.utils import logging as hf_logging

from tunewise.training.optim import OPTIMIZER_NAMES, build_optimizer, choose_optimizer, decay_parameter_names
from tunewise.training.schedule import (
    SCHEDULER_NAMES,
    StepPlan,
    build_scheduler,
    compute_step_plan,
    resolve_interval,
    resolve_warmup_steps,
)

hf_logging.set_verbosity_error()


@pytest.fixture(autouse=True, scope="module")
def one_cpu_thread() -> Iterator[None]:
    """Width-16 matmuls only pay thread overhead: one thread makes this module ~3x faster on a busy box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_llama(**overrides: Any) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = {
        "vocab_size": 64,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
    }
    return LlamaForCausalLM(LlamaConfig(**{**config, **overrides}))


def hf_args(output_dir: Path | str, **kwargs: Any) -> TrainingArguments:
    quiet = {
        "report_to": [],
        "use_cpu": True,
        "save_strategy": "no",
        "logging_strategy": "no",
        "disable_tqdm": True,
    }
    return TrainingArguments(output_dir=str(output_dir), **{**quiet, **kwargs})


class TinyDataset(torch.utils.data.Dataset):
    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = torch.tensor([1 + index % 60, 2, 3, 4])
        return {"input_ids": ids, "labels": ids.clone()}


# --------------------------------------------------------------------------------------------------------------
# Steps: HF's numbers come from running Trainer.train() (learning rate 0, 2 layers, width 16) and watching it,
# plus Trainer.set_initial_training_values (the helper train() itself calls) for the per-epoch figures.


@dataclass
class WindowRecorder(TrainerCallback):
    """Micro-batches in each accumulation window, grouped by epoch, and optimizer steps taken."""

    windows: list[list[int]] = field(default_factory=list)
    optimizer_steps: int = 0
    _pending: int = 0

    def on_epoch_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        self.windows.append([])

    def on_substep_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        self._pending += 1  # a micro-batch that did not end its window

    def on_optimizer_step(self, *args: Any, **kw: Any) -> None:
        self.optimizer_steps += 1

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        self.windows[-1].append(self._pending + 1)
        self._pending = 0


def run_hf_trainer(output_dir: str, case: tuple[int, int, int, float, int, bool]) -> dict[str, Any]:
    """What HF Trainer does for (num_examples, batch, accumulation, epochs, max_steps, drop_last)."""
    num_examples, batch_size, accumulation, epochs, max_steps, drop_last = case
    args = hf_args(
        output_dir,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        num_train_epochs=epochs,
        max_steps=max_steps,
        dataloader_drop_last=drop_last,
        learning_rate=0.0,
        optim="sgd",
    )
    recorder = WindowRecorder()
    trainer = Trainer(
        model=tiny_llama(), args=args, train_dataset=TinyDataset(num_examples), callbacks=[recorder]
    )
    trainer.train()
    epochs_hf, steps_per_epoch, _, _, total_batch, batches_per_epoch, max_steps_hf = (
        trainer.set_initial_training_values(args, trainer.get_train_dataloader())
    )
    return {
        "world_size": args.world_size,
        "state_max_steps": trainer.state.max_steps,
        "global_step": trainer.state.global_step,
        "optimizer_steps": recorder.optimizer_steps,
        "windows": recorder.windows,
        "helper": {
            "num_train_epochs": epochs_hf,
            "num_update_steps_per_epoch": steps_per_epoch,
            "total_train_batch_size": total_batch,
            "steps_in_epoch": batches_per_epoch,
            "max_steps": max_steps_hf,
        },
    }


def assert_plan_matches_hf(plan: StepPlan, hf: dict[str, Any], accumulation: int, max_steps: int) -> None:
    helper = hf["helper"]
    assert plan.total_steps == hf["state_max_steps"] == hf["global_step"] == hf["optimizer_steps"]
    assert plan.total_steps == helper["max_steps"]
    assert plan.num_epochs == len(hf["windows"]) == helper["num_train_epochs"]
    assert plan.steps_per_epoch == helper["num_update_steps_per_epoch"]
    assert plan.batches_per_epoch == helper["steps_in_epoch"]
    assert plan.effective_batch_size == helper["total_train_batch_size"]
    assert plan.max_steps_overrides == (max_steps > 0)
    # Every epoch runs full windows then one window of last_window_batches; the last epoch may stop early.
    full_epoch = [accumulation] * (plan.steps_per_epoch - 1) + [plan.last_window_batches]
    assert sum(full_epoch) == plan.batches_per_epoch
    for epoch_windows in hf["windows"]:
        assert epoch_windows == full_epoch[: len(epoch_windows)]
    assert [len(w) for w in hf["windows"][:-1]] == [plan.steps_per_epoch] * (plan.num_epochs - 1)


# (num_examples, per_device_batch_size, gradient_accumulation_steps, num_train_epochs, max_steps, drop_last)
STEP_CASES = {
    "batches divide evenly": (16, 4, 1, 1, -1, False),
    "remainder batch kept": (10, 4, 1, 2, -1, False),
    "remainder batch dropped": (10, 4, 1, 3, -1, True),
    "dataset smaller than one batch": (3, 8, 1, 2, -1, False),
    "smaller than a batch, accumulation 4": (3, 8, 4, 1, -1, False),
    "accumulation does not divide batches": (10, 2, 2, 1, -1, False),
    "accumulation > batches_per_epoch": (9, 2, 8, 2, -1, False),
    "fractional 2.5 epochs, short windows": (10, 3, 3, 2.5, -1, False),
    "half an epoch": (20, 2, 1, 0.5, -1, False),
    "0.28 x 25 = 7.000000000000001 -> 8": (50, 2, 1, 0.28, -1, False),
    "max_steps beyond one epoch": (10, 4, 2, 1, 7, False),
    "max_steps within one epoch": (40, 4, 2, 3, 2, False),
    "max_steps ignores num_train_epochs=0": (12, 4, 3, 0, 5, False),
    "drop_last with short window, 1.5 epochs": (11, 2, 4, 1.5, -1, True),
}


@pytest.mark.parametrize("case", STEP_CASES.values(), ids=STEP_CASES.keys())
def test_step_plan_matches_trainer(case: tuple[int, int, int, float, int, bool], tmp_path: Path) -> None:
    num_examples, batch_size, accumulation, epochs, max_steps, drop_last = case
    plan = compute_step_plan(num_examples, batch_size, accumulation, 1, epochs, max_steps, drop_last)
    assert_plan_matches_hf(plan, run_hf_trainer(str(tmp_path), case), accumulation, max_steps)


DDP_CASES = [
    (10, 2, 2, 1, -1, False),  # 5 global batches -> 3 per device (accelerate's even_batches pads)
    (11, 2, 1, 2, -1, False),
    (11, 2, 1, 2, -1, True),  # 5 full global batches -> 2 per device
    (3, 4, 1, 1, -1, False),  # one global batch for two devices
    (10, 4, 3, 1.5, -1, False),
    (9, 2, 2, 1, 9, False),
]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed")
def test_step_plan_matches_trainer_on_two_processes(tmp_path: Path) -> None:
    """A real world_size=2 run: two CPU processes, gloo, accelerate sharding the dataloader."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = tmp_path / "hf.json"
    logs = [tmp_path / f"rank{rank}.log" for rank in range(2)]
    workers = []
    for rank, log in enumerate(logs):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            LOCAL_WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
        )
        command = [sys.executable, __file__, "--ddp-worker", str(tmp_path), str(result)]
        with log.open("w") as out:  # files, not pipes: a full pipe would stall one rank inside a collective
            workers.append(subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT))
    for worker in workers:
        worker.wait(timeout=180)
    assert all(w.returncode == 0 for w in workers), "\n".join(log.read_text()[-3000:] for log in logs)
    for case, hf in zip(DDP_CASES, json.loads(result.read_text()), strict=True):
        num_examples, batch_size, accumulation, epochs, max_steps, drop_last = case
        assert hf["world_size"] == 2
        plan = compute_step_plan(num_examples, batch_size, accumulation, 2, epochs, max_steps, drop_last)
        assert_plan_matches_hf(plan, hf, accumulation, max_steps)


def _ddp_worker(scratch: str, result: str) -> None:
    runs = [run_hf_trainer(f"{scratch}/rank{os.environ['RANK']}", case) for case in DDP_CASES]
    if os.environ["RANK"] == "0":
        Path(result).write_text(json.dumps(runs))


def test_hf_runs_one_step_for_max_steps_zero_so_we_refuse_it(tmp_path: Path) -> None:
    """Why compute_step_plan rejects max_steps=0: HF records 0 steps yet takes one before stopping."""
    hf = run_hf_trainer(str(tmp_path), (10, 4, 2, 1, 0, False))
    assert (hf["state_max_steps"], hf["global_step"]) == (0, 1)
    with pytest.raises(ValueError, match="max_steps=0"):
        compute_step_plan(10, 4, 2, 1, 1, 0)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ((3, 8, 1, 1, 1.0, -1, True), "dataloader_drop_last"),  # HF: 0 steps, or an error about max_steps
        ((10, 4, 1, 1, 0, -1, False), "num_train_epochs=0"),
        ((10, 0, 0, 1, 1.0, -1, False), "per_device_train_batch_size=0.*\n.*gradient_accumulation_steps=0"),
    ],
)
def test_step_plan_errors_speak(arguments: tuple[Any, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        compute_step_plan(*arguments)


# --------------------------------------------------------------------------------------------------------------
# Warmup and intervals: against TrainingArguments.get_warmup_steps and TrainerState.compute_steps.


@pytest.mark.parametrize("total_steps", [1, 7, 50, 333])
def test_warmup_matches_training_arguments(total_steps: int, tmp_path: Path) -> None:
    for ratio in (0.0, 0.01, 0.03, 0.1, 0.25, 0.5, 0.999):
        # transformers 5 has no warmup_ratio: a warmup_steps below 1 is the ratio.
        expected = hf_args(tmp_path, warmup_steps=ratio).get_warmup_steps(total_steps)
        assert resolve_warmup_steps(total_steps, None, ratio)[0] == expected
        assert resolve_warmup_steps(total_steps, ratio, None)[0] == expected
    for steps in (0, 1, 5, 50, 400):
        expected = hf_args(tmp_path, warmup_steps=steps).get_warmup_steps(total_steps)
        assert resolve_warmup_steps(total_steps, steps, None)[0] == expected


def test_warmup_reasons_and_precedence() -> None:
    assert resolve_warmup_steps(50, 10, 0.5) == (10, "warmup_steps=10 given; warmup_ratio=0.5 ignored")
    assert resolve_warmup_steps(50, 0, 0.1) == (5, "ceil(warmup_ratio 0.1 x 50 steps) = 5")
    assert "never reaches its peak" in resolve_warmup_steps(50, 60, None)[1]
    assert resolve_warmup_steps(50, None, None)[0] == 0
    with pytest.raises(ValueError, match="whole number"):
        resolve_warmup_steps(50, 2.5, None)


@pytest.mark.parametrize("total_steps", [1, 9, 50, 1000])
def test_intervals_match_trainer_state(total_steps: int, tmp_path: Path) -> None:
    for value in (0.001, 0.1, 0.25, 1 / 3, 0.5, 0.999, 1, 1.0, 7, 10.0, 500):
        args = hf_args(
            tmp_path,
            logging_strategy="steps",
            logging_steps=value,
            eval_strategy="steps",
            eval_steps=value,
            save_strategy="steps",
            save_steps=value,
        )
        state = TrainerState()
        state.compute_steps(args, total_steps)  # what Trainer._init_training_state calls
        for hf_value in (state.logging_steps, state.eval_steps, state.save_steps):
            assert resolve_interval(value, total_steps) == hf_value, value
    assert resolve_interval(None, total_steps) is None


def test_interval_errors_match_training_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="must be an integer if bigger than 1"):
        hf_args(tmp_path, logging_strategy="steps", logging_steps=2.5)
    with pytest.raises(ValueError, match="whole number"):
        resolve_interval(2.5, 100)
    with pytest.raises(ValueError, match="unset to disable"):
        resolve_interval(0, 100)


# --------------------------------------------------------------------------------------------------------------
# Schedulers: our resolve_warmup_steps + build_scheduler against Trainer.create_scheduler, both driven as
# Trainer._run_epoch drives them (optimizer.step(), then scheduler.step(); the LR of update k is logged after it).

SCHEDULE_CASES = [
    ("linear", None),
    ("cosine", None),
    ("cosine", {"num_cycles": 1.5}),
    ("cosine_with_restarts", None),
    ("cosine_with_restarts", {"num_cycles": 3}),
    ("cosine_with_min_lr", {"min_lr_rate": 0.1}),
    ("cosine_with_min_lr", {"min_lr": 1e-4}),
    ("polynomial", None),
    ("polynomial", {"power": 2.0, "lr_end": 1e-5}),
    ("constant_with_warmup", None),
]
TOTAL_STEPS = 50


def lr_trace(
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler
) -> list[float]:
    trace = []
    for _ in range(TOTAL_STEPS):
        optimizer.step()
        trace.append(float(scheduler.get_last_lr()[0]))  # Trainer._get_learning_rate: before scheduler.step()
        scheduler.step()
    return trace


def hf_lr_trace(trainer: Trainer) -> list[float]:
    trainer.create_optimizer_and_scheduler(num_training_steps=TOTAL_STEPS)
    assert trainer.optimizer is not None and trainer.lr_scheduler is not None
    return lr_trace(trainer.optimizer, trainer.lr_scheduler)


@pytest.mark.parametrize(("name", "kwargs"), SCHEDULE_CASES, ids=[f"{n}-{k}" for n, k in SCHEDULE_CASES])
@pytest.mark.parametrize(("warmup_steps", "warmup_ratio"), [(7, None), (None, 0.1)], ids=["steps", "ratio"])
def test_schedule_matches_trainer(
    name: str,
    kwargs: dict[str, Any] | None,
    warmup_steps: int | None,
    warmup_ratio: float | None,
    hf_trainer_model: nn.Module,
    tmp_path: Path,
) -> None:
    warmup_for_hf = warmup_steps if warmup_steps is not None else warmup_ratio
    args = hf_args(
        tmp_path,
        learning_rate=1e-3,
        optim="sgd",
        lr_scheduler_type=name,
        lr_scheduler_kwargs=kwargs or {},
        warmup_steps=warmup_for_hf,
    )
    expected = hf_lr_trace(Trainer(model=hf_trainer_model, args=args))

    optimizer, _ = build_optimizer(tiny_llama(), "sgd", 1e-3, 0.0, 0.9, 0.999, 1e-8, "cpu")
    warmup, _ = resolve_warmup_steps(TOTAL_STEPS, warmup_steps, warmup_ratio)
    actual = lr_trace(optimizer, build_scheduler(optimizer, name, warmup, TOTAL_STEPS, kwargs))

    assert actual == pytest.approx(expected, rel=1e-12, abs=0.0)
    assert len(set(expected)) > 5  # a real schedule, not a constant
    assert expected[0] == 0.0  # HF: with warmup, the first update runs at learning rate 0


def test_constant_matches_trainer_without_warmup(hf_trainer_model: nn.Module, tmp_path: Path) -> None:
    args = hf_args(tmp_path, learning_rate=1e-3, optim="sgd", lr_scheduler_type="constant")
    expected = hf_lr_trace(Trainer(model=hf_trainer_model, args=args))
    optimizer, _ = build_optimizer(tiny_llama(), "sgd", 1e-3, 0.0, 0.9, 0.999, 1e-8, "cpu")
    actual = lr_trace(optimizer, build_scheduler(optimizer, "constant", 0, TOTAL_STEPS, None))
    assert actual == expected == [1e-3] * TOTAL_STEPS


def test_constant_with_warmup_is_refused_where_hf_drops_it(
    hf_trainer_model: nn.Module, tmp_path: Path
) -> None:
    args = hf_args(tmp_path, learning_rate=1e-3, optim="sgd", lr_scheduler_type="constant", warmup_steps=7)
    assert hf_lr_trace(Trainer(model=hf_trainer_model, args=args))[0] == 1e-3  # HF: the 7 warmup steps vanish
    optimizer, _ = build_optimizer(tiny_llama(), "sgd", 1e-3, 0.0, 0.9, 0.999, 1e-8, "cpu")
    with pytest.raises(ValueError, match="constant_with_warmup"):
        build_scheduler(optimizer, "constant", 7, TOTAL_STEPS, None)


def test_scheduler_errors_list_the_valid_choices() -> None:
    optimizer, _ = build_optimizer(tiny_llama(), "sgd", 1e-3, 0.0, 0.9, 0.999, 1e-8, "cpu")
    with pytest.raises(ValueError) as unknown:
        build_scheduler(optimizer, "cosine_annealing", 0, TOTAL_STEPS, None)
    assert all(name in str(unknown.value) for name in SCHEDULER_NAMES)
    with pytest.raises(ValueError, match=r"\['min_lr_ratio'\] do not apply.*min_lr, min_lr_rate, num_cycles"):
        build_scheduler(optimizer, "cosine_with_min_lr", 0, TOTAL_STEPS, {"min_lr_ratio": 0.1})
    with pytest.raises(ValueError, match="takes no lr_scheduler_kwargs"):
        build_scheduler(optimizer, "constant_with_warmup", 5, TOTAL_STEPS, {"num_cycles": 2})


@pytest.fixture(scope="module")
def hf_trainer_model() -> nn.Module:
    return tiny_llama()


# --------------------------------------------------------------------------------------------------------------
# Weight decay groups and optimizers: against Trainer.get_decay_parameter_names and Trainer.create_optimizer.


def lora_llama() -> nn.Module:
    from peft import LoraConfig, get_peft_model

    return get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj", "down_proj"]))


DECAY_MODELS = {
    "llama": tiny_llama,
    "llama tied embeddings": lambda: tiny_llama(tie_word_embeddings=True),
    "llama + lora": lora_llama,
    "gpt2 (nn.LayerNorm, biases)": lambda: GPT2LMHeadModel(
        GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2)
    ),
}


@pytest.mark.parametrize("make_model", DECAY_MODELS.values(), ids=DECAY_MODELS.keys())
def test_decay_names_match_trainer(make_model: Any, tmp_path: Path) -> None:
    model = make_model()
    hf_names = set(Trainer(model=model, args=hf_args(tmp_path)).get_decay_parameter_names(model))
    ours = decay_parameter_names(model)
    assert ours == hf_names
    assert ours and set(dict(model.named_parameters(remove_duplicate=False))) - ours  # both kinds present


def test_param_groups_match_trainer(tmp_path: Path) -> None:
    model = lora_llama()
    for name, param in model.named_parameters():
        param.requires_grad_(param.requires_grad or name.endswith("norm.weight"))  # trainable norms too
    args = hf_args(tmp_path, optim="adamw_torch", weight_decay=0.1)
    hf_groups = Trainer(model=model, args=args).create_optimizer().param_groups
    ours, _ = build_optimizer(model, "adamw_torch", 1e-3, 0.1, 0.9, 0.999, 1e-8, "cpu")
    assert [g["weight_decay"] for g in ours.param_groups] == [0.1, 0.0]
    assert [[id(p) for p in g["params"]] for g in ours.param_groups] == [
        [id(p) for p in g["params"]] for g in hf_groups
    ]
    decayed = {
        id(p) for n, p in model.named_parameters() if n in decay_parameter_names(model) and p.requires_grad
    }
    assert {id(p) for p in ours.param_groups[0]["params"]} == decayed


def optimizer_model() -> LlamaForCausalLM:
    """Big enough for 8-bit state: bitsandbytes keeps tensors under 4096 elements in 32 bits."""
    model = tiny_llama(vocab_size=128, hidden_size=32, intermediate_size=128, num_hidden_layers=1)
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(False)  # one frozen weight
    return model


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int = 3) -> None:
    batch = torch.arange(2 * 16).reshape(2, 16) % 128
    for _ in range(steps):
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


HF_OPTIM_ARGS = {
    "sgd": ("momentum=0.9,nesterov=True,dampening=0", {"momentum": 0.9, "nesterov": True, "dampening": 0})
}


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_optimizer_matches_trainer(name: str, tmp_path: Path) -> None:
    hf_model = optimizer_model()
    our_model = copy.deepcopy(hf_model)
    hf_optim_args, our_optim_args = HF_OPTIM_ARGS.get(name, (None, None))
    hyper = {
        "learning_rate": 1e-2,
        "weight_decay": 0.1,
        "adam_beta1": 0.8,
        "adam_beta2": 0.95,
        "adam_epsilon": 1e-6,
    }
    args = hf_args(tmp_path, optim=name, optim_args=hf_optim_args, **hyper)
    hf_optimizer = Trainer(model=hf_model, args=args).create_optimizer()
    ours, notes = build_optimizer(our_model, name, 1e-2, 0.1, 0.8, 0.95, 1e-6, "cpu", our_optim_args)

    assert type(ours) is type(hf_optimizer)
    for key in ("lr", "betas", "eps", "weight_decay", "momentum", "nesterov", "dampening"):
        assert [g.get(key) for g in ours.param_groups] == [g.get(key) for g in hf_optimizer.param_groups], key
    if "adam" in name:
        assert all(g["betas"] == (0.8, 0.95) and g["eps"] == 1e-6 for g in ours.param_groups)

    frozen = our_model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    before = {n: p.detach().clone() for n, p in our_model.named_parameters() if p.requires_grad}
    # Ours first: HF's 8-bit embedding override, once stepped, sits in bitsandbytes' process-wide manager
    # keyed by (group, index) and would apply to our optimizer too, hiding a missing override of ours.
    train_steps(our_model, ours)
    train_steps(hf_model, hf_optimizer)
    for (n, ours_p), hf_p in zip(our_model.named_parameters(), hf_model.parameters(), strict=True):
        assert torch.allclose(ours_p, hf_p, rtol=1e-5, atol=1e-6), n
    assert torch.equal(our_model.model.layers[0].self_attn.q_proj.weight, frozen)
    assert all(not torch.equal(p, before[n]) for n, p in our_model.named_parameters() if p.requires_grad)
    if name.startswith("paged_"):
        assert any("CUDA" in note and "cpu" in note for note in notes) and not ours.is_paged  # type: ignore[attr-defined]  # bitsandbytes


def test_adamw_torch_uses_fused_cpu_kernel() -> None:
    optimizer, notes = build_optimizer(optimizer_model(), "adamw_torch", 1e-3, 0.0, 0.9, 0.999, 1e-8, "cpu")
    assert optimizer.defaults["fused"] is True
    assert notes == [f"AdamW: fused kernel on cpu (torch {torch.__version__})"]


def test_8bit_state_on_cpu_with_32bit_embeddings() -> None:
    model = optimizer_model()
    optimizer, notes = build_optimizer(model, "adamw_8bit", 1e-2, 0.0, 0.9, 0.999, 1e-8, "cpu")
    train_steps(model, optimizer, steps=1)
    assert notes == []
    assert optimizer.state[model.model.layers[0].mlp.gate_proj.weight]["state1"].dtype == torch.uint8
    assert optimizer.state[model.model.embed_tokens.weight]["state1"].dtype == torch.float32  # as HF


def test_bitsandbytes_fallback_is_announced() -> None:
    optimizer, notes = build_optimizer(
        optimizer_model(),
        "paged_adamw_8bit",
        1e-3,
        0.0,
        0.9,
        0.999,
        1e-8,
        "cpu",
        bnb_runs_on=lambda d, b: False,
    )
    assert type(optimizer) is torch.optim.AdamW
    assert "using adamw_8bit on cpu" in notes[0] and "using adamw_torch instead" in notes[1]


@pytest.mark.parametrize(
    ("name", "device", "bnb_runs", "built", "paged"),
    [
        ("paged_adamw_8bit", "cuda", True, "paged_adamw_8bit", True),
        ("paged_adamw_8bit", "cpu", True, "adamw_8bit", False),  # paging needs CUDA unified memory
        ("paged_adamw_32bit", "cpu", True, "paged_adamw_32bit", False),
        ("paged_adamw_8bit", "cpu", False, "adamw_torch", False),  # bitsandbytes cannot step here
        ("adamw_bnb_8bit", "cpu", True, "adamw_bnb_8bit", False),
        ("sgd", "cpu", False, "sgd", False),
    ],
)
def test_the_optimizer_built_is_the_one_chosen_without_the_model(
    name: str, device: str, bnb_runs: bool, built: str, paged: bool
) -> None:
    """`choose_optimizer` decides from the name, device and bitsandbytes probe alone (so the plan shows it), and
    `build_optimizer` builds exactly that, with the same notes."""
    choice = choose_optimizer(name, device, lambda d, b: bnb_runs)
    assert (choice.name, choice.paged) == (built, paged)
    assert bool(choice.notes) == (choice.label != name)  # every stand-in says why
    if device == "cuda":
        return  # no GPU here to build on
    optimizer, notes = build_optimizer(
        optimizer_model(), name, 1e-3, 0.0, 0.9, 0.999, 1e-8, device, bnb_runs_on=lambda d, b: bnb_runs
    )
    assert notes == list(choice.notes)
    expected = {"adamw_torch": "torch.optim.adamw", "sgd": "torch.optim.sgd"}.get(built, "bitsandbytes")
    assert type(optimizer).__module__.startswith(expected)
    assert getattr(optimizer, "is_paged", False) is False


def test_optimizer_errors_speak() -> None:
    with pytest.raises(ValueError) as unknown:
        build_optimizer(tiny_llama(), "adam", 1e-3, 0.0, 0.9, 0.999, 1e-8, "cpu")
    assert all(name in str(unknown.value) for name in OPTIMIZER_NAMES)
    with pytest.raises(ValueError, match="takes no optim_args"):
        build_optimizer(tiny_llama(), "adamw_torch", 1e-3, 0.0, 0.9, 0.999, 1e-8, "cpu", {"momentum": 0.9})
    with pytest.raises(ValueError, match="nesterov='yes'"):
        build_optimizer(tiny_llama(), "sgd", 1e-3, 0.0, 0.9, 0.999, 1e-8, "cpu", {"nesterov": "yes"})
    frozen = tiny_llama().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(frozen, "adamw_torch", 1e-3, 0.0, 0.9, 0.999, 1e-8, "cpu")


@pytest.fixture(autouse=True)
def fresh_bitsandbytes_manager() -> None:
    """HF's 8-bit embedding override lives in bitsandbytes' process-wide manager; start each test clean."""
    import bitsandbytes as bnb

    bnb.optim.GlobalOptimManager.get_instance().initialize()


if __name__ == "__main__" and sys.argv[1:2] == ["--ddp-worker"]:
    _ddp_worker(*sys.argv[2:4])
