"""Rebuild a finished training run (model, guide, fitted parameters, data) from its output directory.

A run directory written by ``python -m inference.train`` holds ``metrics.json`` (with the full config),
``eta_history.csv`` and ``checkpoints/step-*.pt``. :func:`load_run` rebuilds the model and the guide
from the config, runs the guides once so that lazily created autoguide parameters exist (as
:func:`inference.svi.restore_training_state` does when resuming) and loads the ``state_dict``s of the
newest valid checkpoint into them. Parameters live in their modules, so several runs can be loaded and
used side by side.

Runs written before checkpoints existed cannot be rebuilt: :func:`load_run` then raises a
:class:`RunError` with a one-line message.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from guides.factory import GuideKind, make_evidence_guide, make_guide
from inference.checkpoint import (
    CHECKPOINT_DIRNAME,
    Checkpoint,
    IncompatibleCheckpointError,
    find_latest_valid,
    to_jsonable,
)
from inference.data import DataConfig, DatasetName, Datasets, load_datasets, pixels_per_unit, resolve_data_dir
from inference.eta_objectives import EtaObjective
from inference.svi import TrainConfig, load_modules
from models.config import ModelConfig
from models.network import InvariantNet
from models.transforms import GENERATOR_NAMES


class RunError(ValueError):
    """A run directory cannot be diagnosed (missing, unfinished, without checkpoints, inconsistent)."""


@dataclass
class LoadedRun:
    """A fitted model and guide rebuilt from a run directory.

    Attributes
    ----------
    run_dir : Path
        The run's output directory.
    metrics : dict
        Contents of ``metrics.json``; ``metrics["config"]`` is the full config of the run.
    model_config : ModelConfig
    data_config : DataConfig
    train_config : TrainConfig
    guide_kind : GuideKind
    model : InvariantNet
        On the CPU (or the requested device), with ``eta`` restored when it is a ``pyro.param``.
    guide : callable
        From :func:`guides.make_guide`, its parameters restored from ``checkpoint``.
    checkpoint : Checkpoint
        The newest valid checkpoint; ``checkpoint.state["losses"]`` is -ELBO / N per step.
    """

    run_dir: Path
    metrics: dict
    model_config: ModelConfig
    data_config: DataConfig
    train_config: TrainConfig
    guide_kind: GuideKind
    model: InvariantNet
    guide: Callable
    checkpoint: Checkpoint

    @property
    def name(self) -> str:
        """The directory name, used as the model's name in comparisons."""
        return self.run_dir.name

    @property
    def losses(self) -> list[float]:
        """-ELBO / N per training step (minibatch estimates), from the checkpoint."""
        return [float(v) for v in self.checkpoint.state.get("losses", [])]


def _known_fields(cls: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` restricted to the fields of dataclass ``cls`` (older/newer configs may carry others)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in values.items() if k in names}


def read_metrics(run_dir: str | Path) -> dict:
    """``run_dir/metrics.json`` as a dict.

    Raises
    ------
    RunError
        When the directory or the file is missing (an unfinished run) or the file is not JSON.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"run directory {run_dir} does not exist")
    path = run_dir / "metrics.json"
    if not path.is_file():
        raise RunError(f"{run_dir} has no metrics.json: not a finished run of inference.train")
    try:
        metrics = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise RunError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(metrics, dict) or "config" not in metrics:
        raise RunError(f"{path} holds no 'config': written by an older inference.train, cannot rebuild the run")
    return metrics


IMPLEMENTATION_ONLY = ("warp_impl",)
"""Model settings that choose how, not what, the network computes; a value this code no longer knows
(a run from an earlier version) falls back to the current default."""


def model_config_from(values: Mapping[str, Any]) -> ModelConfig:
    """``ModelConfig`` from its JSON form, ignoring unknown keys and unknown implementation-only values."""
    fields = _known_fields(ModelConfig, values)
    try:
        return ModelConfig(**fields)
    except ValueError:
        reduced = {k: v for k, v in fields.items() if k not in IMPLEMENTATION_ONLY}
        if reduced == fields:
            raise
        return ModelConfig(**reduced)


def configs_from_metrics(metrics: Mapping) -> tuple[ModelConfig, DataConfig, TrainConfig, GuideKind, dict]:
    """The typed configs of a run from ``metrics["config"]``, and the guide settings (kind, init_scale, init_loc)."""
    config = metrics["config"]
    model_cfg = model_config_from(config["model"])
    data_cfg = DataConfig(**_known_fields(DataConfig, config["data"]))
    train_cfg = TrainConfig(**_known_fields(TrainConfig, config["train"]))
    guide = dict(config["guide"])
    return model_cfg, data_cfg, train_cfg, GuideKind(guide["kind"]), guide


def shared_differences(saved: Mapping, current: Mapping, prefix: str = "") -> list[str]:
    """Dotted keys present in both configs whose values differ.

    Keys present on one side only are ignored: checkpoints written by older code lack settings
    added since (which then had their defaults).
    """
    saved, current = to_jsonable(saved), to_jsonable(current)
    out = []
    for key in sorted(set(saved) & set(current)):
        a, b = saved[key], current[key]
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(shared_differences(a, b, prefix=f"{prefix}{key}."))
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} in the checkpoint, {b!r} in metrics.json")
    return out


def newest_checkpoint(run_dir: Path) -> Checkpoint:
    """The newest checkpoint of ``run_dir`` that loads.

    Raises
    ------
    RunError
        When there is no ``checkpoints/`` folder (runs made before checkpointing existed) or no valid file.
    """
    folder = run_dir / CHECKPOINT_DIRNAME
    if not folder.is_dir():
        raise RunError(f"{run_dir} has no {CHECKPOINT_DIRNAME}/ folder (the run predates checkpoints, so its "
                       "fitted parameters were not saved): train it again with inference.train to diagnose it")
    checkpoint, skipped = find_latest_valid(folder)
    if checkpoint is None:
        reason = f" ({len(skipped)} corrupt, newest: {skipped[0]})" if skipped else ""
        raise RunError(f"no valid checkpoint in {folder}{reason}")
    return checkpoint


def load_run(run_dir: str | Path, device: str | torch.device = "cpu") -> LoadedRun:
    """Rebuild the fitted model and guide of a finished run.

    Parameters
    ----------
    run_dir : str or Path
        Output directory of ``python -m inference.train``.
    device : str or torch.device
        Where to put the model and parameters (CPU by default, whatever the run trained on).

    Returns
    -------
    LoadedRun
        The model and guide hold the run's parameters.

    Raises
    ------
    RunError
        Missing or unfinished run, no checkpoints, a checkpoint from another configuration.
    """
    run_dir = Path(run_dir)
    metrics = read_metrics(run_dir)
    try:
        model_cfg, data_cfg, train_cfg, kind, guide_settings = configs_from_metrics(metrics)
    except (KeyError, TypeError, ValueError) as err:
        raise RunError(f"{run_dir / 'metrics.json'} holds an unusable config ({type(err).__name__}: {err})") from None
    checkpoint = newest_checkpoint(run_dir)
    num_data = int(checkpoint.config.get("num_data", metrics.get("data", {}).get("train_size", 0)))
    config = metrics["config"]  # compared as written: both come from the same code version
    recorded = {"model": config["model"], "train": config["train"], "num_data": num_data, "data": config["data"],
                "guide": guide_settings, "device": config.get("device", "cpu")}
    diffs = shared_differences(checkpoint.config, recorded)
    if diffs:
        raise RunError(f"metrics.json and the newest checkpoint of {run_dir} come from different runs "
                       f"({'; '.join(diffs[:3])}): is the run being re-created?")
    model = InvariantNet(model_cfg, num_data=num_data).to(device)  # its RFF buffers come from the checkpoint
    guide = make_guide(model, kind, init_scale=guide_settings.get("init_scale", 0.1),
                       init_loc=guide_settings.get("init_loc", "xavier"))
    guides = [guide]
    if train_cfg.eta_objective is EtaObjective.EVIDENCE:  # its parameters are in the checkpoint too
        guides.append(make_evidence_guide(model, kind, guide_settings.get("init_scale", 0.1), predicting_guide=guide))
    try:
        load_modules(checkpoint.state, model, guides)
    except IncompatibleCheckpointError as err:
        raise RunError(f"{checkpoint.path}: {err}") from None
    return LoadedRun(run_dir, metrics, model_cfg, data_cfg, train_cfg, kind, model, guide, checkpoint)


def load_run_data(run: LoadedRun, data_dir: str | Path | None = None) -> Datasets:
    """The run's training and test sets, rebuilt from its data config (same subsets, same transformations).

    ``data_dir`` overrides the root; otherwise the absolute root recorded in ``metrics.json`` is tried,
    then the configured ``data_dir`` (relative paths are relative to where training ran).
    """
    candidates = [data_dir] if data_dir is not None else [run.metrics.get("data", {}).get("root"),
                                                          run.data_config.data_dir]
    roots = [c for c in candidates if c]
    root = next((r for r in roots if (resolve_data_dir(r) / "MNIST" / "raw").is_dir()), roots[0] if roots else None)
    cfg = dataclasses.replace(run.data_config, data_dir=None if root is None else str(root), allow_download=False)
    return load_datasets(cfg)


def read_eta_history(run: LoadedRun) -> tuple[list[int], torch.Tensor]:
    """Recorded eta trajectory: steps ``(T,)`` and eta ``(T, K)`` in the units of T.

    Read from ``eta_history.csv``, or from the checkpoint when the file is missing.
    """
    path = run.run_dir / "eta_history.csv"
    if path.is_file():
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        rows = list(run.checkpoint.state.get("eta_history", []))
    steps = [int(float(r["step"])) for r in rows]
    names = run.model_config.generator_names
    eta = torch.tensor([[float(r[name]) for name in names] for r in rows]).reshape(len(rows), -1)
    return steps, eta


def true_extent(data_cfg: DataConfig, image_size: int = 28,
                names: tuple[str, ...] = GENERATOR_NAMES) -> dict[str, float]:
    """The extent of the transformation applied to the data, per generator of the basis ``names``, in the units of T.

    rotated: pi (180 deg); partially rotated: pi / 2; translated: 8 px = 8 / 13.5 normalised units on
    ``translate_x`` and ``translate_y``; scaled: log 2 on ``scale_x`` and ``scale_y`` (the paper's basis)
    or on ``scale`` (the isotropic basis; ``stretch`` 0); plain MNIST: 0. Generators the data does not
    use get 0.
    """
    extent = dict.fromkeys(names, 0.0)
    if data_cfg.dataset in (DatasetName.ROTATED, DatasetName.PARTIALLY_ROTATED):
        default = 180.0 if data_cfg.dataset is DatasetName.ROTATED else 90.0
        extent["rotate"] = math.radians(data_cfg.rotation_deg if data_cfg.rotation_deg is not None else default)
    elif data_cfg.dataset is DatasetName.TRANSLATED:
        shift = data_cfg.translation_px / pixels_per_unit(image_size)
        extent["translate_x"] = extent["translate_y"] = shift
    elif data_cfg.dataset is DatasetName.SCALED:
        for name in {"scale_x", "scale_y", "scale"} & set(names):
            extent[name] = float(data_cfg.log_scale)
    return extent
