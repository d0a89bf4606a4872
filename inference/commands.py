"""Grids beyond one machine: one self-contained command per run, and the tables from the finished run folders.

``python -m inference.compare ... --print-commands`` trains nothing: it prints (and writes to ``OUT/commands.txt``)
one ``python -m inference.train`` command per run of the grid, with every setting as a flag (checked: the flags give
back exactly the run's :class:`~inference.config.RunConfig`), its folder ``OUT/[<dataset>/]<config>/seed-<s>`` and
``--reuse``, so that a job array or any scheduler can run line ``i`` as job ``i``, and run it again after a
preemption: ``--reuse`` leaves a finished run as it is, resumes one with a checkpoint and starts the others.
``python -m inference.compare --collect OUT`` then writes the tables and the figure of ``compare`` from the finished
folders alone (in the order of ``OUT/commands.txt`` when it is there), without the grid's flags.

Example (SLURM)::

    python -m inference.compare --preset table2 --data-dir DATA --out runs/t2 --seeds 0,1,2 --print-commands
    sbatch --array=1-$(wc -l < runs/t2/commands.txt) --wrap 'sed -n "${SLURM_ARRAY_TASK_ID}p" runs/t2/commands.txt | sh'
    python -m inference.compare --collect runs/t2
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from inference import grid, report
from inference.config import RunConfig
from inference.distributed import Launch
from inference.plots import FigureFormat
from inference.run_folder import HISTORY_FILENAME, METRICS_FILENAME
from inference.run_io import read_metrics
from inference.runner import RunControl
from models.config import GENERATOR_PRESETS

COMMANDS_FILENAME = "commands.txt"
"""Where ``--print-commands`` writes the grid's commands, one a line (``--collect`` takes its order from it)."""

Key = tuple[str, str, int]
"""A run's place in the tables: (dataset label, configuration, seed)."""


def run_folder(out: Path, label: str, name: str, seed: int) -> Path:
    """``OUT/[<label>/]<name>/seed-<seed>``: the folder of one run of a grid."""
    return out / label / name / f"seed-{seed}" if label else out / name / f"seed-{seed}"


def reuse(cfg: RunConfig, control: RunControl) -> tuple[RunControl, dict | None]:
    """``inference.train --reuse``: ``(control, metrics)`` of a finished run of ``cfg`` in ``control.out`` (left as it
    is), else ``(control to resume its newest checkpoint, or to start it afresh, None)``, as a grid does."""
    if control.resume or control.overwrite:
        raise ValueError("--reuse decides by itself whether to resume: drop --resume / --overwrite")
    control, metrics = grid.reuse_or_start(grid.Job(str(control.out), control.out, cfg), control)
    if metrics is not None and os.environ.get("RANK", "0") == "0":  # one line for a data-parallel job, not per rank
        print(f"{control.out} holds this run, finished: nothing to do", file=sys.stderr)
    return control, metrics


# ------------------------------------------------------------------------------------------------ --print-commands
def _value(value: object) -> str:
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, tuple):  # generators; a trailing comma tells one generator from a preset of that name
        text = ",".join(map(str, value)) or "none"
        return text + "," if text in GENERATOR_PRESETS and GENERATOR_PRESETS[text] != value else text
    return str(getattr(value, "value", value))


def _degrees(radians: float) -> float:
    """A number of degrees that ``math.radians`` turns back into ``radians`` exactly (``--eta-init-deg``)."""
    deg = math.degrees(radians)
    for _ in range(64):
        if math.radians(deg) == radians:
            return deg
        deg = math.nextafter(deg, math.inf if math.radians(deg) < radians else -math.inf)
    raise ValueError(f"no --eta-init-deg gives eta_init = {radians!r} exactly")


def train_flags(cfg: RunConfig, parser: argparse.ArgumentParser) -> list[str]:
    """The flags of ``inference.train`` (``parser``) that describe ``cfg``: those whose value differs from the
    parser's default. Raises a ``ValueError`` when the flags do not give back ``cfg`` exactly (a setting the command
    line cannot express)."""
    d, m, g, t, e = cfg.data, cfg.model, cfg.guide, cfg.train, cfg.eval
    values = {
        "dataset": d.dataset, "data_dir": d.data_dir, "download": d.allow_download, "train_size": d.train_size,
        "test_size": d.test_size, "rotation_deg": d.rotation_deg, "translation_px": d.translation_px,
        "log_scale": d.log_scale, "data_seed": d.data_seed,
        "hidden": m.hidden, "first_layer": m.first_layer, "transform_mode": m.transform_mode, "rff_scale": m.rff_scale,
        "rff_blur": m.rff_blur, "averaging": m.averaging, "num_transforms": m.num_transforms,
        "eval_transforms": e.num_transforms, "eval_samples": e.num_samples, "elbo_passes": e.elbo_passes,
        "generators": m.generators, "eta_init_deg": _degrees(m.eta_init), "max_shift": m.max_shift,
        "fixed_eta": not m.learn_eta, "prior": m.prior, "prior_scale": m.prior_scale, "eta_prior": m.eta_prior,
        "first_layer_prior": "on" if m.first_layer_prior else "off",
        "output_layer_prior": "on" if m.output_layer_prior else "off",
        "guide": g.kind, "init_scale": g.init_scale, "init_loc": g.init_loc,
        "num_steps": t.num_steps, "batch_size": t.batch_size, "lr": t.lr, "eta_lr": t.eta_lr,
        "num_particles": t.num_particles, "no_vectorize": not t.vectorize_particles, "no_cosine": not t.cosine,
        "eta_objective": t.eta_objective, "eta_holdout": t.eta_holdout, "eta_burnin": t.eta_burnin,
        "evidence_schedule": t.evidence_schedule, "evidence_lr": t.evidence_lr, "seed": t.seed, "device": cfg.device,
    }
    defaults = vars(parser.parse_args([]))
    actions = {a.dest: a for a in parser._actions}
    argv: list[str] = []
    for dest, value in values.items():
        if value == defaults[dest] or value is None:
            continue
        flag = actions[dest].option_strings[0]
        argv += [flag] if isinstance(actions[dest], argparse._StoreTrueAction) else [flag, _value(value)]
    from inference.train import config_from_args  # the command line's own reading of the flags

    back = config_from_args(parser.parse_args(argv))
    if back != cfg:
        differ = [f.name for f in dataclasses.fields(cfg) if getattr(back, f.name) != getattr(cfg, f.name)]
        raise ValueError(f"the flags of a run cannot express its {', '.join(differ)} settings: {shlex.join(argv)}")
    return argv


