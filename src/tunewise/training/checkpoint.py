"""Atomic, verifiable, exactly-resumable training checkpoints.

``save_checkpoint(output_dir, step, ...)`` writes::

    output_dir/
      checkpoint-<step>/
        model.safetensors        model or adapter weights (file name set by ``weights_name``)
        optimizer.json           optimizer state_dict, each tensor replaced by {"__tensor__": key}
        optimizer.safetensors    those tensors under flat keys such as ``state.3.exp_avg``
        scheduler.json           LR scheduler state_dict (+ scheduler.safetensors if it holds tensors)
        scaler.json              loss-scaler state_dict, only when one is given
        rng.json                 python ``random`` and numpy RNG states
        rng.safetensors          torch CPU (and CUDA) RNG states as uint8 tensors
        trainer_state.json       the caller's counters, data position, early-stopping state
        config.yaml              the resolved config, as given
        <extra files>            e.g. adapter_config.json
        manifest.json            written last: size + sha256 of every file above, step, format and library versions

Only JSON and safetensors are written, so loading never unpickles anything. What JSON cannot say directly
is kept with three one-key markers: ``{"__tensor__": key}``, ``{"__tuple__": [...]}`` and
``{"__items__": [[key, value], ...]}`` (a dict whose keys are not all strings, e.g. optimizer param indices).

A save writes into ``output_dir/.tmp-checkpoint-<step>-<pid>``, fsyncs every file, writes the manifest last,
renames the folder to ``checkpoint-<step>`` and fsyncs ``output_dir``: a crash at any moment leaves no
half-written ``checkpoint-<step>``. A folder being replaced (same step saved again) is first renamed to
``.tmp-replaced-<step>-<pid>``, one removed by rotation to ``.tmp-deleted-<step>-<pid>``. The next save cleans up
the leftovers of a crashed one (its pid no longer running); ``find_latest_valid`` and the next save put a
replaced folder back if its successor never landed. Saves within one process must run one at a time.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import platform
import random
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

logger = logging.getLogger("tunewise")

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CONFIG = "config.yaml"
_STATES = ("optimizer", "scheduler", "scaler", "rng", "trainer_state")
_REQUIRED = ("rng.json", "trainer_state.json", CONFIG)
_CHECKPOINT_NAME = re.compile(r"checkpoint-(0|[1-9][0-9]*)")
_LEFTOVER_NAME = re.compile(r"\.tmp-(checkpoint|replaced|deleted)-([0-9]+)-([0-9]+)")
_TENSOR, _TUPLE, _ITEMS = "__tensor__", "__tuple__", "__items__"
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved or loaded; the message says why and what to do."""


@dataclass(frozen=True)
class Checkpoint:
    """A verified checkpoint loaded to CPU; the caller moves tensors and calls each ``load_state_dict``."""

    path: Path
    step: int
    model_tensors: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any] | None
    scheduler_state: dict[str, Any] | None
    scaler_state: dict[str, Any] | None
    rng_state: dict[str, Any]
    """Pass to ``restore_rng_state`` once everything that consumes randomness at startup has been built."""
    trainer_state: dict[str, Any]
    config_yaml: str
    versions: dict[str, str]
    """Versions of python, torch, transformers, peft, ... that wrote the checkpoint."""


@dataclass(frozen=True)
class LatestCheckpoint:
    """The outcome of ``find_latest_valid``."""

    path: Path | None
    """The newest checkpoint that verifies, or None when there is none."""
    skipped: dict[Path, list[str]]
    """Newer checkpoints that failed verification, with their problems."""


# ---------------------------------------------------------------------------------------------- saving


