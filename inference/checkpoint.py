"""Training checkpoints on disk: atomic writes, integrity checks, the newest valid one, config fingerprints.

A checkpoint directory holds files ``step-00000100.pt``, one per saved step, each a plain ``torch.save`` of
``{"step", "fingerprint", "config", "state"}``: ``state`` is what the trainer hands over (``state_dict()``s,
tensors, numbers, strings, lists, dicts), so ``torch.load(path, weights_only=True)`` reads a checkpoint as a
plain dict. Beside each, ``step-00000100.pt.sha256`` holds the sha256 of its bytes: a truncated or damaged
file, or one whose checksum was never written, is a :class:`CorruptCheckpointError` before anything is
unpickled, and :func:`find_latest_valid` falls back to the previous checkpoint.

Files are written to a temporary file in the same directory, flushed, fsynced and moved into place
with ``os.replace``, the checkpoint before its checksum, so a crash leaves either the old checkpoint or a
complete new one, never half of one.

``config`` is the JSON form of everything that determines the training trajectory; its hash is the
fingerprint. :func:`check_compatible` refuses a checkpoint whose fingerprint differs from the
current run's and names the settings that differ.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import hashlib
import io
import json
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_DIRNAME = "checkpoints"
"""Sub-folder of a run's output directory that holds its checkpoints."""

DIGEST_SUFFIX = ".sha256"
"""The checksum file beside each checkpoint: ``step-00000100.pt.sha256``."""
_NAME = re.compile(r"^step-(\d{8,})\.pt$")


class CheckpointError(ValueError):
    """A checkpoint cannot be used (base class)."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file is truncated, damaged or not a checkpoint at all."""


class IncompatibleCheckpointError(CheckpointError):
    """A checkpoint was written by a run with a different configuration."""


class NoCheckpointError(CheckpointError):
    """No valid checkpoint was found where one was expected."""


@dataclass(frozen=True)
class Checkpoint:
    """One loaded checkpoint.

    Attributes
    ----------
    path : Path
        The file it was read from.
    step : int
        Training steps completed when it was written.
    fingerprint : str
        Hash of ``config``.
    config : dict
        JSON form of the configuration that wrote it.
    state : dict
        The trainer's state (see :func:`inference.state.capture_training_state`).
    """

    path: Path
    step: int
    fingerprint: str
    config: dict
    state: dict


# --------------------------------------------------------------------------- fingerprints
def to_jsonable(obj: Any) -> Any:
    """Plain JSON types for configs: dataclasses as dicts, Enums as values, tuples as lists, paths as str."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    if isinstance(obj, enum.Enum):
        return to_jsonable(obj.value)
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot put {type(obj).__name__} into a checkpoint config")


def config_fingerprint(config: Mapping) -> str:
    """Short sha256 of the canonical JSON of ``config`` (key order does not matter)."""
    text = json.dumps(to_jsonable(config), sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def differing_settings(saved: Mapping, current: Mapping, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted key, saved value, current value)`` for every setting whose JSON values differ ("<absent>" on
    the side that lacks it), nested mappings compared key by key."""
    saved, current = to_jsonable(saved), to_jsonable(current)
    out = []
    for key in sorted(set(saved) | set(current)):
        name = f"{prefix}{key}"
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(differing_settings(a, b, prefix=f"{name}."))
        elif a != b:
            out.append((name, a, b))
    return out


def config_differences(saved: Mapping, current: Mapping) -> list[str]:
    """Dotted keys whose values differ, as ``"train.lr: 0.001 in the checkpoint, 0.01 now"``."""
    return [f"{name}: {a!r} in the checkpoint, {b!r} now" for name, a, b in differing_settings(saved, current)]


def check_compatible(checkpoint: Checkpoint, config: Mapping) -> None:
    """Refuse ``checkpoint`` unless it was written with ``config``.

    Raises
    ------
    IncompatibleCheckpointError
        Naming the checkpoint and the differing settings.
    """
    if checkpoint.fingerprint == config_fingerprint(config):
        return
    diffs = config_differences(checkpoint.config, config) or ["the fingerprints differ"]
    raise IncompatibleCheckpointError(
        f"checkpoint {checkpoint.path} comes from an incompatible config ({'; '.join(diffs)}): "
        "resume with the arguments of the original run"
    )


# --------------------------------------------------------------------------- files
def checkpoint_path(directory: str | os.PathLike, step: int) -> Path:
    """``directory/step-<step, 8 digits>.pt``."""
    return Path(directory) / f"step-{int(step):08d}.pt"


