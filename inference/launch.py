"""Starting the processes of data-parallel training (:mod:`inference.distributed`) and running one of them.

``python -m inference.train ... --strategy ddp --devices N [--num-nodes M]``: without ``RANK`` in the environment
the command starts its ``N`` local processes itself (:func:`launch`: the same command with ``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` set, as ``torchrun``
sets them); on ``M`` machines run it on each with ``MASTER_ADDR``, ``MASTER_PORT`` and ``NODE_RANK`` (0 .. M-1)
set. With ``RANK`` set (by :func:`launch` or ``torchrun``) it runs as that one rank (:func:`run_rank`): ``gloo`` on
the CPU, the machine's cores split between its ranks, or ``nccl`` on the GPU of its local rank.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from inference import runner
from inference.cli import USER_ERRORS, one_line
from inference.config import RunConfig, derive
from inference.cpu import available_cores
from inference.distributed import GradientSync, Launch
from inference.grid import stop_with_parent
from inference.runner import RunControl

LAUNCHER_PID = "INVW_LAUNCHER_PID"
"""Set by :func:`launch` in its ranks' environment: the launcher's process id."""


def is_rank_process() -> bool:
    """Whether this process is one rank of a launched group (``RANK`` set by :func:`launch` or ``torchrun``)."""
    return "RANK" in os.environ


@dataclass(frozen=True)
class RankEnv:
    """This process's place in the group, from the environment ``torchrun`` (or :func:`launch`) sets."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int

    @classmethod
    def read(cls, launch: Launch) -> RankEnv:
        try:
            env = cls(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"]),
                      int(os.environ.get("LOCAL_WORLD_SIZE", launch.devices)))
        except (KeyError, ValueError) as err:
            raise ValueError(f"RANK and WORLD_SIZE must be integers in the environment of a rank ({err})") from None
        if env.world_size != launch.world_size:
            raise ValueError(f"WORLD_SIZE={env.world_size} but --devices {launch.devices} x --num-nodes "
                             f"{launch.num_nodes} = {launch.world_size}")
        return env


def rank_device(device: str, local_rank: int) -> str:
    """The device of the rank with ``local_rank``: ``cpu``, or ``cuda:<local rank>`` (one GPU per process)."""
    if device == "cpu":
        return device
    if device != "cuda":
        raise ValueError(f"--strategy ddp takes --device cpu or cuda (each process takes the GPU of its local rank), "
                         f"not {device}")
    if local_rank >= torch.cuda.device_count():
        raise ValueError(f"--devices asks for a GPU per process but torch sees {torch.cuda.device_count()}")
    return f"cuda:{local_rank}"