def control_flags(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[str]:
    """How each printed command runs: the grid command's checkpoint, thread, progress and launch flags."""
    defaults = vars(parser.parse_args([]))
    argv = [f"--{name.replace('_', '-')}" for name in ("no_progress", "tensorboard") if getattr(args, name)]
    for name in ("checkpoint_every", "keep_checkpoints", "threads"):
        if getattr(args, name) != defaults[name]:
            argv += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    return argv + Launch.from_args(args).argv()


def print_commands(plan: Sequence[tuple[str, str, int, RunConfig]], args: argparse.Namespace) -> list[str]:
    """One ``python -m inference.train`` command per run of ``plan`` (``(label, configuration, seed, config)``),
    printed and written to ``OUT/commands.txt``; returns them."""
    from inference.train import build_parser, resume_command  # the training command's own flags

    parser, out = build_parser(), Path(args.out)
    python = shlex.split(resume_command("RUN"))[0]
    lines, seen = [], set()
    for label, name, seed, cfg in plan:
        run_dir = run_folder(out, label, name, seed)
        if run_dir not in seen:  # runs sharing a folder are one run
            seen.add(run_dir)
            lines.append(shlex.join([python, "-m", "inference.train", *train_flags(cfg, parser), "--out", str(run_dir),
                                     *control_flags(args, parser), "--reuse"]))
    out.mkdir(parents=True, exist_ok=True)
    (out / COMMANDS_FILENAME).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"{len(lines)} commands written to {out / COMMANDS_FILENAME}; then: python -m inference.compare --collect "
          f"{out}", file=sys.stderr)
    return lines


# ------------------------------------------------------------------------------------------------------ --collect
def write_report(runs: Sequence[tuple[Key, Path, dict]], out: Path, fmt: FigureFormat) -> list[dict]:
    """``compare``'s tables (:func:`inference.report.write_tables`) and figure from ``(key, run folder, metrics)``
    of every finished run, in order; prints ``comparison.md`` and returns the summary rows."""
    summary = report.write_tables([report.run_row(*key, metrics) for key, _, metrics in runs], out)
    histories: dict[tuple[str, str], list[Path]] = {}
    for (dataset, name, _), run_dir, _ in runs:
        histories.setdefault((dataset, name), []).append(run_dir / HISTORY_FILENAME)
    report.plot(summary, histories, out, fmt)
    print((out / "comparison.md").read_text())
    return summary


def planned_order(directory: Path) -> list[Path]:
    """The run folders of ``directory/commands.txt`` (their ``--out``), in its order; empty without the file."""
    path = directory / COMMANDS_FILENAME
    if not path.is_file():
        return []
    folders = []
    for line in path.read_text().splitlines():
        words = shlex.split(line)
        if "--out" in words[:-1]:
            folders.append(Path(words[words.index("--out") + 1]).resolve())
    return folders


def _natural(path: Path) -> list:
    """Sort key of a path with its numbers compared as numbers (``fixed-5`` before ``fixed-45``)."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", str(path))]


def finished_runs(directory: Path) -> list[tuple[Key, Path, dict]]:
    """``(key, folder, metrics)`` of every finished run under ``directory`` (``[<dataset>/]<config>/seed-<s>``), in
    the order of its ``commands.txt``, the others after them in the order of their paths (numbers as numbers)."""
    order = {folder: i for i, folder in enumerate(planned_order(directory))}
    found = []
    for path in sorted(directory.rglob(METRICS_FILENAME)):
        run_dir = path.parent
        parts = run_dir.relative_to(directory).parts
        if len(parts) not in (2, 3) or not parts[-1].startswith("seed-") or not parts[-1][5:].isdigit():
            print(f"note: skipping {run_dir}: not a run folder of a grid ([<dataset>/]<config>/seed-<s>)",
                  file=sys.stderr)
            continue
        metrics = read_metrics(run_dir)
        label = parts[0] if len(parts) == 3 else metrics["config"]["data"]["dataset"]
        found.append(((label, parts[-2], int(parts[-1][5:])), run_dir, metrics))
    return sorted(found, key=lambda run: (order.get(run[1].resolve(), len(order)), _natural(run[1])))


def collect(directory: Path, fmt: FigureFormat) -> list[dict]:
    """``compare --collect DIR``: the tables and the figure of the finished runs under ``directory``, written there."""
    if not directory.is_dir():
        raise ValueError(f"--collect {directory}: no such folder")
    runs = finished_runs(directory)
    if not runs:
        raise ValueError(f"no finished run in {directory} to collect")
    return write_report(runs, directory, fmt)
