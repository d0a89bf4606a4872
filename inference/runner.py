r"""Train one run: a :class:`~inference.config.RunConfig` into a folder, resumable, then evaluated.

:func:`run` is what ``python -m inference.train`` (and every grid of :mod:`inference.grid`) does with a run:
load the data, build the model and guides, write ``config.json``, train with :func:`inference.svi.fit`
(checkpoints, resume from the newest one with :class:`RunControl`\ ``(resume=True)``), then write
``eta_history.csv`` (streamed while training), ``model.pt`` (:func:`inference.run_io.export_model`) and
``metrics.json``: eta (per generator, units of T), test accuracy and NLL of the M-draw posterior predictive
and of one draw, the ELBO with its terms, timings, data provenance and the config.
"""

from __future__ import annotations

import csv
import json
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pyro
import torch

from guides.factory import make_evidence_guide, make_guide
from inference.checkpoint import (
    CHECKPOINT_DIRNAME,
    Checkpoint,
    NoCheckpointError,
    check_compatible,
    find_latest_valid,
    remove_checkpoints,
)
from inference.config import CONFIG_FILENAME, RunConfig
from inference.cpu import configure_cpu
from inference.data import load_datasets, validate_split
from inference.eta_objectives import EtaObjective, eta_dict, eta_interval, split_holdout
from inference.evaluate import accuracy_and_nll, average_draws, elbo_estimate, predictive_draws
from inference.run_io import MODEL_FILENAME, export_model
from inference.state import CheckpointPolicy, fingerprint_config
from inference.svi import fit
from models.network import InvariantNet
from models.transforms import GENERATOR_NAMES


def run_settings(cfg: RunConfig) -> dict:
    """Settings beyond the model and train configs that determine training (and a checkpoint's fingerprint):
    with them, :func:`inference.state.fingerprint_config` gives :meth:`RunConfig.training_dict`."""
    training = cfg.training_dict(0)
    return {"data": training["data"], "guide": training["guide"], "device": training["device"]}


def latest_checkpoint(run_dir: Path) -> tuple[Checkpoint, list[Exception]]:
    """The newest valid checkpoint of the run in ``run_dir``, and the errors of corrupt newer ones skipped.

    Raises
    ------
    NoCheckpointError
        When ``run_dir/checkpoints`` holds no checkpoint that loads.
    """
    folder = run_dir / CHECKPOINT_DIRNAME
    checkpoint, skipped = find_latest_valid(folder)
    if checkpoint is None:
        reason = f" ({len(skipped)} corrupt, newest: {skipped[0]})" if skipped else ""
        raise NoCheckpointError(f"--resume {run_dir}: no valid checkpoint in {folder}{reason}")
    return checkpoint, list(skipped)



def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N``; asking for a GPU torch does not see is an error, not a silent fallback."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} was requested but torch sees no CUDA device")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name} was requested but torch sees {torch.cuda.device_count()} CUDA device(s)")
    return device


class EtaHistoryWriter:
    """Streams the eta rows that :func:`fit` records to a CSV while training, so a run can be watched."""

    def __init__(self, path: Path, rows: Iterable[Mapping] = (), names: Iterable[str] = GENERATOR_NAMES) -> None:
        """Start ``path`` afresh with ``rows`` already recorded (a resumed run's history up to its checkpoint).

        ``names`` are eta's generators (the model's basis), one column each.
        """
        self.file = open(path, "w", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=["step", *names])
        self.writer.writeheader()
        self.writer.writerows(rows)
        self.file.flush()

    def __call__(self, row: Mapping) -> None:
        self.writer.writerow(row)
        self.file.flush()

    def close(self) -> None:
        self.file.close()


@dataclass(frozen=True)
class RunControl:
    """How (not what) to run: where, whether to resume, checkpointing, CPU threads, the progress bar."""

    out: Path
    resume: bool = False
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    threads: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.checkpoint_every < 0 or self.keep_checkpoints < 1:
            raise ValueError("--checkpoint-every must be >= 0 and --keep-checkpoints >= 1")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be a positive integer, got {self.threads}")



