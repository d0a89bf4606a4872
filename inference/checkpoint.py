"""Checkpoint files: atomic writes, integrity checks, the newest valid one, config fingerprints.

``DIR/step-00000100.pt`` is a plain ``torch.save`` of ``{"step", "fingerprint", "config", "data_sha256",
"state"}`` (``torch.load(path, weights_only=True)`` reads it); ``step-00000100.pt.sha256`` beside it holds the
sha256 of its bytes. A file that is damaged, truncated or lacks its checksum is a :class:`CorruptCheckpointError`,
and :func:`find_latest_valid` falls back to an older one. Every write goes to a temporary file, fsynced and
renamed (checkpoint before checksum), so a crash leaves the old checkpoint or a complete new one.
:func:`check_compatible` refuses a checkpoint of another config or other data, naming what differs.
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

_NAME = re.compile(r"^step-(\d{8,})\.pt$")


class CheckpointError(ValueError):
    """A checkpoint cannot be used (base class)."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file is truncated, damaged or not a checkpoint at all."""


class IncompatibleCheckpointError(CheckpointError):
    """A checkpoint was written by a run with a different configuration."""


class NoCheckpointError(CheckpointError):
    """No valid checkpoint was found where one was expected."""


RESUMABLE_CHANGES = ("train.lr", "train.eta_lr", "train.evidence_lr")
"""Settings a resumed run may change (the optimiser's learning rates): the run goes on from the checkpoint with the
new rates, on the same cosine schedule."""


