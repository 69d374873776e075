"""The same LoRA job with tunewise and with TRL's SFTTrainer (CPU), or HF Transformers + PEFT (CUDA).

    python bench/vs_trl.py                                  # CPU: SmolLM2-135M, ~20-25 min on 2 cores
    python bench/vs_trl.py --device cuda                    # 1B-class random llama, sequence length 2048
    python bench/vs_trl.py --device cuda --tokenizer DIR    # ... where the embedded GGUF cannot be read

Every run is its own subprocess (fresh peak RSS), in alternating order (a, b, c, a, b, c, ...), on
the same chat data: a deterministic "reverse these words" task whose examples spread evenly from
about 50 to about 500 tokens, trained on the assistant turns only. Both tools get the very same
token ids and loss masks (TRL receives them pre-tokenised), the same LoRA (r 16, alpha 32, dropout
0 by default, all linear layers, same seed), optimizer settings and schedule. Only the training steps are
timed, from the end of the first optimizer step to the end of the last (the first step pays for
one-off allocations in both tools). See bench/README.md for what each column means.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

SEED = 42
LORA = {"r": 16, "lora_alpha": 32}  # lora_dropout: --lora-dropout, default 0 (PEFT's and tunewise's)
LEARNING_RATE = 2e-4

# name: (tool, options). Every variant is a setting a user of that tool can choose.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "tunewise": ("tunewise", {}),  # defaults: padded micro-batches of `batch` sequences
    "tunewise-grouped": ("tunewise", {"data": {"group_by_length": True}}),
    "tunewise-packed": ("tunewise", {"data": {"packing": True}}),
    "tunewise-mb1": ("tunewise", {"micro_batch": 1}),  # one example per micro-batch: no padding at all
    "tunewise-compiled": ("tunewise", {"data": {"packing": True}, "training": {"torch_compile": True}}),
    "tunewise-compiled-mb2": (  # four packed micro-batches of 2 per step: a quarter of the activations
        "tunewise",
        {"data": {"packing": True}, "training": {"torch_compile": True}, "micro_batch": 2},
    ),
    "tunewise-compiled-mb4": (  # two packed micro-batches of 4 per step: in bf16 on CPU the faster of the two
        "tunewise",
        {"data": {"packing": True}, "training": {"torch_compile": True}, "micro_batch": 4},
    ),
    # packed rows of at most 512 tokens (`max_tokens_per_micro_batch`), the size of TRL's packed rows: each step's
    # 8 examples in 4-6 micro-batches, bounded by tokens rather than examples
    "tunewise-compiled-t512": (
        "tunewise",
        {"data": {"packing": True}, "training": {"torch_compile": True, "max_tokens_per_micro_batch": 512}},
    ),
    "tunewise-compiled-t1024": (
        "tunewise",
        {"data": {"packing": True}, "training": {"torch_compile": True, "max_tokens_per_micro_batch": 1024}},
    ),
    "trl": ("trl", {}),  # SFTTrainer's defaults (gradient checkpointing on)
    "trl-nogc": ("trl", {"gradient_checkpointing": False}),
    "trl-grouped": ("trl", {"gradient_checkpointing": False, "train_sampling_strategy": "group_by_length"}),
    "trl-packing": ("trl", {"packing": True}),
    "trl-packing-nogc": ("trl", {"packing": True, "gradient_checkpointing": False}),
    # ... with host memory set as tunewise sets it on CPU (training/host_memory.py): glibc keeps freed blocks,
    # torch's large tensors on transparent huge pages.
    "trl-packing-nogc-keepmem": (
        "trl",
        {"packing": True, "gradient_checkpointing": False, "keep_memory": True},
    ),
    # ... and each packed batch rounded up to a multiple of 64 tokens (SFTConfig.pad_to_multiple_of), as tunewise
    # rounds its bf16 batches on CPU: oneDNN compiles a kernel per new matmul shape.
    "trl-packing-nogc-keepmem-pad64": (
        "trl",
        {"packing": True, "gradient_checkpointing": False, "keep_memory": True, "pad_to_multiple_of": 64},
    ),
    # ... in two micro-batches of half the packed rows (gradient accumulation 2), as tunewise-compiled-mb4 splits
    # its step.
    "trl-packing-nogc-keepmem-acc2": (
        "trl",
        {"packing": True, "gradient_checkpointing": False, "keep_memory": True, "accumulation": 2},
    ),
    # ... and in one packed row per micro-batch (gradient accumulation 4 of the 4 rows a step here)
    "trl-packing-nogc-keepmem-acc4": (
        "trl",
        {"packing": True, "gradient_checkpointing": False, "keep_memory": True, "accumulation": 4},
    ),
    # ... and the Trainer's `torch_compile=True` (the whole model, inductor)
    "trl-packing-nogc-keepmem-acc4-compiled": (
        "trl",
        {
            "packing": True,
            "gradient_checkpointing": False,
            "keep_memory": True,
            "accumulation": 4,
            "torch_compile": True,
        },
    ),
    # TRL's padding-free batches without packing: each micro-batch's examples, as drawn (the very batches of
    # tunewise-compiled-mb2), flattened into one row; otherwise as the fastest setting above
    "trl-padfree-nogc-keepmem-acc4-compiled": (
        "trl",
        {
            "padding_free": True,
            "gradient_checkpointing": False,
            "keep_memory": True,
            "accumulation": 4,
            "torch_compile": True,
        },
    ),
    "hf": ("hf", {}),  # plain PyTorch loop over a PEFT model, HF's own loss (full logits)
    "hf-mb8": ("hf", {"micro_batch": 8}),  # ... in padded micro-batches of 8
    "hf-packed": ("hf", {"packing": True}),  # ... padding-free: flattened rows, sdpa with a block mask
    "hf-packed-mb8": ("hf", {"packing": True, "micro_batch": 8}),
}
DEFAULT_TOOLS = {
    "cpu": "tunewise-compiled-mb4,tunewise-compiled-mb2,tunewise-compiled-t512,trl-packing-nogc-keepmem-acc4-compiled,"
    "trl-packing-nogc-keepmem-acc4,trl",
    "cuda": "tunewise-compiled,tunewise-packed,hf",
}


# ------------------------------------------------------------------------------------------- data


def chat_rows(n: int, seed: int, min_tokens: int, max_tokens: int) -> list[dict]:
    """`tiny_chat_rows`'s reversal task, its word counts spread so token lengths cover the range.

    With SmolLM2's template (its default system prompt included) a row of w words is 34 + 2w tokens.
    """
    from tunewise.testing import tiny_chat_rows

    lo, hi = max(2, (min_tokens - 34) // 2), max(3, (max_tokens - 34) // 2)
    return tiny_chat_rows(n, seed=seed, min_words=lo, max_words=hi)


def encode_rows(rows: list[dict], tokenizer: Any, max_seq_length: int) -> list[dict]:
    from tunewise.data.tokenize import TokenizeSettings, encode_row

    return [encode_row(r, tokenizer, TokenizeSettings(max_seq_length)) for r in rows]


def tunewise_windows(
    lengths: list[int], micro: int, accumulation: int, grouped: bool, steps: int
) -> list[list[int]]:
    """The example ids of each of tunewise's first `steps` optimizer steps (its own batching code)."""
    from tunewise.data.collate import batch_indices

    windows: list[list[int]] = []
    epoch = 0
    while len(windows) < steps:
        batches = batch_indices(
            lengths,
            micro,
            shuffle=True,
            seed=SEED + epoch,
            group_by_length=grouped,
            group_size=micro * accumulation,
        )
        for i in range(0, len(batches), accumulation):
            windows.append([j for b in batches[i : i + accumulation] for j in b])
        epoch += 1
    return windows[:steps]