def save_checkpoint(
    output_dir: Path,
    step: int,
    *,
    model_tensors: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any] | None,
    scheduler_state: dict[str, Any] | None,
    trainer_state: dict[str, Any],
    config_yaml: str,
    scaler_state: dict[str, Any] | None = None,
    save_total_limit: int | None = None,
    keep: set[Path] | None = None,
    extra_files: dict[str, bytes] | None = None,
    weights_name: str = "model.safetensors",
) -> Path:
    """Atomically write ``output_dir/checkpoint-<step>`` (RNG states are captured now) and return its path.

    With ``save_total_limit``, the oldest checkpoints beyond the limit are deleted once the new one is in
    place, never the new one nor any in ``keep`` (e.g. the best so far).
    """
    extra_files = extra_files or {}
    _check_save_args(step, save_total_limit, weights_name, extra_files)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(output_dir)
    states = {
        "optimizer": optimizer_state,
        "scheduler": scheduler_state,
        "scaler": scaler_state,
        "rng": capture_rng_state(),
        "trainer_state": trainer_state,
    }
    files = _checkpoint_files(model_tensors, weights_name, states, config_yaml, extra_files)
    temporary = output_dir / f".tmp-checkpoint-{step}-{os.getpid()}"
    try:
        _write_folder(temporary, files, step, weights_name)
    except BaseException as error:
        shutil.rmtree(temporary, ignore_errors=True)
        if isinstance(error, OSError) and error.errno in _DISK_FULL:
            raise CheckpointError(_disk_full_message(output_dir, step)) from error
        raise
    final = _move_into_place(temporary, output_dir / f"checkpoint-{step}", step)
    if save_total_limit is not None:
        _rotate(output_dir, save_total_limit, keep or set(), final)
    return final


def _check_save_args(
    step: int, save_total_limit: int | None, weights_name: str, extra_files: dict[str, bytes]
) -> None:
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}.")
    if save_total_limit is not None and save_total_limit < 1:
        raise ValueError(
            f"save_total_limit must be at least 1 (or None to keep every checkpoint), got {save_total_limit}."
        )
    if not (_is_plain_name(weights_name) and weights_name.endswith(".safetensors")):
        raise ValueError(
            f"weights_name must be a plain file name ending in .safetensors, got {weights_name!r}."
        )
    reserved = {weights_name, MANIFEST, CONFIG} | {
        f"{s}.{e}" for s in _STATES for e in ("json", "safetensors")
    }
    for name in extra_files:
        if not _is_plain_name(name) or name in reserved:
            raise ValueError(
                f"extra_files name {name!r} is not allowed: use a plain file name (no folders) "
                f"other than {', '.join(sorted(reserved))}."
            )


def _checkpoint_files(
    model_tensors: dict[str, torch.Tensor],
    weights_name: str,
    states: dict[str, dict[str, Any] | None],
    config_yaml: str,
    extra_files: dict[str, bytes],
) -> Iterator[tuple[str, bytes]]:
    """Yield (file name, contents) one file at a time, so only one file's bytes are in memory at once."""
    yield weights_name, _safetensors_bytes(model_tensors)
    for name, state in states.items():
        if state is None:
            continue
        tensors: dict[str, torch.Tensor] = {}
        skeleton = _encode(state, "", tensors, name)
        yield f"{name}.json", _json_bytes(skeleton)
        if tensors:
            yield f"{name}.safetensors", _safetensors_bytes(tensors)
    yield CONFIG, config_yaml.encode("utf-8")
    yield from extra_files.items()


def _write_folder(folder: Path, files: Iterator[tuple[str, bytes]], step: int, weights_name: str) -> None:
    folder.mkdir()
    entries = {}
    for name, data in files:
        _write_file(folder / name, data)
        entries[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "weights_name": weights_name,
        "versions": _library_versions(),
        "files": entries,
    }
    _write_file(folder / MANIFEST, _json_bytes(manifest))
    _fsync_dir(folder)