@contextlib.contextmanager
def process_group(backend: str, env: RankEnv) -> Iterator[None]:
    """Join the default process group (``env://``: ``MASTER_ADDR``, ``MASTER_PORT``) for the block."""
    dist.init_process_group(backend, init_method="env://", rank=env.rank, world_size=env.world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    """A TCP port free on this machine now (for ``MASTER_PORT`` on one machine)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rank_environments(launch: Launch, environ: dict[str, str] | None = None) -> list[dict[str, str]]:
    """The environment of each process this machine starts: ``torchrun``'s variables for node ``NODE_RANK``."""
    environ = dict(os.environ if environ is None else environ)
    if launch.num_nodes > 1:
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK") if not environ.get(k)]
        if missing:
            raise ValueError(f"--num-nodes {launch.num_nodes}: set {', '.join(missing)} on every machine (the address "
                             "and a free port of the machine with NODE_RANK=0, and this machine's index)")
    node = int(environ.get("NODE_RANK", 0))
    if not 0 <= node < launch.num_nodes:
        raise ValueError(f"NODE_RANK={node} must lie in 0 .. {launch.num_nodes - 1}")
    base = {**environ, LAUNCHER_PID: str(os.getpid()), "MASTER_ADDR": environ.get("MASTER_ADDR") or "127.0.0.1",
            "MASTER_PORT": environ.get("MASTER_PORT") or str(free_port()), "WORLD_SIZE": str(launch.world_size),
            "LOCAL_WORLD_SIZE": str(launch.devices), "NODE_RANK": str(node)}
    return [{**base, "RANK": str(node * launch.devices + i), "LOCAL_RANK": str(i)} for i in range(launch.devices)]


def launch(argv: Sequence[str], settings: Launch, module: str = "inference.train") -> int:
    """Start this machine's ranks as ``python -m <module> <argv>`` with the rank environment, wait for them and
    return the exit code of the first rank here (rank 0 on the first machine), or the first failure's.

    SIGTERM and SIGHUP are passed on to the ranks, which stop after the same step (rank 0 saves a checkpoint); a
    terminal's Ctrl-C reaches them directly. When one rank fails, the others are stopped."""
    envs = rank_environments(settings)
    procs = [subprocess.Popen([sys.executable, "-m", module, *argv], env=env) for env in envs]
    forwarded: list[int] = []

    def forward(signum: int, frame: Any) -> None:
        forwarded.append(signum)
        for p in procs:
            with contextlib.suppress(OSError):
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGHUP)}
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, lambda signum, frame: None)  # the ranks got it too
    try:
        return _wait(procs)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _wait(procs: list[subprocess.Popen], grace: float = 30.0) -> int:
    """Wait for every process; once one fails, stop the rest (SIGTERM, SIGKILL after ``grace`` seconds)."""
    failed_at = None
    while any(p.poll() is None for p in procs):
        if failed_at is None and any(p.returncode not in (None, 0) for p in procs):
            failed_at = time.monotonic()
            for p in procs:
                if p.poll() is None:
                    p.terminate()
        if failed_at is not None and time.monotonic() - failed_at > grace:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.05)
    codes = [p.returncode for p in procs]
    return codes[0] if codes[0] != 0 else next((c for c in codes if c != 0), 0)


def rank_settings(device: str, threads: int | None, env: RankEnv) -> tuple[str, str, int]:
    """``(backend, device, threads)`` of the rank: ``gloo`` on the CPU with the machine's cores split between its
    ranks (unless ``--threads`` says otherwise), ``nccl`` on the GPU of its local rank."""
    device = rank_device(device, env.local_rank)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if threads is None:
        threads = max(1, available_cores() // env.local_world_size)
    return backend, device, threads


def run_rank(cfg: RunConfig, control: RunControl, launch: Launch) -> dict | None:
    """Train one rank of ``cfg``: rank 0 the whole run with its files (:func:`inference.runner.run`), the others
    :func:`inference.runner.follow`. Returns rank 0's metrics, None on the other ranks."""
    env = RankEnv.read(launch)
    if LAUNCHER_PID in os.environ:  # started by launch(): stop (after the step, with a checkpoint) if it dies
        stop_with_parent(int(os.environ[LAUNCHER_PID]))
    backend, device, threads = rank_settings(cfg.device, control.threads, env)
    if backend == "nccl":
        torch.cuda.set_device(device)
    cfg = derive(cfg, device=device)
    control = dataclasses.replace(control, threads=threads, progress=control.progress and env.rank == 0)
    with process_group(backend, env):
        sync = GradientSync(env.rank, env.world_size, cfg.train.seed)
        if env.rank == 0:
            return runner.run(cfg, control, sync)
        try:
            runner.follow(cfg, control, sync)
        except KeyboardInterrupt as err:  # rank 0 says where the run stopped and how to continue it
            raise SystemExit(128 + int(getattr(err, "signum", signal.SIGINT))) from None
    return None


def launch_cli(argv: Sequence[str], args: argparse.Namespace, check: Callable[[argparse.Namespace], object],
               module: str = "inference.train") -> int:
    """A command's ``--strategy ddp`` before any rank exists: ``check(args)`` (the flags, once, in one line on
    error: exit code 2), then :func:`launch`."""
    try:
        settings = Launch.from_args(args)
        check(args)
        return launch(argv, settings, module)
    except USER_ERRORS as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