# ------------------------------------------------------------------------------------------ flops


@dataclass(frozen=True)
class Shape:
    layers: int
    attention_width: int  # heads x head_dim
    body_params: int  # matmul weights of the decoder layers
    head_params: int  # LM head
    lora_params: int


def model_shape(config: Any, r: int) -> Shape:
    h, inter = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    linears = [(h, q), (h, kv), (h, kv), (q, h), (h, inter), (h, inter), (inter, h)]
    layer = sum(i * o for i, o in linears)
    lora = sum(r * (i + o) for i, o in linears)
    n = config.num_hidden_layers
    return Shape(n, q, n * layer, config.vocab_size * h, n * lora)


def example_flops(shape: Shape, length: int, targets: int) -> float:
    """Training FLOPs one exact implementation must spend on one example.

    Frozen weights: 2N forward + 2N for the input gradient = 4N per token (no weight gradient). The
    LM head counts only where there is a target (an exact loss needs no logits elsewhere). LoRA:
    forward, input and weight gradients = 6 N_lora. Causal attention: QK^T and AV, 4 d L^2 / 2
    forward, twice that backward = 6 d L^2 per layer (PaLM's 12 n d L per token, halved for causality).
    """
    return (
        4 * shape.body_params * length
        + 4 * shape.head_params * targets
        + 6 * shape.lora_params * length
        + 6 * shape.layers * shape.attention_width * length * length
    )