def _write_file(path: Path, data: bytes) -> None:
    """Write and fsync one file. Every byte of a checkpoint goes through here (tests inject disk-full)."""
    with open(path, "xb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


def _fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _move_into_place(temporary: Path, final: Path, step: int) -> Path:
    replaced = final.with_name(f".tmp-replaced-{step}-{os.getpid()}")
    replacing = final.exists()
    if replacing:  # directories cannot be renamed over each other: move the old one aside first
        final.rename(replaced)
    temporary.rename(final)
    _fsync_dir(final.parent)
    if replacing:
        _remove_folder(replaced)
    return final


def _rotate(output_dir: Path, limit: int, keep: set[Path], newest: Path) -> None:
    protected = {path.resolve() for path in keep} | {newest.resolve()}
    checkpoints = list_checkpoints(output_dir)
    removable = [path for path in checkpoints if path.resolve() not in protected]
    for path in removable[: max(0, len(checkpoints) - limit)]:
        logger.info("Deleting %s (save_total_limit=%d)", path, limit)
        doomed = path.with_name(f".tmp-deleted-{checkpoint_step(path)}-{os.getpid()}")
        path.rename(doomed)  # a crash mid-delete must not leave a half-deleted checkpoint-<step>
        _remove_folder(doomed)


def _disk_full_message(output_dir: Path, step: int) -> str:
    try:
        free_bytes = shutil.disk_usage(output_dir).free
        free = f"free space left: {free_bytes} bytes ({free_bytes / 2**30:.2f} GiB)"
    except OSError:
        free = "free space left: unknown"
    return (
        f"The disk is full (or your disk quota is used up): saving checkpoint-{step} into {output_dir} failed, "
        f"{free}. Nothing was written and earlier checkpoints are intact. Free some space, lower "
        "save_total_limit, or point output_dir at a disk with more room."
    )


# ------------------------------------------------------------------------------------- JSON + tensors


def _encode(value: Any, key: str, tensors: dict[str, torch.Tensor], owner: str) -> Any:
    """Turn a state_dict into JSON, moving each tensor into ``tensors`` under a flat dotted key."""
    if isinstance(value, torch.Tensor):
        while key in tensors:  # dotted keys of different paths can collide ("a.b" vs a -> b)
            key += "_"
        tensors[key] = value
        return {_TENSOR: key}
    if isinstance(value, dict):
        keys = list(value)
        if all(isinstance(k, str) for k in keys) and not (
            len(keys) == 1 and keys[0] in (_TENSOR, _TUPLE, _ITEMS)
        ):
            return {k: _encode(v, _join(key, k), tensors, owner) for k, v in value.items()}
        for k in keys:
            if not (k is None or isinstance(k, (str, int, float))):
                raise _unsupported(k, _join(key, str(k)), owner, "dict key")
        return {_ITEMS: [[k, _encode(v, _join(key, k), tensors, owner)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        items = [_encode(v, _join(key, i), tensors, owner) for i, v in enumerate(value)]
        return {_TUPLE: items} if isinstance(value, tuple) else items
    if value is None or isinstance(value, (str, int, float)):
        return value
    raise _unsupported(value, key, owner, "value")


def _join(key: str, part: object) -> str:
    return f"{key}.{part}" if key else str(part)


def _unsupported(value: object, key: str, owner: str, what: str) -> CheckpointError:
    return CheckpointError(
        f"Cannot save {owner}: the {what} at '{key or '<top level>'}' is a {type(value).__name__}. "
        "Checkpoints hold only tensors and JSON values (dict, list, tuple, str, int, float, bool, None) so that "
        "loading never runs pickled code; convert it to one of those before saving."
    )


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        ((tag, inner),) = value.items()
        if tag == _TENSOR:
            return tensors[inner]
        if tag == _TUPLE:
            return tuple(_decode(v, tensors) for v in inner)
        if tag == _ITEMS:
            return {k: _decode(v, tensors) for k, v in inner}
    return {k: _decode(v, tensors) for k, v in value.items()}


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value, indent=2).encode("utf-8")


def _safetensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    owned: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for name, tensor in tensors.items():
        tensor = tensor.detach().to("cpu").contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if storage in storages:  # safetensors refuses tensors that share memory (tied embeddings, views)
            tensor = tensor.clone()
        storages.add(storage)
        owned[name] = tensor
    return safetensors_bytes(owned, metadata={"format": "pt"})


# --------------------------------------------------------------------------------------------- RNG


def capture_rng_state() -> dict[str, Any]:
    """The states of python ``random``, numpy, torch CPU and (when available) every CUDA device."""
    numpy_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": numpy_state["bit_generator"],
            "state": {"key": numpy_state["state"]["key"].tolist(), "pos": int(numpy_state["state"]["pos"])},
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "torch_cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put back what ``capture_rng_state`` returned, so random draws continue exactly."""
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    key = np.asarray(numpy_state["state"]["key"], dtype=np.uint32)
    np.random.set_state({**numpy_state, "state": {**numpy_state["state"], "key": key}})
    torch.set_rng_state(state["torch_cpu"])
    cuda_states = state.get("torch_cuda", [])
    device_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if len(cuda_states) != device_count and cuda_states:
        logger.warning(
            "The checkpoint holds RNG states for %d CUDA devices but %d are visible; "
            "GPU random numbers will not continue exactly.",
            len(cuda_states),
            device_count,
        )
    if device_count and cuda_states:
        torch.cuda.set_rng_state_all(cuda_states[:device_count])


# ---------------------------------------------------------------------------------- finding, loading


def checkpoint_step(path: Path) -> int:
    """The step in a ``checkpoint-<step>`` folder name."""
    match = _CHECKPOINT_NAME.fullmatch(Path(path).name)
    if match is None:
        raise ValueError(f"{path} is not a checkpoint folder: its name must be checkpoint-<step>.")
    return int(match[1])


def is_checkpoint_name(name: str) -> bool:
    """Whether ``name`` is a checkpoint folder's: ``checkpoint-<step>``."""
    return _CHECKPOINT_NAME.fullmatch(name) is not None


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Every ``checkpoint-<step>`` folder in ``output_dir``, oldest step first (valid or not)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if is_checkpoint_name(p.name) and p.is_dir()]
    return sorted(found, key=checkpoint_step)


def verify_checkpoint(path: Path) -> list[str]:
    """Problems found checking every file against the manifest; empty when the checkpoint is valid."""
    path = Path(path)
    try:
        manifest = _read_manifest(path)
    except CheckpointError as error:
        return [str(error)]
    files = manifest["files"]
    required = (manifest["weights_name"], *_REQUIRED)
    problems = [f"{name}: not listed in {MANIFEST}" for name in required if name not in files]
    for name, entry in files.items():
        problem = _verify_file(path, name, entry)
        if problem:
            problems.append(problem)
    return problems


def find_latest_valid(output_dir: Path) -> LatestCheckpoint:
    """The newest checkpoint that verifies; newer damaged ones are skipped, reported and logged as warnings.

    First puts back any checkpoint that a crashed save had moved aside to replace it.
    """
    output_dir = Path(output_dir)
    if output_dir.is_dir():
        _restore_replaced(output_dir)
    skipped: dict[Path, list[str]] = {}
    for path in reversed(list_checkpoints(output_dir)):
        problems = verify_checkpoint(path)
        if not problems:
            return LatestCheckpoint(path, skipped)
        logger.warning("Skipping damaged checkpoint %s: %s", path, "; ".join(problems))
        skipped[path] = problems
    return LatestCheckpoint(None, skipped)


def load_checkpoint(path: Path) -> Checkpoint:
    """Verify ``path`` against its manifest, then load everything to CPU; raises CheckpointError if damaged."""
    path = Path(path)
    problems = verify_checkpoint(path)
    if problems:
        raise CheckpointError(
            f"Checkpoint {path} is damaged and was not loaded: {'; '.join(problems)}. Resume from an older "
            "checkpoint (find_latest_valid picks the newest valid one) or delete this folder."
        )
    manifest = _read_manifest(path)
    files = manifest["files"]
    return Checkpoint(
        path=path,
        step=manifest["step"],
        model_tensors=load_file(path / manifest["weights_name"]),
        optimizer_state=_load_state(path, "optimizer", files),
        scheduler_state=_load_state(path, "scheduler", files),
        scaler_state=_load_state(path, "scaler", files),
        rng_state=_load_state(path, "rng", files),
        trainer_state=_load_state(path, "trainer_state", files),
        config_yaml=(path / CONFIG).read_text(encoding="utf-8"),
        versions=manifest["versions"],
    )


def _load_state(folder: Path, name: str, files: dict[str, Any]) -> Any:
    if f"{name}.json" not in files:
        return None
    tensors = load_file(folder / f"{name}.safetensors") if f"{name}.safetensors" in files else {}
    return _decode(json.loads((folder / f"{name}.json").read_bytes()), tensors)


def _read_manifest(folder: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((folder / MANIFEST).read_bytes())
    except FileNotFoundError:
        raise CheckpointError(f"{MANIFEST}: missing (the save did not finish)") from None
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{MANIFEST}: unreadable ({error})") from None
    if not _is_well_formed(manifest):
        raise CheckpointError(f"{MANIFEST}: malformed (not written by tunewise, or edited by hand)")
    if manifest["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"{MANIFEST}: format version {manifest['format_version']} is newer than this tunewise reads "
            f"({FORMAT_VERSION}); upgrade tunewise to load it."
        )
    return manifest


def _is_well_formed(manifest: Any) -> bool:
    try:
        return (
            isinstance(manifest["format_version"], int)
            and isinstance(manifest["step"], int)
            and isinstance(manifest["weights_name"], str)
            and isinstance(manifest["versions"], dict)
            and all(
                _is_plain_name(name) and isinstance(entry["size"], int) and isinstance(entry["sha256"], str)
                for name, entry in manifest["files"].items()
            )
        )
    except (KeyError, TypeError, AttributeError):
        return False


def _verify_file(folder: Path, name: str, entry: dict[str, Any]) -> str | None:
    try:
        size = (folder / name).stat().st_size
        if size != entry["size"]:
            return f"{name}: {size} bytes, but {MANIFEST} says {entry['size']}"
        with open(folder / name, "rb") as file:
            digest = hashlib.file_digest(file, "sha256").hexdigest()
    except FileNotFoundError:
        return f"{name}: missing"
    except OSError as error:
        return f"{name}: unreadable ({error.strerror})"
    if digest != entry["sha256"]:
        return f"{name}: contents differ from what was saved (sha256 mismatch)"
    return None


# ---------------------------------------------------------------------------------------- leftovers


def stale_leftovers(output_dir: Path) -> Iterator[tuple[str, int, Path]]:
    """(kind, step, path) of each .tmp-* folder whose saving process is gone."""
    for path in output_dir.iterdir():
        match = _LEFTOVER_NAME.fullmatch(path.name)
        if match and not _is_running(int(match[3])):
            yield match[1], int(match[2]), path


def _is_running(pid: int) -> bool:
    # Our own pid counts as gone: saves in one process run one at a time, and a container restart
    # often hands the new trainer the pid of the crashed one.
    if pid == os.getpid():
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def _restore_replaced(output_dir: Path) -> None:
    for kind, step, path in list(stale_leftovers(output_dir)):
        final = output_dir / f"checkpoint-{step}"
        if kind == "replaced" and not final.exists():
            path.rename(final)
            logger.warning(
                "Put back %s: the save replacing it crashed before the new copy was in place.", final
            )


def _remove_leftovers(output_dir: Path) -> None:
    _restore_replaced(output_dir)
    for _, _, path in list(stale_leftovers(output_dir)):
        logger.info("Removing %s, left over by a save that crashed", path)
        _remove_folder(path)


def _remove_folder(path: Path) -> None:
    try:
        shutil.rmtree(path)
    except OSError as error:
        logger.warning("Could not delete %s (%s); delete it by hand to free the space.", path, error)


# -------------------------------------------------------------------------------------------- misc


def _is_plain_name(name: str) -> bool:
    return name not in ("", ".", "..") and Path(name).name == name and "\\" not in name


def _library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("transformers", "peft", "accelerate", "safetensors", "numpy", "tunewise"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions
