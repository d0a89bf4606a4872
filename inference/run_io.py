"""Rebuild a finished training run (model, guide, fitted parameters, data) from its output directory.

A run directory written by ``python -m inference.train`` holds ``metrics.json`` (with the full config),
``eta_history.csv`` and ``checkpoints/step-*.pt``. :func:`load_run` rebuilds the model and the guide
from the config, runs the guides once so that lazily created autoguide parameters exist (as
:func:`inference.state.restore_training_state` does when resuming) and loads the ``state_dict``s of the
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from guides.factory import GuideKind, make_evidence_guide, make_guide
from inference.checkpoint import (
    CHECKPOINT_DIRNAME,
    Checkpoint,
    IncompatibleCheckpointError,
    config_differences,
    find_latest_valid,
)
from inference.config import RunConfig
from inference.data import DataConfig, DatasetName, Datasets, load_datasets, pixels_per_unit, resolve_data_dir
from inference.eta_objectives import EtaObjective
from inference.state import load_modules
from inference.svi import TrainConfig
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
        Contents of ``metrics.json``.
    config : RunConfig
        The run's config (``model_config``, ``data_config``, ``train_config``, ``guide_kind`` are its parts).
    model : InvariantNet
        On the CPU (or the requested device), with ``eta`` restored when it is a ``pyro.param``.
    guide : callable
        From :func:`guides.make_guide`, its parameters restored from ``checkpoint``.
    checkpoint : Checkpoint
        The newest valid checkpoint; ``checkpoint.state["losses"]`` is -ELBO / N per step.
    """

    run_dir: Path
    metrics: dict
    config: RunConfig
    model: InvariantNet
    guide: Callable
    checkpoint: Checkpoint

    @property
    def model_config(self) -> ModelConfig:
        return self.config.model

    @property
    def data_config(self) -> DataConfig:
        return self.config.data

    @property
    def train_config(self) -> TrainConfig:
        return self.config.train

    @property
    def guide_kind(self) -> GuideKind:
        return self.config.guide.kind

    @property
    def name(self) -> str:
        """The directory name, used as the model's name in comparisons."""
        return self.run_dir.name

    @property
    def losses(self) -> list[float]:
        """-ELBO / N per training step (minibatch estimates), from the checkpoint."""
        return [float(v) for v in self.checkpoint.state.get("losses", [])]


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
        config = RunConfig.from_dict(metrics["config"])
    except (KeyError, TypeError, ValueError) as err:
        raise RunError(f"{run_dir / 'metrics.json'} holds an unusable config ({type(err).__name__}: {err})") from None
    checkpoint = newest_checkpoint(run_dir)
    num_data = int(checkpoint.config.get("num_data", 0))
    if checkpoint.fingerprint != config.fingerprint(num_data):
        diffs = config_differences(checkpoint.config, config.training_dict(num_data))
        raise RunError(f"metrics.json and the newest checkpoint of {run_dir} come from different runs "
                       f"({'; '.join(diffs[:3])}): is the run being re-created?")
    model = InvariantNet(config.model, num_data=num_data).to(device)  # its RFF buffers come from the checkpoint
    guide = make_guide(model, config.guide.kind, init_scale=config.guide.init_scale, init_loc=config.guide.init_loc)
    guides = [guide]
    if config.train.eta_objective is EtaObjective.EVIDENCE:  # its parameters are in the checkpoint too
        guides.append(make_evidence_guide(model, config.guide.kind, config.guide.init_scale, predicting_guide=guide))
    try:
        load_modules(checkpoint.state, model, guides)
    except IncompatibleCheckpointError as err:
        raise RunError(f"{checkpoint.path}: {err}") from None
    return LoadedRun(run_dir, metrics, config, model, guide, checkpoint)


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


MODEL_FILENAME = "model.pt"
"""A finished run's trained model and guide, loadable without the training code's state."""


def export_model(path: str | Path, config: RunConfig, model: InvariantNet, guide: Callable) -> Path:
    """Write the trained model and its (predicting) guide: ``{"config", "model", "guide"}`` of plain types, read by
    ``torch.load(path, weights_only=True)`` and by :func:`load_model`."""
    path = Path(path)
    record = {"config": config.to_dict(), "num_data": model.num_data,
              "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
              "guide": {k: v.detach().cpu() for k, v in guide.state_dict().items()}}
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(record, tmp)
    tmp.replace(path)
    return path


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[InvariantNet, Callable, RunConfig]:
    """The model, guide and config of an exported run (``RUN/model.pt``, or the run folder).

    The global random stream is left as it was (the guide is run once to create its parameters).

    Example::

        model, guide, config = load_model("runs/rotated-mnist")
        probs = predictive_log_probs(model, guide, images, num_samples=32).exp()  # (N, classes)
    """
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILENAME
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
        config = RunConfig.from_dict(record["config"])
    except (OSError, KeyError, ValueError, RuntimeError) as err:
        raise RunError(f"cannot load a model from {path}: {type(err).__name__}: {err}") from None
    with torch.random.fork_rng(devices=[]):  # building draws initial values that the saved ones replace
        model = InvariantNet(config.model, num_data=int(record["num_data"])).to(device)
        guide = make_guide(model, config.guide.kind, init_scale=config.guide.init_scale,
                           init_loc=config.guide.init_loc)
        try:
            load_modules({"model": record["model"], "guides": [record["guide"]]}, model, [guide])
        except IncompatibleCheckpointError as err:
            raise RunError(f"{path}: {err}") from None
    return model, guide, config
