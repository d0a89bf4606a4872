"""Run a grid of training runs: reuse the finished ones, train the rest in one process or in ``--jobs`` processes.

The experiment CLIs (:mod:`inference.compare`, :mod:`inference.extents`) describe each run by its
:class:`~inference.config.RunConfig` and folder and hand the list here, with one
:class:`~inference.runner.RunControl` for how to run them (threads, checkpoints, progress):

* a run whose folder holds a ``metrics.json`` made with the same settings is reused, so an interrupted grid
  continues where it stopped; one made with other settings is refused (never mixed into a table); a run
  interrupted part-way resumes from its newest valid checkpoint;
* with ``jobs = 1`` the runs train one after the other in this process (what notebooks see);
* with ``jobs > 1`` they train in that many worker processes, each with ``cores // jobs`` torch threads, or, with
  ``--device cuda`` on a machine with several GPUs, one GPU per worker. Each worker writes its output to
  ``RUN/train.log``; this process prints one line per finished run.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import math
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import torch

from inference import runner
from inference.checkpoint import CHECKPOINT_DIRNAME, find_latest_valid
from inference.cli import one_line, run_cli
from inference.config import RunConfig, derive, same_run
from inference.cpu import available_cores
from inference.run_io import read_metrics
from inference.runner import RunControl


@dataclass(frozen=True)
class Job:
    """One run of the grid: a label for progress lines, its folder and what it trains."""

    label: str
    run_dir: Path
    config: RunConfig


def parse_seeds(text: str) -> tuple[int, ...]:
    """A comma list of distinct non-negative seeds."""
    try:
        seeds = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integer seeds, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"expected distinct seeds >= 0, got {text!r}")
    return seeds


def parse_floats(text: str) -> tuple[float, ...]:
    """A comma list of distinct finite numbers >= 0 (extents, fixed angles); empty text is an empty tuple."""
    try:
        values = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of numbers, got {text!r}") from None
    if any(not math.isfinite(v) or v < 0 for v in values) or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"expected distinct finite numbers >= 0, got {text!r}")
    return values


def finished_metrics(job: Job) -> dict | None:
    """The metrics of a finished run in ``job.run_dir``, None if it has not finished.

    Raises
    ------
    ValueError
        The folder holds a finished run made with other settings.
    """
    if not (job.run_dir / "metrics.json").exists():
        return None
    metrics = read_metrics(job.run_dir)
    differ = same_run(metrics.get("config", {}), job.config)
    if differ:
        raise ValueError(f"{job.run_dir} holds a run made with other settings ({', '.join(differ[:4])}"
                         f"{', ...' if len(differ) > 4 else ''}): choose another --out or remove that folder")
    return metrics


def reuse_or_start(job: Job, control: RunControl) -> tuple[RunControl, dict | None]:
    """``(control, metrics)`` of ``job`` finished in its folder, else ``(control that resumes its newest checkpoint
    or starts it afresh, None)``. Asked when the run starts, not when its grid was planned: another process (a
    second grid on the same folder, a printed command) may have finished or begun it since, and a plan made
    earlier would train it again over the finished one."""
    metrics = finished_metrics(job)
    if metrics is not None:
        return control, metrics
    resume = has_checkpoint(job)
    return dataclasses.replace(control, out=job.run_dir, resume=resume, overwrite=not resume), None


def train_or_reuse(config: RunConfig, control: RunControl) -> dict:
    """Train the run of ``config`` into ``control.out`` unless it is there, finished (:func:`reuse_or_start`)."""
    control, finished = reuse_or_start(Job(str(control.out), control.out, config), control)
    return finished if finished is not None else runner.run(config, control)


def has_checkpoint(job: Job) -> bool:
    """Whether ``job``'s folder holds a valid checkpoint (a run interrupted part-way, to be resumed: it then ends
    where an uninterrupted one ends; a checkpoint made with other settings is refused by the run)."""
    start, _ = find_latest_valid(job.run_dir / CHECKPOINT_DIRNAME)
    if start is not None:
        print(f"   {job.label}: resuming from its checkpoint at step {start.step}", file=sys.stderr)
    return start is not None


def worker_settings(jobs: int, device: str, cores: int | None = None, gpus: int | None = None) -> list[dict]:
    """Per-worker overrides: ``{"threads": n}`` on CPU (``cores // jobs``, at least 1) and, on CUDA with several
    GPUs, ``{"device": "cuda:i"}`` for worker ``i`` (round robin)."""
    if jobs < 1:
        raise ValueError(f"--jobs must be a positive integer, got {jobs}")
    if cores is None:
        cores = available_cores()
    if device.startswith("cuda"):
        gpus = torch.cuda.device_count() if gpus is None else gpus
        if gpus > 1:
            return [{"device": f"cuda:{i % gpus}", "threads": max(1, cores // jobs)} for i in range(jobs)]
    return [{"threads": max(1, cores // jobs)} for _ in range(jobs)]


_PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h)


def stop_with_parent(parent: int) -> None:
    """Ask the kernel (Linux) to send this worker SIGTERM when the process that started it ends, however it ends
    (``kill -9`` included): the worker then stops after its current step with a checkpoint instead of training on,
    orphaned. Where ``prctl`` is missing, workers end with the pool as before."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        return
    if os.getppid() != parent:  # the parent ended before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


_WORKER: dict = {}  # this worker process's overrides (threads, device) and its grid's pid, set once when it starts


def _init_worker(counter, pids, settings: list[dict], parent: int) -> None:
    """Worker start-up: stop with the grid's process (:func:`stop_with_parent`), take the next of ``settings`` (so
    that running workers hold different GPUs) and record this process's id (to pass stop signals on)."""
    stop_with_parent(parent)
    with counter.get_lock():
        index = counter.value
        counter.value += 1
    pids[index % len(pids)] = os.getpid()
    _WORKER.update(settings[index % len(settings)], parent=parent)


def _train_logged(config: RunConfig, control: RunControl, log_path: str) -> dict:
    """Worker body: one training run with this worker's threads / device, its stdout and stderr in ``log_path``."""
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    if "device" in _WORKER:
        config = derive(config, device=_WORKER["device"])
    control = dataclasses.replace(control, threads=_WORKER.get("threads", control.threads))
    try:
        with open(log_path, "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            return train_or_reuse(config, control)
    finally:  # the grid is gone (its checkpoint is saved): nobody to report to, and no next job would ever come
        if "parent" in _WORKER and os.getppid() != _WORKER["parent"]:
            os._exit(128 + signal.SIGTERM)


def grid_control(args: argparse.Namespace) -> RunControl:
    """How a grid command (``compare``, ``extents``) runs each of its runs: the run-control flags of
    ``inference.train`` that apply to a grid (``--out``, checkpoints, threads, progress, TensorBoard)."""
    if getattr(args, "strategy", "single") != "single":  # inference/distributed.py: one run, not a grid's worker
        raise ValueError("a grid trains its runs in this process or in --jobs workers, not with --strategy ddp")
    return RunControl(Path(args.out), checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints,
                      threads=args.threads, progress=not args.no_progress, tensorboard=args.tensorboard)


def grid_cli(main: Callable[[argparse.Namespace], object], args: argparse.Namespace) -> int:
    """Console entry of a grid command (``compare``, ``extents``): :func:`inference.cli.run_cli` with the grid's
    own resume (the same command again), so the single run's ``--resume`` / ``--overwrite`` are refused."""
    def checked(args: argparse.Namespace) -> object:
        for flag in ("resume", "overwrite"):
            if getattr(args, flag, None):
                raise ValueError(f"--{flag} is for one run of inference.train: a grid resumes by itself (run the same "
                                 "command again: finished runs are reused, interrupted ones continue from their "
                                 "checkpoints); to start a run afresh, remove its folder")
        return main(args)

    return run_cli(checked, args, lambda err: "interrupted: finished runs are kept and runs in progress saved a "
                   "checkpoint; run the same command again to continue")


class GridError(ValueError):
    """Some runs of a grid failed (diverged, bad data, a full disk); the others finished."""


FAILURES = (ValueError, FloatingPointError, OSError)
"""What ends one run of a grid without stopping the others: bad settings or data, divergence, the machine."""


def run_jobs(jobs: Sequence[Job], control: RunControl | None = None, num_workers: int = 1, collect_only: bool = False,
             on_result: Callable[[Job, dict], None] | None = None) -> list[tuple[Job, dict]]:
    """Reuse or train every job; returns ``(job, metrics)`` in the order of ``jobs`` (unfinished ones left out
    when ``collect_only``).

    ``control`` says how to run each (its ``out``, ``resume`` and ``overwrite`` are set per job; default: no
    progress bar). ``on_result`` is called as each run becomes available (reused ones first), e.g. to keep a table
    current. A run that fails (:data:`FAILURES`) does not stop the others: once they are done, a :class:`GridError`
    names every failed run. A stop signal stops the runs in progress after their current step, with a checkpoint,
    and is raised as ``KeyboardInterrupt`` (the same command then continues the grid).
    """
    template = control if control is not None else RunControl(Path("."), progress=False)
    results: dict[int, dict] = {}
    failures: list[str] = []
    todo: list[tuple[int, Job, RunControl]] = []
    later: dict[Path, list[int]] = {}  # jobs sharing the folder of one being trained (e.g. the shared a = 0 runs)
    clock = time.perf_counter()

    def reuse(i: int, metrics: dict) -> None:
        results[i] = metrics
        print(f"[{len(results)}/{len(jobs)}] {jobs[i].label} (done, reused)", file=sys.stderr)
        if on_result is not None:
            on_result(jobs[i], metrics)

    for i, job in enumerate(jobs):
        if job.run_dir in later:
            later[job.run_dir].append(i)
            continue
        metrics = finished_metrics(job)
        if metrics is not None:
            reuse(i, metrics)
        elif collect_only:
            print(f"[-/{len(jobs)}] {job.label} (not run, skipped)", file=sys.stderr)
        else:
            later[job.run_dir] = []  # resumed, started afresh or (finished by then elsewhere) reused when it starts
            todo.append((i, job, dataclasses.replace(template, out=job.run_dir)))

    def done(i: int, outcome: dict | BaseException) -> None:
        if isinstance(outcome, BaseException):
            failures.append(f"{jobs[i].label}: {one_line(outcome)}")
            print(f"[failed] {failures[-1]}", file=sys.stderr)
            return
        results[i] = outcome
        print(f"[{len(results)}/{len(jobs)}] {jobs[i].label}: test accuracy {outcome['test_accuracy']:.1%}  "
              f"elapsed {time.perf_counter() - clock:.0f} s", file=sys.stderr)
        if on_result is not None:
            on_result(jobs[i], outcome)
        for k in later.get(jobs[i].run_dir, []):
            reuse(k, finished_metrics(jobs[k]))  # read back, with the settings check

    if num_workers <= 1 or len(todo) <= 1:
        _run_here(todo, done)
    else:
        _run_in_workers(todo, num_workers, done)
    if failures:
        raise GridError(f"{len(failures)} of {len(jobs)} runs failed ({'; '.join(failures)}); the tables hold the "
                        "finished runs, and the same command trains the failed ones again")
    return [(jobs[i], results[i]) for i in sorted(results)]


def _run_here(todo: Sequence[tuple[int, Job, RunControl]], done: Callable[[int, dict | BaseException], None]
              ) -> None:
    """Train the jobs ``(index, job, control)`` one after the other in this process, handing each outcome to
    ``done``."""
    for i, job, control in todo:
        print(f"== {job.label} -> {job.run_dir}", file=sys.stderr)
        try:
            done(i, train_or_reuse(job.config, control))
        except FAILURES as err:
            done(i, err)


def _run_in_workers(todo: Sequence[tuple[int, Job, RunControl]], num_workers: int,
                    done: Callable[[int, dict | BaseException], None]) -> None:
    """Train ``todo`` in ``num_workers`` spawned processes; ``done(i, metrics or failure)`` as each ends.

    SIGTERM or SIGHUP to this process (raised as :class:`~inference.stopping.Stopped` by the CLI's handler) is
    passed on to the workers, which stop after their current step with a checkpoint (a terminal's Ctrl-C reaches
    them directly); this process waits for them and raises it on."""
    settings = worker_settings(num_workers, todo[0][1].config.device)
    context = multiprocessing.get_context("spawn")  # a fresh interpreter per worker: no inherited torch state
    counter, pids = context.Value("i", 0), context.Array("i", num_workers)
    with ProcessPoolExecutor(max_workers=num_workers, mp_context=context, initializer=_init_worker,
                             initargs=(counter, pids, settings, os.getpid())) as pool:
        futures = {}
        for i, job, control in todo:
            print(f"== {job.label} -> {job.run_dir} (log: train.log)", file=sys.stderr)
            futures[pool.submit(_train_logged, job.config, control, str(job.run_dir / "train.log"))] = i
        try:
            for future in as_completed(futures):
                try:
                    done(futures[future], future.result())
                except FAILURES as err:
                    done(futures[future], err)
        except KeyboardInterrupt as err:
            signum = getattr(err, "signum", signal.SIGINT)
            for pid in pids[:]:
                if pid and signum != signal.SIGINT:  # a terminal's Ctrl-C reached the workers; others did not
                    with contextlib.suppress(OSError):
                        os.kill(pid, signum)
            pool.shutdown(wait=True, cancel_futures=True)
            raise
