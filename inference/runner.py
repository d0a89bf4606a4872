r"""Train one run: a :class:`~inference.config.RunConfig` into a folder, resumable, then evaluated.

:func:`run` is what ``python -m inference.train`` (and every grid of :mod:`inference.grid`) does with a run:
load the data, build the model and guides, train with :func:`inference.svi.fit` (checkpoints stamped with
:meth:`RunConfig.training_dict`; resume from the newest one with :class:`RunControl`\ ``(resume=True)``), and
write ``config.json`` (once training may start), ``eta_history.csv`` and ``elbo_history.csv`` (streamed while
training; :mod:`inference.history`, with TensorBoard events on request), ``model.pt``
(:func:`inference.run_io.export_model`) and ``metrics.json``: eta (per generator, units of T), test accuracy and
NLL of the M-draw posterior predictive and of one draw, the ELBO with its terms, timings, data provenance and
the config.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pyro
import torch

from inference.checkpoint import (
    CHECKPOINT_DIRNAME,
    Checkpoint,
    NoCheckpointError,
    atomic_write,
    check_compatible,
    latest_checkpoint,
    optimiser_changes,
)
from inference.config import CONFIG_FILENAME, RunConfig
from inference.data import Datasets, Split, load_datasets, validate_split
from inference.eta_objectives import EtaObjective, eta_dict, eta_interval, split_holdout
from inference.evaluate import accuracy_and_nll, average_draws, elbo_estimate, predictive_draws
from inference.evidence_check import EvidenceCheck, check_evidence, sets_eta_by_bound
from inference.history import TrainingRecord, require_tensorboard
from inference.limits import check_memory, check_threads
from inference.run_folder import (
    ELBO_HISTORY_FILENAME,
    HISTORY_FILENAME,
    METRICS_FILENAME,
    MODEL_FILENAME,
    TENSORBOARD_DIRNAME,
    claim,
    clear,
)
from inference.run_io import build_model, export_model
from inference.state import CheckpointPolicy
from inference.svi import FitResult, fit
from models.network import InvariantNet

if TYPE_CHECKING:
    from inference.distributed import GradientSync


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N``; asking for a GPU torch does not see is an error, not a silent fallback."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} was requested but torch sees no CUDA device")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name} was requested but torch sees {torch.cuda.device_count()} CUDA device(s)")
    return device


@dataclass(frozen=True)
class RunControl:
    """How (not what) to run: where, whether to resume or replace the run there, checkpointing, CPU threads,
    the progress bar, TensorBoard logging (``RUN/tensorboard/``; needs the optional ``tensorboard`` package)."""

    out: Path
    resume: bool = False
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    threads: int | None = None
    progress: bool = True
    overwrite: bool = False
    tensorboard: bool = False

    def __post_init__(self) -> None:
        if self.checkpoint_every < 0 or self.keep_checkpoints < 1:
            raise ValueError("--checkpoint-every must be >= 0 and --keep-checkpoints >= 1")
        check_threads(self.threads)
        if self.tensorboard:
            require_tensorboard()  # before any data is loaded


def run(cfg: RunConfig, control: RunControl, sync: GradientSync | None = None) -> dict:
    """Train the run ``cfg`` describes into ``control.out`` (resuming from its newest checkpoint when
    ``control.resume``), evaluate it and write ``config.json``, ``metrics.json``, ``eta_history.csv`` and
    ``elbo_history.csv``.

    The folder is held (:func:`inference.run_folder.claim`) from start to end: another process cannot write it, and
    a run already there is continued (``resume``), replaced (``overwrite``: its files are removed once training
    starts) or left alone (an error). With ``sync`` this process is rank 0 of data-parallel training
    (:mod:`inference.distributed`; the other ranks run :func:`follow`)."""
    with claim(control.out, control.resume, control.overwrite) as out:
        return _run(cfg, control, out, sync)


def follow(cfg: RunConfig, control: RunControl, sync: GradientSync) -> None:
    """A rank other than 0 of data-parallel training: the run's data and model, trained in step with rank 0, which
    sends it the starting state (a resumed run's too) and does every file's I/O."""
    _, train, _, heldout, model, guide, evidence_guide = _prepare(cfg, control)
    fit(model, guide, train, cfg.train, progress=False, heldout=heldout, evidence_guide=evidence_guide, sync=sync)


def _prepare(cfg: RunConfig, control: RunControl
             ) -> tuple[Datasets, Split, Split, Split | None, InvariantNet, Callable, Callable | None]:
    """Seed, load and check the data, split off the held-out part, build the model and guides on the device:
    ``(data, train, test, heldout, model, guide, evidence_guide)``."""
    device = resolve_device(cfg.device)
    if control.threads is not None:
        torch.set_num_threads(control.threads)
    pyro.set_rng_seed(cfg.train.seed)
    data = load_datasets(cfg.data)
    train, test = data.train, data.test
    for split, name in ((train, "training"), (test, "test")):  # once per dataset, not per step
        validate_split(split, cfg.model.image_shape, cfg.model.num_classes, name)
    check_memory(cfg, len(train), len(test))
    heldout = None
    if cfg.train.eta_objective is EtaObjective.HELDOUT:  # the guide fits the rest, eta follows the held-out part
        train, heldout = split_holdout(train, cfg.train.eta_holdout, cfg.train.seed)
        heldout.x, heldout.y = heldout.x.to(device), heldout.y.to(device)
    train.x, train.y, test.x, test.y = (t.to(device) for t in (train.x, train.y, test.x, test.y))
    model, guide, evidence_guide = build_model(cfg, len(train), device)
    return data, train, test, heldout, model, guide, evidence_guide


def _run(cfg: RunConfig, control: RunControl, out: Path, sync: GradientSync | None = None) -> dict:
    resolve_device(cfg.device)
    resume_from, skipped = None, []
    if control.resume:
        try:
            resume_from, skipped = latest_checkpoint(out / CHECKPOINT_DIRNAME)
        except NoCheckpointError as err:
            if not (out / CONFIG_FILENAME).is_file():
                raise NoCheckpointError(f"--resume {out}: {err}") from None
            # the run started but was killed before its first complete checkpoint: nothing to lose, start again
            print(f"warning: {err}; the run in {out} starts again from step 0", file=sys.stderr)
        else:
            check_compatible(resume_from, cfg.training_dict())  # before loading data (again in fit, with its hash)
    data, train, test, heldout, model, guide, evidence_guide = _prepare(cfg, control)
    history = TrainingRecord(out / HISTORY_FILENAME, out / ELBO_HISTORY_FILENAME, cfg.model.generator_names,
                             out / TENSORBOARD_DIRNAME if control.tensorboard else None)

    def start(result: FitResult) -> None:  # fit accepted the checkpoint: only now is the run folder written
        if resume_from is None:
            removed = clear(out)
            if removed:
                print(f"note: removed the earlier run's {', '.join(removed)} from {out}", file=sys.stderr)
        else:
            announce_resume(resume_from, skipped, cfg)
        cfg.save(out / CONFIG_FILENAME)  # what this run is, before anything is trained
        part = "" if data.info["full_set"] else f" (a part, not the full {data.info['source']})"
        print(f"data: {data.info['dataset']} train={len(train)} test={len(test)} from {data.info['root']}{part}",
              file=sys.stderr)
        history.open(result)

    policy = CheckpointPolicy(out / CHECKPOINT_DIRNAME, control.checkpoint_every, control.keep_checkpoints,
                              config=cfg.training_dict(), data_sha256=data.info["sha256"])
    try:
        result = fit(model, guide, train, cfg.train, on_record=history, progress=control.progress, on_start=start,
                     checkpoints=policy, start=resume_from, heldout=heldout, evidence_guide=evidence_guide, sync=sync)
    finally:
        history.close()
    metrics = {**evaluate(cfg, model, guide, evidence_guide, train, test), "train_seconds": result.seconds,
               "final_train_loss": result.losses[-1], "resumed_from_step": getattr(resume_from, "step", None),
               "data": data.info, "config": cfg.to_dict(),
               **({"distributed": sync.describe()} if sync is not None else {})}
    export_model(out / MODEL_FILENAME, cfg, model, guide)  # usable without this code's training state
    atomic_write(out / METRICS_FILENAME, json.dumps(metrics, indent=2).encode())
    print(json.dumps({k: metrics[k] for k in ("eta", "test_accuracy", "test_nll", "elbo_per_example",
                                               "elbo_stderr", "train_seconds")}, indent=2))
    check = metrics["evidence_check"]
    if check is not None and not check["fits_labels"]:
        print(EvidenceCheck.from_dict(check).warning(), file=sys.stderr)
    return metrics


def evaluate(cfg: RunConfig, model: InvariantNet, guide: Callable, evidence_guide: Callable | None, train: Split,
             test: Split) -> dict:
    """The trained run's eta, test accuracy and NLL (M draws, and the first alone) and its ELBO per example."""
    start = time.perf_counter()
    draws = predictive_draws(model, guide, test.x, cfg.eval.num_samples, cfg.eval.num_transforms)  # (M, N, C)
    acc, nll = accuracy_and_nll(average_draws(draws), test.y)
    acc_one, nll_one = accuracy_and_nll(draws[0], test.y)  # the first draw alone: a one-draw evaluation
    # the bound on the marginal likelihood: the evidence guide's ELBO under the evidence objective
    elbo = elbo_estimate(model, evidence_guide or guide, train, num_passes=cfg.eval.elbo_passes)
    check = (check_evidence(model, train.y, elbo.expected_loglik)  # did the data, or the KL alone, choose eta?
             if sets_eta_by_bound(cfg.model.learn_eta, cfg.model.generators, cfg.train.eta_objective) else None)
    return {
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
        "evidence_check": None if check is None else check.to_dict(),
        "eval_seconds": time.perf_counter() - start,
    }


def announce_resume(start: Checkpoint, skipped: list[Exception], cfg: RunConfig) -> None:
    """Say on stderr where training resumes, which newer checkpoints were unusable and which optimiser settings
    the resumed run changes (:data:`inference.checkpoint.RESUMABLE_CHANGES`)."""
    for err in skipped:
        print(f"warning: skipping {err}", file=sys.stderr)
    print(f"resuming from {start.path} (step {start.step})", file=sys.stderr)
    changed = [f"{name} {a} -> {b}" for name, a, b in optimiser_changes(start.config, cfg.training_dict())]
    if changed:
        print(f"note: resuming with changed optimiser settings ({'; '.join(changed)}): from here on the run differs "
              "from an uninterrupted one", file=sys.stderr)