def list_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of every checkpoint file in ``directory``, oldest first (none if it is missing)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = _NAME.match(path.name)
        if match and path.is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def save_checkpoint(
    directory: str | os.PathLike, step: int, state: Mapping, config: Mapping, keep: int = 3
) -> Path:
    """Write the checkpoint of ``step`` atomically, then keep only the newest ``keep`` ones.

    Checkpoints of later steps (left by an attempt that was killed after writing them) are removed
    too: the run is now at ``step``.

    Returns
    -------
    Path
        The file written.
    """
    if keep < 1:
        raise ValueError(f"keep must be a positive integer, got {keep}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    record = {"step": int(step), "fingerprint": config_fingerprint(config), "config": to_jsonable(config),
              "state": dict(state)}
    torch.save(record, buffer)
    payload = buffer.getvalue()
    path = checkpoint_path(directory, step)
    _atomic_write(path, payload)
    _atomic_write(digest_path(path), hashlib.sha256(payload).hexdigest().encode())
    _prune(directory, step, keep)
    return path


def digest_path(path: str | os.PathLike) -> Path:
    """The checksum file beside checkpoint ``path``."""
    return Path(f"{os.fspath(path)}{DIGEST_SUFFIX}")


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read and verify one checkpoint file (tensors land on the CPU).

    Raises
    ------
    CorruptCheckpointError
        When the file cannot be read, is truncated, fails its checksum or does not unpickle.
    """
    path = Path(path)
    try:
        payload = path.read_bytes()
    except OSError as err:
        raise CorruptCheckpointError(f"cannot read checkpoint {path}: {err}") from None
    try:
        digest = digest_path(path).read_bytes().strip()
    except OSError:
        raise CorruptCheckpointError(f"checkpoint {path} has no checksum beside it (its write did not finish)"
                                     ) from None
    if hashlib.sha256(payload).hexdigest().encode() != digest:
        raise CorruptCheckpointError(f"checkpoint {path} is truncated or damaged (checksum mismatch)")
    try:
        record = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
        checkpoint = Checkpoint(path, int(record["step"]), str(record["fingerprint"]), dict(record["config"]),
                                dict(record["state"]))
    except Exception as err:  # noqa: BLE001 - the unpickler raises many types on a bad payload
        raise CorruptCheckpointError(f"checkpoint {path} does not load: {type(err).__name__}: {err}") from None
    match = _NAME.match(path.name)
    if match and int(match.group(1)) != checkpoint.step:
        raise CorruptCheckpointError(f"checkpoint {path} holds step {checkpoint.step}, not the one in its name")
    return checkpoint


def find_latest_valid(directory: str | os.PathLike) -> tuple[Checkpoint | None, list[CorruptCheckpointError]]:
    """The newest checkpoint in ``directory`` that loads, and the errors of newer ones that did not.

    Returns
    -------
    (Checkpoint or None, list of CorruptCheckpointError)
        ``None`` when no checkpoint loads; the list holds one error per skipped file, newest first.
    """
    skipped: list[CorruptCheckpointError] = []
    for _, path in reversed(list_checkpoints(directory)):
        try:
            return load_checkpoint(path), skipped
        except CorruptCheckpointError as err:
            skipped.append(err)
    return None, skipped


def remove_checkpoints(directory: str | os.PathLike) -> int:
    """Delete every checkpoint file (and leftover temporary file) in ``directory``; returns how many."""
    removed = 0
    for _, path in list_checkpoints(directory):
        _unlink(path)
        removed += 1
    for path in _temporary_files(Path(directory)):
        path.unlink(missing_ok=True)
    return removed


def _unlink(path: Path) -> None:
    """Remove a checkpoint, its checksum first (a checkpoint without one is never used)."""
    digest_path(path).unlink(missing_ok=True)
    path.unlink(missing_ok=True)


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    """Make the rename durable; not every platform can open a directory, which is fine."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temporary_files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return [p for p in directory.iterdir() if p.name.startswith(".step-") and p.name.endswith(".tmp")]


def _prune(directory: Path, step: int, keep: int) -> None:
    checkpoints = list_checkpoints(directory)
    stale = [path for s, path in checkpoints if s > step]
    older = [path for s, path in checkpoints if s <= step]
    for path in stale + older[:-keep]:
        _unlink(path)
    for path in _temporary_files(directory):  # left by a process killed while writing
        path.unlink(missing_ok=True)
