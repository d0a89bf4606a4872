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
import dataclasses
import json
import multiprocessing
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import torch

from inference import runner
from inference.checkpoint import CHECKPOINT_DIRNAME, find_latest_valid
from inference.config import RunConfig, derive, same_run
from inference.cpu import available_cores
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


def finished_metrics(job: Job) -> dict | None:
    """The metrics of a finished run in ``job.run_dir``, None if it has not finished.

    Raises
    ------
    ValueError
        The folder holds a finished run made with other settings.
    """
    path = job.run_dir / "metrics.json"
    if not path.exists():
        return None
    metrics = json.loads(path.read_text())
    differ = same_run(metrics.get("config", {}), job.config)
    if differ:
        raise ValueError(f"{job.run_dir} holds a run made with other settings ({', '.join(differ[:4])}"
                         f"{', ...' if len(differ) > 4 else ''}): choose another --out or remove that folder")
    return metrics


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


_WORKER: dict = {}  # this worker process's overrides (threads, device), set once when it starts


def _init_worker(counter, settings: list[dict]) -> None:
    """Worker start-up: take the next of ``settings`` (so that running workers hold different GPUs)."""
    with counter.get_lock():
        index = counter.value
        counter.value += 1
    _WORKER.update(settings[index % len(settings)])


def _train_logged(config: RunConfig, control: RunControl, log_path: str) -> dict:
    """Worker body: one training run with this worker's threads / device, its stdout and stderr in ``log_path``."""
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    if "device" in _WORKER:
        config = derive(config, device=_WORKER["device"])
    control = dataclasses.replace(control, threads=_WORKER.get("threads", control.threads))
    with open(log_path, "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        return runner.run(config, control)


def run_jobs(jobs: Sequence[Job], control: RunControl | None = None, num_workers: int = 1, collect_only: bool = False,
             on_result: Callable[[Job, dict], None] | None = None) -> list[tuple[Job, dict]]:
    """Reuse or train every job; returns ``(job, metrics)`` in the order of ``jobs`` (unfinished ones left out
    when ``collect_only``).

    ``control`` says how to run each (its ``out`` and ``resume`` are set per job; default: no progress bar).
    ``on_result`` is called as each run becomes available (reused ones first), e.g. to keep a table current.
    """
    template = control if control is not None else RunControl(Path("."), progress=False)
    controls: dict[int, RunControl] = {}
    results: dict[int, dict] = {}
    todo: list[int] = []
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
            todo.append(i)
            later[job.run_dir] = []
            controls[i] = dataclasses.replace(template, out=job.run_dir, resume=has_checkpoint(job))

    def done(i: int, metrics: dict) -> None:
        results[i] = metrics
        print(f"[{len(results)}/{len(jobs)}] {jobs[i].label}: test accuracy {metrics['test_accuracy']:.1%}  "
              f"elapsed {time.perf_counter() - clock:.0f} s", file=sys.stderr)
        if on_result is not None:
            on_result(jobs[i], metrics)
        for k in later.get(jobs[i].run_dir, []):
            reuse(k, finished_metrics(jobs[k]))  # read back, with the settings check

    if num_workers <= 1 or len(todo) <= 1:
        for i in todo:
            print(f"== {jobs[i].label} -> {jobs[i].run_dir}", file=sys.stderr)
            done(i, runner.run(jobs[i].config, controls[i]))
    else:
        settings = worker_settings(num_workers, jobs[todo[0]].config.device)
        context = multiprocessing.get_context("spawn")  # a fresh interpreter per worker: no inherited torch state
        counter = context.Value("i", 0)
        with ProcessPoolExecutor(max_workers=num_workers, mp_context=context, initializer=_init_worker,
                                 initargs=(counter, settings)) as pool:
            futures = {}
            for i in todo:
                print(f"== {jobs[i].label} -> {jobs[i].run_dir} (log: train.log)", file=sys.stderr)
                futures[pool.submit(_train_logged, jobs[i].config, controls[i], str(jobs[i].run_dir / "train.log"))] = i
            for future in as_completed(futures):
                done(futures[future], future.result())
    return [(jobs[i], results[i]) for i in sorted(results)]
