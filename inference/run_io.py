"""Rebuild a training run (model, guides, fitted parameters, data) from its run folder or ``model.pt``.

:func:`load_run` rebuilds the model and guide of a finished run from its config and loads the newest valid
checkpoint into them; :func:`load_model` does the same from ``model.pt`` alone. Parameters live in their modules,
so several runs can be used side by side.
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from guides.factory import make_evidence_guide, make_guide
from inference.checkpoint import (
    CHECKPOINT_DIRNAME,
    Checkpoint,
    CheckpointError,
    atomic_write,
    differing_settings,
    latest_checkpoint,
    list_checkpoints,
)
from inference.config import CONFIG_FILENAME, RunConfig
from inference.data import Datasets, load_datasets, resolve_data_dir
from inference.eta_objectives import EtaObjective
from inference.history import read_history_csv
from inference.run_folder import HISTORY_FILENAME, METRICS_FILENAME, MODEL_FILENAME
from inference.sources import SOURCES
from inference.state import check_state, load_modules
from models.network import InvariantNet


class RunError(ValueError):
    """A run directory cannot be loaded (missing, unfinished, without checkpoints, inconsistent)."""


@dataclass
class LoadedRun:
    """A fitted model and guide rebuilt from a run directory: its ``metrics.json`` and :class:`RunConfig`, the
    model (``eta`` restored), the guide and the newest valid checkpoint they were loaded from."""

    run_dir: Path
    metrics: dict
    config: RunConfig
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


def build_model(cfg: RunConfig, num_data: int, device: str | torch.device = "cpu",
                ) -> tuple[InvariantNet, Callable, Callable | None]:
    """The model, its guide and, under the ``evidence`` objective, the evidence guide, freshly initialised."""
    model = InvariantNet(cfg.model, num_data=num_data).to(device)
    guide = make_guide(model, cfg.guide.kind, init_scale=cfg.guide.init_scale, init_loc=cfg.guide.init_loc)
    evidence = (make_evidence_guide(model, cfg.guide.kind, cfg.guide.init_scale, predicting_guide=guide)
                if cfg.train.eta_objective is EtaObjective.EVIDENCE else None)
    return model, guide, evidence


def read_metrics(run_dir: Path) -> dict:
    """``run_dir/metrics.json``; a :class:`RunError` when the folder or file is missing or not JSON."""
    path = run_dir / METRICS_FILENAME
    if not run_dir.is_dir():
        raise RunError(f"run directory {run_dir} does not exist")
    if not path.is_file():
        newest = list_checkpoints(run_dir / CHECKPOINT_DIRNAME)
        if newest:
            raise RunError(f"{run_dir} is an unfinished run (newest checkpoint: step {newest[-1][0]}): finish it with "
                           f"python -m inference.train --resume {run_dir}")
        raise RunError(f"{run_dir} has no metrics.json: not a finished run of inference.train")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise RunError(f"{path} is not valid JSON ({err})") from None


def load_run(run_dir: str | Path, device: str | torch.device = "cpu") -> LoadedRun:
    """Rebuild the fitted model and guide of a finished run (output directory of ``python -m inference.train``)
    on ``device`` (the CPU by default, whatever the run trained on).

    Raises
    ------
    RunError
        Missing or unfinished run, no valid checkpoint, a checkpoint of another configuration.
    """
    run_dir = Path(run_dir)
    metrics = read_metrics(run_dir)
    try:
        config = RunConfig.from_dict(metrics["config"])
    except (KeyError, TypeError, ValueError) as err:
        raise RunError(f"{run_dir / 'metrics.json'} holds an unusable config ({type(err).__name__}: {err})") from None
    if not (run_dir / CHECKPOINT_DIRNAME).is_dir():
        raise RunError(f"{run_dir} has no {CHECKPOINT_DIRNAME}/ folder, so its fitted parameters are not there "
                       "(git keeps config.json, metrics.json, eta_history.csv of a run under benchmarks/results): "
                       f"train it again, python -m inference.train --config {run_dir / CONFIG_FILENAME} --out NEW")
    try:
        checkpoint, _ = latest_checkpoint(run_dir / CHECKPOINT_DIRNAME)
        if differing_settings(checkpoint.config, config.training_dict()):  # by value: 8 and 8.0 are one setting
            raise RunError(f"metrics.json and the newest checkpoint of {run_dir} come from different runs: is the "
                           "run being re-created?")
        if checkpoint.step != config.train.total_steps:
            raise RunError(f"{run_dir} is unfinished: its newest checkpoint is at step {checkpoint.step} of "
                           f"{config.train.total_steps} (metrics.json is older); finish it with "
                           f"python -m inference.train --resume {run_dir}")
        check_state(checkpoint, ("num_data", "model", "guides"))
        model, guide, evidence = build_model(config, int(checkpoint.state["num_data"]), device)
        load_modules(checkpoint.state, model, [guide] if evidence is None else [guide, evidence])
    except CheckpointError as err:
        raise RunError(f"{run_dir}: {err}") from None
    return LoadedRun(run_dir, metrics, config, model, guide, checkpoint)


def load_run_data(run: LoadedRun, data_dir: str | Path | None = None, **changes: object) -> Datasets:
    """The run's training and test sets, rebuilt from its data config (same subsets, same transformations).

    ``data_dir`` overrides the root; otherwise the absolute root recorded in ``metrics.json`` is tried,
    then the configured ``data_dir`` (relative paths are relative to where training ran). ``changes`` replace
    fields of the data config (e.g. ``dataset=`` the untransformed source, for upright test images).
    """
    candidates = [data_dir] if data_dir is not None else [run.metrics.get("data", {}).get("root"),
                                                          run.config.data.data_dir]
    roots = [c for c in candidates if c]
    folder = SOURCES[run.config.data.dataset.source].folder
    root = next((r for r in roots if (resolve_data_dir(r) / folder).is_dir()), roots[0] if roots else None)
    cfg = dataclasses.replace(run.config.data, data_dir=None if root is None else str(root), allow_download=False,
                              **changes)
    return load_datasets(cfg)


def read_eta_history(run: LoadedRun) -> tuple[list[int], torch.Tensor]:
    """Recorded eta trajectory: steps ``(T,)`` and eta ``(T, K)`` in the units of T, from ``eta_history.csv`` or,
    when the file is missing, from the checkpoint."""
    path, names = run.run_dir / HISTORY_FILENAME, run.config.model.generator_names
    if path.is_file():
        steps, columns = read_history_csv(path, names)
    else:
        rows = list(run.checkpoint.state.get("eta_history", []))
        steps, columns = [int(r["step"]) for r in rows], {name: [float(r[name]) for r in rows] for name in names}
    eta = torch.tensor([columns[name] for name in names]).T.reshape(len(steps), len(names))
    return steps, eta


def export_model(path: str | Path, config: RunConfig, model: InvariantNet, guide: Callable) -> Path:
    """Write the trained model and its (predicting) guide: ``{"config", "num_data", "model", "guide"}`` of plain
    types, read by ``torch.load(path, weights_only=True)`` and by :func:`load_model`."""
    buffer = io.BytesIO()
    torch.save({"config": config.to_dict(), "num_data": model.num_data,
                "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "guide": {k: v.detach().cpu() for k, v in guide.state_dict().items()}}, buffer)
    atomic_write(Path(path), buffer.getvalue())
    return Path(path)


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
        with torch.random.fork_rng(devices=[]):  # building draws initial values that the saved ones replace
            model, guide, _ = build_model(config, int(record["num_data"]), device)  # model.pt has no evidence guide
            load_modules({"model": record["model"], "guides": [record["guide"]]}, model, [guide])
    except (OSError, KeyError, ValueError, RuntimeError) as err:
        raise RunError(f"cannot load a model from {path}: {type(err).__name__}: {err}") from None
    return model, guide, config