def run(cfg: RunConfig, control: RunControl) -> dict:
    """Train the run ``cfg`` describes into ``control.out`` (resuming from its newest checkpoint when
    ``control.resume``), evaluate it and write ``config.json``, ``metrics.json`` and ``eta_history.csv``."""
    data_cfg, model_cfg, train_cfg = cfg.data, cfg.model, cfg.train
    device = resolve_device(cfg.device)
    out = control.out
    resume_from, skipped = latest_checkpoint(out) if control.resume else (None, [])
    configure_cpu(control.threads)  # threads per core and an allocator that keeps large step buffers mapped
    pyro.set_rng_seed(train_cfg.seed)
    data = load_datasets(data_cfg)
    train, test = data.train, data.test
    for split, name in ((train, "training"), (test, "test")):  # once per dataset, not per step
        validate_split(split, model_cfg.image_shape, model_cfg.num_classes, name)
    heldout = None
    if train_cfg.eta_objective is EtaObjective.HELDOUT:  # the guide fits the rest, eta follows the held-out part
        train, heldout = split_holdout(train, train_cfg.eta_holdout, train_cfg.seed)
        heldout.x, heldout.y = heldout.x.to(device), heldout.y.to(device)
    settings = run_settings(cfg)
    if resume_from is not None:  # before anything in OUT is touched
        check_compatible(resume_from, fingerprint_config(model_cfg, train_cfg, len(train), settings))
    train.x, train.y, test.x, test.y = (t.to(device) for t in (train.x, train.y, test.x, test.y))
    model = InvariantNet(model_cfg, num_data=len(train)).to(device)
    guide = make_guide(model, cfg.guide.kind, init_scale=cfg.guide.init_scale, init_loc=cfg.guide.init_loc)
    evidence_guide = (make_evidence_guide(model, cfg.guide.kind, cfg.guide.init_scale, predicting_guide=guide)
                      if train_cfg.eta_objective is EtaObjective.EVIDENCE else None)
    out.mkdir(parents=True, exist_ok=True)
    cfg.save(out / CONFIG_FILENAME)  # what this run is, before anything is trained
    print(f"data: {data.info['dataset']} train={len(train)} test={len(test)} from {data.info['root']}"
          f"{'' if data.info['full_mnist'] else ' (subset, not full MNIST)'}", file=sys.stderr)
    announce_start(out, resume_from, skipped)
    policy = CheckpointPolicy(out / CHECKPOINT_DIRNAME, every=control.checkpoint_every, keep=control.keep_checkpoints,
                              run_config=settings)
    rows = resume_from.state["eta_history"] if resume_from is not None else ()
    history = EtaHistoryWriter(out / "eta_history.csv", rows, model_cfg.generator_names)
    try:
        result = fit(model, guide, train, train_cfg, on_record=history, progress=control.progress,
                     checkpoints=policy, start=resume_from, heldout=heldout, evidence_guide=evidence_guide)
    finally:
        history.close()
    start = time.perf_counter()
    draws = predictive_draws(model, guide, test.x, cfg.eval.num_samples, cfg.eval.num_transforms)  # (M, N, C)
    acc, nll = accuracy_and_nll(average_draws(draws), test.y)
    acc_one, nll_one = accuracy_and_nll(draws[0], test.y)  # the first draw alone: a one-draw evaluation
    # the bound on the marginal likelihood: the evidence guide's ELBO under the evidence objective
    elbo = elbo_estimate(model, evidence_guide or guide, train, num_passes=cfg.eval.elbo_passes)
    metrics = {
        "eta": eta_dict(model, guide),
        "eta_interval_90": eta_interval(model, guide),  # full Bayes: q(eta)'s central 90% interval, else None
        "test_accuracy": acc,
        "test_nll": nll,
        "test_accuracy_one_draw": acc_one,
        "test_nll_one_draw": nll_one,
        "elbo_per_example": elbo.mean,
        "elbo_stderr": elbo.stderr,
        "elbo_terms": {"expected_loglik": elbo.expected_loglik, "kl": elbo.kl},  # per example: loglik - kl = ELBO
        "elbo_guide": "evidence" if evidence_guide is not None else "predictive",
        "train_seconds": result.seconds,
        "eval_seconds": time.perf_counter() - start,
        "final_train_loss": result.losses[-1],
        "resumed_from_step": resume_from.step if resume_from is not None else None,
        "data": data.info,
        "config": cfg.to_dict(),
    }
    export_model(out / MODEL_FILENAME, cfg, model, guide)  # usable without this code's training state
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=_json_default))
    print(json.dumps({k: metrics[k] for k in ("eta", "test_accuracy", "test_nll", "elbo_per_example",
                                               "elbo_stderr", "train_seconds")}, indent=2))
    return metrics


def announce_start(out: Path, start: Checkpoint | None, skipped: list[Exception]) -> None:
    """Say on stderr where training starts; a fresh run clears the checkpoints of an earlier run in ``out``."""
    if start is None:
        removed = remove_checkpoints(out / CHECKPOINT_DIRNAME)
        if removed:
            print(f"note: removed {removed} checkpoint(s) of an earlier run in {out / CHECKPOINT_DIRNAME} "
                  "(pass --resume to continue a run instead)", file=sys.stderr)
        return
    for err in skipped:
        print(f"warning: skipping {err}", file=sys.stderr)
    print(f"resuming from {start.path} (step {start.step})", file=sys.stderr)



def _json_default(obj):
    if hasattr(obj, "value"):  # Enums
        return obj.value
    raise TypeError(f"not JSON serialisable: {type(obj)}")