def nominal_flops(shape: Shape, length: int) -> float:
    """The issue's convention for LoRA training: about 4N per token for all N weights, plus attention.

    It charges the LM head at every position, which `example_flops` does not (tunewise computes it
    at target positions only), so MFU by this count is the higher of the two where targets are sparse.
    """
    return (
        4 * (shape.body_params + shape.head_params) * length
        + 6 * shape.layers * shape.attention_width * length**2
    )


def measure_peak(device: str, dtype: torch.dtype, trials: int = 5) -> float:
    """Best matmul FLOP/s of an n x n x n product (the MFU denominator)."""
    n = 8192 if device == "cuda" else 4096
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best = 0.0
    for _ in range(trials):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = max(best, 2 * n**3 / (time.perf_counter() - start))
    return best


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------- models


CUDA_CONFIG = {  # Llama-3.2-1B's shape (vocab: SmolLM2's tokenizer), randomly initialised
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": True,
    "rope_theta": 500000.0,
}


def prepare_model_dir(device: str, work: Path, tokenizer_dir: Path | None = None) -> Path:
    """The embedded SmolLM2 on CPU; on CUDA a random 1B-class llama with SmolLM2's tokenizer (no download).

    `tokenizer_dir` (CUDA only): a folder with SmolLM2's tokenizer and config.json, for machines that
    have no copy of the embedded GGUF (or no `gguf` package) to convert.
    """
    from transformers import AutoConfig, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tunewise.models.load import materialize, resolve_source

    if device == "cuda" and tokenizer_dir is not None:
        smol = tokenizer_dir
    else:  # a private copy: the shared cache entry can be rebuilt by other processes during a long benchmark
        smol = Path(shutil.copytree(materialize(resolve_source("smollm2-135m-instruct")), work / "smollm2"))
    if device == "cpu":
        return smol
    target = work / "llama-1b-random"
    tokenizer = AutoTokenizer.from_pretrained(smol)
    base = AutoConfig.from_pretrained(smol)
    config = LlamaConfig(
        vocab_size=base.vocab_size,
        bos_token_id=base.bos_token_id,
        eos_token_id=base.eos_token_id,
        pad_token_id=base.pad_token_id,
        **CUDA_CONFIG,
    )
    torch.manual_seed(SEED)
    with torch.device("cuda"):  # initialising 1.2B parameters on the CPU takes longer than a run
        LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def lora_model(model_dir: Path, dtype: torch.dtype, dropout: float) -> Any:
    """Base model + LoRA exactly as tunewise builds it (same seed, so the same adapter init)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, set_seed

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
    set_seed(SEED)
    config = LoraConfig(task_type="CAUSAL_LM", target_modules="all-linear", lora_dropout=dropout, **LORA)
    return get_peft_model(model, config)


# ------------------------------------------------------------------------------------ child runs


@dataclass
class RunResult:
    name: str
    precision: str
    tokens_per_second: float  # non-padding input tokens, steps 2..N
    peak_bytes: int  # peak RSS (CPU) or max allocated (CUDA)
    seconds: float  # timed span
    cum_targets: list[int]  # cumulative target tokens at the end of each step
    losses: list[float]  # mean target loss of each step
    load: float  # 1-minute load average when the run started
    note: str = ""


def child_main(spec: dict) -> None:
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    tool, options = VARIANTS[spec["name"]]
    from tunewise.training.host_memory import request_huge_pages, set_host_memory

    if options.get("keep_memory"):  # both settings, as tunewise's command and train() make them
        set_host_memory()
    elif tool == "tunewise":  # what the `tunewise` command does before a large allocation; train() the rest
        request_huge_pages()
    result = {"tunewise": run_tunewise, "trl": run_trl, "hf": run_hf}[tool](spec)
    Path(spec["result"]).write_text(json.dumps(asdict(result)))


def _peak_bytes(device: str) -> int:
    if device == "cuda":
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _rate(tokens: list[int], clock: list[float]) -> tuple[float, float]:
    """Tokens per second from the end of step 1 to the end of the last step."""
    span = clock[-1] - clock[0]
    return (tokens[-1] - tokens[0]) / span, span


def run_tunewise(spec: dict) -> RunResult:
    import tunewise

    options = VARIANTS[spec["name"]][1]
    micro = options.get("micro_batch", spec["batch"])
    out = Path(spec["work"]) / f"tunewise-{spec['tag']}"
    config = {
        "model": {"model_name_or_path": spec["model_dir"], "attn_implementation": "sdpa"},
        "data": {"dataset": spec["train_file"], "format": "chat", "max_seq_length": spec["max_seq_length"]}
        | options.get("data", {}),
        "adapter": {
            "method": "lora",
            "target_modules": "all-linear",
            "lora_dropout": spec["lora_dropout"],
            **LORA,
        },
        "training": {
            "output_dir": str(out),
            "max_steps": spec["steps"],
            "per_device_train_batch_size": micro,
            "gradient_accumulation_steps": spec["batch"] // micro,
            "learning_rate": LEARNING_RATE,
            "lr_scheduler_type": "linear",
            "warmup_steps": 1,
            "logging_steps": 1,
            "precision": spec["precision"],
            "seed": SEED,
            # The check after step 1 (on by default on GPUs) runs one more micro-batch inside the timed span;
            # a safety measure, not training: the baselines have none, and every step here runs anyway.
            "memory_check": False,
            # Checkpoints by time (30 minutes by default) would write inside the timed span of a long run;
            # the baselines save nothing (save_strategy "no").
            "save_minutes": None,
        }
        | options.get("training", {}),
        "evaluation": {"task_metric": "none", "num_sample_prompts": 0},
    }
    tunewise.train(config)  # its console output goes to the pipe the parent discards
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "tokens_per_second" in r]
    tokens = [r["tokens"] for r in steps]
    clock = [r["tokens"] / r["tokens_per_second"] for r in steps]  # seconds since training began
    expected = spec["windows_tokens"]
    if tokens != list(_cumsum(expected)):
        raise RuntimeError(f"tunewise batched differently than bench expects: {tokens} vs {expected}")
    rate, span = _rate(tokens, clock)
    return RunResult(
        spec["name"], spec["precision"], rate, _peak_bytes(spec["device"]), span,
        list(_cumsum(spec["windows_targets"])), [r["loss"] for r in steps], spec["load"],
    )  # fmt: skip


def _cumsum(values: list[int]) -> list[int]:
    return list(itertools.accumulate(values))


class StepMeter:
    """Counts the tokens and targets of every forward call and stamps the end of every step."""

    def __init__(self, device: str, pad_token_id: int = -1) -> None:
        self.device, self.pad_token_id, self.tokens, self.targets = device, pad_token_id, 0, 0
        self.step_tokens: list[int] = []
        self.step_targets: list[int] = []
        self.clock: list[float] = []

    def forward_pre_hook(self, module: Any, args: tuple, kwargs: dict) -> None:
        mask, ids, labels = kwargs.get("attention_mask"), kwargs["input_ids"], kwargs["labels"]
        if mask is not None:
            self.tokens += int(mask.sum())
        else:  # padding-free: pad_to_multiple_of's pads trail the row, each at position 0
            positions = kwargs.get("position_ids")
            filler = (ids == self.pad_token_id) & (positions == 0) if positions is not None else ids < 0
            trailing = int(filler[0].flip(0).int().cumprod(0).sum())
            self.tokens += ids.numel() - trailing
        self.targets += int((labels[:, 1:] != -100).sum())

    def end_step(self) -> None:
        _sync(self.device)
        self.clock.append(time.perf_counter())
        self.step_tokens.append(self.tokens)
        self.step_targets.append(self.targets)


def run_trl(spec: dict) -> RunResult:
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    options = VARIANTS[spec["name"]][1]
    bf16 = spec["precision"] == "bf16"
    packing = options.get("packing", False)
    # Packed rows hold several examples: give TRL as many rows as carry the same tokens per step.
    rows = spec["packed_rows"] if packing else spec["batch"]
    accumulation = options.get("accumulation", 1)
    if rows % accumulation:  # before the model loads
        raise SystemExit(
            f"{spec['name']}: {rows} packed rows a step do not split into {accumulation} micro-batches"
        )
    model = lora_model(Path(spec["model_dir"]), torch.float32, spec["lora_dropout"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    meter, losses = StepMeter(spec["device"], tokenizer.pad_token_id), {}

    class Meter(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            meter.end_step()

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any) -> None:
            if logs and "loss" in logs:
                losses[state.global_step] = logs["loss"]

    args = SFTConfig(
        output_dir=str(Path(spec["work"]) / f"trl-{spec['tag']}"),
        max_steps=spec["steps"],
        per_device_train_batch_size=rows // accumulation,
        gradient_accumulation_steps=accumulation,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="linear",
        warmup_steps=1,
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=SEED,
        bf16=bf16,
        use_cpu=spec["device"] == "cpu",
        # Padding-free without packing, TRL refuses a max_length it would not enforce; the rows are tokenised
        # and truncated to max_seq_length already (encode_rows).
        max_length=None if options.get("padding_free") and not packing else spec["max_seq_length"],
        packing=packing,
        padding_free=options.get("padding_free", False),
        pad_to_multiple_of=options.get("pad_to_multiple_of"),
        gradient_checkpointing=options.get("gradient_checkpointing", True),
        torch_compile=options.get("torch_compile", False),
        # Unpacked, TRL reads the examples in tunewise's order, so both see the very same batches.
        train_sampling_strategy="random" if packing else options.get("train_sampling_strategy", "sequential"),
    )
    dataset = Dataset.from_list(spec["trl_rows"])
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[Meter()]
    )
    trainer.model.register_forward_pre_hook(meter.forward_pre_hook, with_kwargs=True)
    trainer.train()
    rate, span = _rate(meter.step_tokens, meter.clock)
    return RunResult(
        spec["name"], spec["precision"], rate, _peak_bytes(spec["device"]), span, meter.step_targets,
        [losses[s] for s in range(1, spec["steps"] + 1)], spec["load"],
        f"{rows} rows per step" + (f" in {accumulation} micro-batches" if accumulation > 1 else ""),
    )  # fmt: skip


def run_hf(spec: dict) -> RunResult:
    """HF Transformers + PEFT as most scripts use them: bf16 base, autocast, model(labels=...) (full logits).

    Micro-batches of `micro_batch` sequences (default: the whole batch), padded, or with `packing`
    flattened into one row by HF's DataCollatorWithFlattening (position ids restart per example;
    transformers then gives sdpa a block-diagonal mask). Each micro-batch's loss is a sum over the
    window's target count (`num_items_in_batch`), so accumulation gives the one-big-batch gradient.
    """
    from transformers import get_linear_schedule_with_warmup

    options = VARIANTS[spec["name"]][1]
    device, bf16 = spec["device"], spec["precision"] == "bf16"
    dtype = torch.bfloat16 if bf16 else torch.float32
    model = lora_model(Path(spec["model_dir"]), dtype, spec["lora_dropout"]).to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=0.0, fused=device == "cuda")
    scheduler = get_linear_schedule_with_warmup(optimizer, 1, spec["steps"])
    meter, losses = StepMeter(device), []
    model.register_forward_pre_hook(meter.forward_pre_hook, with_kwargs=True)
    examples, micro = spec["trl_rows"], options.get("micro_batch", spec["batch"])
    collate = _flatten if options.get("packing") else _pad
    for step in range(spec["steps"]):
        window = [examples[i] for i in spec["windows"][step]]
        items = sum(sum(t != -100 for t in e["labels"][1:]) for e in window)
        total = torch.zeros((), device=device)
        for start in range(0, len(window), micro):
            batch = collate(window[start : start + micro], spec["pad_id"], device)
            with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
                # use_cache=False: no KV cache in training (with one, transformers ignores packed position ids).
                loss = model(
                    **batch, use_cache=False, num_items_in_batch=torch.tensor(items, device=device)
                ).loss
            loss.backward()
            total += loss.detach()  # read once per step, as HF's Trainer does, not once per micro-batch
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total.item())
        meter.end_step()
    rate, span = _rate(meter.step_tokens, meter.clock)
    note = f"micro-batches of {micro}" + (", flattened" if options.get("packing") else ", padded")
    return RunResult(
        spec["name"], spec["precision"], rate, _peak_bytes(device), span, meter.step_targets, losses,
        spec["load"], note,
    )  # fmt: skip


def _pad(examples: list[dict], pad_id: int, device: str) -> dict[str, torch.Tensor]:
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id)
    labels = torch.full((len(examples), width), -100)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[row, :n], labels[row, :n], mask[row, :n] = (
            torch.tensor(e["input_ids"]),
            torch.tensor(e["labels"]),
            1,
        )
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def _flatten(examples: list[dict], pad_id: int, device: str) -> dict[str, torch.Tensor]:
    """One row from HF's own DataCollatorWithFlattening (each example's first label -100, positions restart)."""
    from transformers import DataCollatorWithFlattening

    batch = DataCollatorWithFlattening(return_position_ids=True)(examples)
    return {k: v.to(device) for k, v in batch.items()}


# ----------------------------------------------------------------------------------------- parent


def build_specs(args: argparse.Namespace, work: Path) -> tuple[list[dict], dict]:
    """One spec per (variant, precision), and what the report needs to know about the data."""
    from transformers import AutoConfig, AutoTokenizer

    model_dir = prepare_model_dir(args.device, work, args.tokenizer)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = chat_rows(args.steps * args.batch, SEED, args.min_tokens, args.max_tokens)
    encoded = encode_rows(rows, tokenizer, args.max_seq_length)
    train_file = work / "train.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lengths = [e["length"] for e in encoded]
    shape = model_shape(AutoConfig.from_pretrained(model_dir), LORA["r"])
    flops = sum(example_flops(shape, e["length"], e["num_targets"]) for e in encoded)
    nominal = sum(nominal_flops(shape, e["length"]) for e in encoded)
    trl_rows = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in encoded]
    mean_length = statistics.mean(lengths)
    specs = []
    for name in args.tools.split(","):
        tool, options = VARIANTS[name]
        micro = options.get("micro_batch", args.batch) if tool == "tunewise" else args.batch
        windows = tunewise_windows(
            lengths,
            micro,
            args.batch // micro,
            options.get("data", {}).get("group_by_length", False),
            args.steps,
        )
        ordered = [trl_rows[i] for w in windows for i in w] if tool == "trl" else trl_rows
        for precision in args.precisions.split(","):
            specs.append(
                {
                    "name": name,
                    "precision": precision,
                    "device": args.device,
                    "threads": args.threads,
                    "lora_dropout": args.lora_dropout,
                    "steps": args.steps,
                    "batch": args.batch,
                    "max_seq_length": args.max_seq_length,
                    "model_dir": str(model_dir),
                    "train_file": str(train_file),
                    "work": str(work),
                    "windows": windows,
                    "windows_tokens": [sum(lengths[i] for i in w) for w in windows],
                    "windows_targets": [sum(encoded[i]["num_targets"] for i in w) for w in windows],
                    "trl_rows": ordered,
                    "packed_rows": max(1, round(args.batch * mean_length / args.max_seq_length)),
                    "pad_id": tokenizer.pad_token_id
                    if tokenizer.pad_token_id is not None
                    else tokenizer.eos_token_id,
                }
            )
    data = {
        "examples": len(encoded),
        "lengths": sorted(lengths),
        "target_fraction": sum(e["num_targets"] for e in encoded) / sum(lengths),
        "flops_per_token": flops / sum(lengths),
        "nominal_flops_per_token": nominal / sum(lengths),
        "shape": asdict(shape),
    }
    return specs, data


def run_child(spec: dict, tag: str) -> RunResult | str:
    spec = {**spec, "tag": tag, "load": os.getloadavg()[0], "result": str(Path(spec["work"]) / f"{tag}.json")}
    spec_file = Path(spec["work"]) / f"{tag}.spec.json"
    spec_file.write_text(json.dumps(spec))
    proc = subprocess.run(
        [sys.executable, __file__, "--child", str(spec_file)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        tail = "\n    ".join(proc.stderr.strip().splitlines()[-15:])
        return f"failed (exit {proc.returncode}):\n    {tail}"
    return RunResult(**json.loads(Path(spec["result"]).read_text()))


def loss_at(result: RunResult, tokens: int) -> float:
    """Mean of the loss curve, interpolated over cumulative target tokens, on the last quarter of [0, tokens].

    Per-step losses are means over ~2,000 target tokens each and noisy; a quarter of the range
    averages about a quarter of the steps.
    """
    import numpy as np

    grid = np.linspace(0.75 * tokens, tokens, 50)
    return float(np.interp(grid, result.cum_targets, result.losses).mean())


def report(results: dict[tuple[str, str], list[RunResult]], peaks: dict[str, float], data: dict) -> str:
    runs = [r for rs in results.values() for r in rs]
    common = min(r.cum_targets[-1] for r in runs)
    lines = [
        (
            f"examples {data['examples']}, lengths {data['lengths'][0]}..{data['lengths'][-1]} "
            f"(median {statistics.median(data['lengths'])}), target fraction {data['target_fraction']:.2f}, "
            f"{data['flops_per_token'] / 1e9:.3f} GFLOP per token of required work, "
            f"{data['nominal_flops_per_token'] / 1e9:.3f} by 4N + attention"
        ),
        "peak matmul: " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peaks.items()),
        f"loss@T: T = {common} target tokens (the fewest any run trained on)",
        "",
        "| variant | precision | tokens/s | MFU (4N) | MFU (required) | peak memory | loss@T | load | runs | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    summary = {}
    for (name, precision), rs in results.items():
        rate = statistics.median(r.tokens_per_second for r in rs)
        mfu = rate * data["flops_per_token"] / peaks[precision]
        nominal_mfu = rate * data["nominal_flops_per_token"] / peaks[precision]
        peak = max(r.peak_bytes for r in rs)
        loss = statistics.mean(loss_at(r, common) for r in rs)
        summary[(name, precision)] = (rate, peak, loss)
        loads = "/".join(f"{r.load:.1f}" for r in rs)
        lines.append(
            f"| {name} | {precision} | {rate:.1f} | {nominal_mfu:.1%} | {mfu:.1%} | {peak / 2**30:.2f} GiB | {loss:.4f} | {loads} "
            f"| {len(rs)} | {rs[0].note} |"
        )
    lines += ["", *ratios(summary)]
    return "\n".join(lines)


def ratios(summary: dict[tuple[str, str], tuple[float, int, float]]) -> list[str]:
    ours = {k: v for k, v in summary.items() if k[0].startswith("tunewise")}
    theirs = {k: v for k, v in summary.items() if not k[0].startswith("tunewise")}
    if not ours or not theirs:
        return []
    best_ours = max(ours, key=lambda k: ours[k][0])
    best_theirs = max(theirs, key=lambda k: theirs[k][0])
    (r1, m1, l1), (r2, m2, l2) = ours[best_ours], theirs[best_theirs]
    return [
        f"fastest tunewise: {' '.join(best_ours)}; fastest baseline: {' '.join(best_theirs)}",
        f"tunewise/baseline: tokens/s {r1 / r2:.2f}x, peak memory {m1 / m2:.2f}x, loss@T {l1:.4f} vs {l2:.4f}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--tools", help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument(
        "--precisions",
        default=None,
        help="comma-separated fp32,bf16 (default: cpu fp32, and bf16 with AMX or AVX512_BF16; cuda bf16)",
    )
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per run")
    parser.add_argument("--batch", type=int, default=8, help="sequences per optimizer step")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of the alternating runs")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads in each run (0: torch's default)"
    )
    parser.add_argument("--min-tokens", type=int, default=None)
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--max-seq-length", type=int, default=None)
    parser.add_argument(
        "--lora-dropout", type=float, default=0.0, help="LoRA dropout (PEFT's and tunewise's default: 0)"
    )
    parser.add_argument(
        "--tokenizer",
        type=Path,
        help="CUDA: a folder with SmolLM2's tokenizer files (default: the embedded model's)",
    )
    parser.add_argument("--json", type=Path, help="also write every run's numbers here")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child_main(json.loads(args.child.read_text()))
    cpu = args.device == "cpu"
    args.tools = args.tools or DEFAULT_TOOLS[args.device]
    # Each tool's fastest precision too: bf16 on a CPU with bf16 matmuls (tunewise's `precision: auto` there).
    from tunewise.config.resolve import probe_hardware

    native = probe_hardware().bf16_supported
    args.precisions = args.precisions or (("fp32,bf16" if native else "fp32") if cpu else "bf16")
    args.min_tokens = args.min_tokens or (50 if cpu else 256)
    args.max_tokens = args.max_tokens or (500 if cpu else 2048)
    args.max_seq_length = args.max_seq_length or (512 if cpu else 2048)
    with tempfile.TemporaryDirectory(prefix="tunewise-bench-") as tmp:
        run_all(args, Path(tmp))


def run_all(args: argparse.Namespace, work: Path) -> None:
    specs, data = build_specs(args, work)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    if args.threads:
        torch.set_num_threads(args.threads)
    peaks = {p: measure_peak(args.device, dtypes[p]) for p in args.precisions.split(",")}
    results: dict[tuple[str, str], list[RunResult]] = {}
    for repeat in range(args.repeats):
        for i, spec in enumerate(specs):
            outcome = run_child(spec, f"{spec['name']}-{spec['precision']}-{repeat}")
            print(f"[{repeat + 1}/{args.repeats}] {spec['name']} {spec['precision']}: "
                  + (outcome if isinstance(outcome, str) else f"{outcome.tokens_per_second:.1f} tokens/s"), flush=True)  # fmt: skip
            if not isinstance(outcome, str):
                results.setdefault((spec["name"], spec["precision"]), []).append(outcome)
        peaks = {p: max(peaks[p], measure_peak(args.device, dtypes[p])) for p in peaks}
    print()
    print(f"device: {args.device}, torch threads: {args.threads or torch.get_num_threads()}, {args.steps} steps "
          f"x {args.batch} sequences, max_seq_length {args.max_seq_length}, repeats {args.repeats}")  # fmt: skip
    print(report(results, peaks, data))
    if args.json:
        args.json.write_text(
            json.dumps({f"{k[0]}/{k[1]}": [asdict(r) for r in v] for k, v in results.items()})
        )


if __name__ == "__main__":
    main()