@dataclass(frozen=True)
class Checkpoint:
    """One loaded checkpoint: file, steps done, the writer's ``config`` (JSON) and its hash, the data's hash and
    the trainer's ``state`` (:func:`inference.state.capture_training_state`)."""

    path: Path
    step: int
    fingerprint: str
    config: dict
    state: dict
    data_sha256: str | None = None


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
    the side that lacks it), nested mappings compared key by key. A setting ``saved`` lacks and ``current`` leaves
    at None (an option added since, off) is no difference: runs made before it was added stay the same runs."""
    saved, current = to_jsonable(saved), to_jsonable(current)
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if a == "<absent>" and b is None:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(differing_settings(a, b, prefix=f"{prefix}{key}."))
        elif a != b:
            out.append((f"{prefix}{key}", a, b))
    return out


def optimiser_changes(saved: Mapping, current: Mapping) -> list[tuple[str, Any, Any]]:
    """The :data:`RESUMABLE_CHANGES` among the settings in which ``current`` differs from ``saved``."""
    return [d for d in differing_settings(saved, current) if d[0] in RESUMABLE_CHANGES]


def check_compatible(checkpoint: Checkpoint, config: Mapping, data_sha256: str | None = None) -> None:
    """Refuse ``checkpoint`` unless it was written with ``config`` (up to :data:`RESUMABLE_CHANGES`) and, when
    both are known, with data of hash ``data_sha256``. Settings are compared by value: a config whose hash differs
    only in how a number is written (``8`` against ``8.0``, as a grid's extent and the same flag typed) is the same.

    Raises
    ------
    IncompatibleCheckpointError
        Naming the checkpoint and the differing settings (``"model.hidden: 8 in the checkpoint, 16 now"``).
    """
    if checkpoint.fingerprint != config_fingerprint(config):
        diffs = [f"{name}: {a!r} in the checkpoint, {b!r} now" for name, a, b in
                 differing_settings(checkpoint.config, config) if name not in RESUMABLE_CHANGES]
        if diffs:
            raise IncompatibleCheckpointError(
                f"checkpoint {checkpoint.path} comes from an incompatible config ({'; '.join(diffs)}): resume with "
                f"the arguments of the original run (only {', '.join(RESUMABLE_CHANGES)} may change)")
    if data_sha256 is not None and checkpoint.data_sha256 not in (None, data_sha256):
        raise IncompatibleCheckpointError(
            f"checkpoint {checkpoint.path} was trained on other data (content sha256 {checkpoint.data_sha256[:12]}, "
            f"now {data_sha256[:12]}): resume with the data the run was trained on")


def checkpoint_path(directory: str | os.PathLike, step: int) -> Path:
    """``directory/step-<step, 8 digits>.pt``."""
    return Path(directory) / f"step-{int(step):08d}.pt"


def digest_path(path: str | os.PathLike) -> Path:
    """The checksum file beside checkpoint ``path``."""
    return Path(f"{os.fspath(path)}.sha256")


def list_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of every checkpoint file in ``directory``, oldest first (none if it is missing)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    matches = ((_NAME.match(path.name), path) for path in directory.iterdir())
    return sorted((int(match.group(1)), path) for match, path in matches if match and path.is_file())


def save_checkpoint(directory: str | os.PathLike, step: int, state: Mapping, config: Mapping, keep: int = 3,
                    data_sha256: str | None = None) -> Path:
    """Write the checkpoint of ``step`` atomically and return its path; then keep only the newest ``keep``
    ones and none of later steps (left by an attempt killed after writing them: the run is now at ``step``)."""
    if keep < 1:
        raise ValueError(f"keep must be a positive integer, got {keep}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save({"step": int(step), "fingerprint": config_fingerprint(config), "config": to_jsonable(config),
                "data_sha256": data_sha256, "state": dict(state)}, buffer)
    path = checkpoint_path(directory, step)
    atomic_write(path, buffer.getvalue())
    atomic_write(digest_path(path), hashlib.sha256(buffer.getvalue()).hexdigest().encode())
    checkpoints = list_checkpoints(directory)
    older = [path for s, path in checkpoints if s <= step]
    _remove(directory, [path for s, path in checkpoints if s > step] + older[:-keep])
    return path


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
        digest = digest_path(path).read_bytes().strip()
    except OSError as err:  # a missing checksum: the write did not finish
        raise CorruptCheckpointError(f"cannot read checkpoint {path} or its checksum: {err}") from None
    if hashlib.sha256(payload).hexdigest().encode() != digest:
        raise CorruptCheckpointError(f"checkpoint {path} is truncated or damaged (checksum mismatch)")
    try:
        record = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
        checkpoint = Checkpoint(path, int(record["step"]), str(record["fingerprint"]), dict(record["config"]),
                                dict(record["state"]), record.get("data_sha256"))
    except Exception as err:  # noqa: BLE001 - the unpickler raises many types on a bad payload
        raise CorruptCheckpointError(f"checkpoint {path} does not load: {type(err).__name__}: {err}") from None
    match = _NAME.match(path.name)
    if match and int(match.group(1)) != checkpoint.step:
        raise CorruptCheckpointError(f"checkpoint {path} holds step {checkpoint.step}, not the one in its name")
    return checkpoint


def find_latest_valid(directory: str | os.PathLike) -> tuple[Checkpoint | None, list[CorruptCheckpointError]]:
    """The newest checkpoint in ``directory`` that loads (None if none does), and the errors of the newer ones
    skipped, newest first."""
    skipped: list[CorruptCheckpointError] = []
    for _, path in reversed(list_checkpoints(directory)):
        try:
            return load_checkpoint(path), skipped
        except CorruptCheckpointError as err:
            skipped.append(err)
    return None, skipped


def latest_checkpoint(directory: str | os.PathLike) -> tuple[Checkpoint, list[CorruptCheckpointError]]:
    """:func:`find_latest_valid`, where finding none is a :class:`NoCheckpointError`."""
    checkpoint, skipped = find_latest_valid(directory)
    if checkpoint is None:
        reason = f" ({len(skipped)} corrupt, newest: {skipped[0]})" if skipped else ""
        raise NoCheckpointError(f"no valid checkpoint in {directory}{reason}")
    return checkpoint, skipped


def _remove(directory: Path, paths: list[Path]) -> None:
    """Remove checkpoints, each checksum first (a checkpoint without one is never used), and the temporary
    files of writes that never finished."""
    for path in paths:
        digest_path(path).unlink(missing_ok=True)
        path.unlink(missing_ok=True)
    if directory.is_dir():
        for path in directory.glob(".step-*.tmp"):
            path.unlink(missing_ok=True)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old file or the new one, never half of one."""
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
    with contextlib.suppress(OSError):  # make the rename durable; not every platform can open a directory
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
