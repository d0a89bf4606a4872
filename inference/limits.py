"""Bounds on size-like settings, checked before anything large is allocated.

A careless or hostile argument (``--hidden 100000000``, ``--num-transforms 1e6``, ``--threads 100000``) must end in a
one-line error, not in the kernel's out-of-memory killer ending this process, or another one. :func:`check_memory`
estimates the largest memory a training step and the evaluation hold, from the shapes the model works with, and
refuses a run that cannot fit in the memory the machine has available; :func:`check_threads` bounds CPU threads.

The estimate is deliberately rough (within a small factor of what a step allocates, see
``benchmarks/bench_step.py`` for measured peaks): its job is to stop runs that are off by orders of magnitude.
"""

from __future__ import annotations

import torch

from inference.config import RunConfig
from inference.cpu import available_cores
from inference.eta_objectives import EtaObjective
from models.config import TransformMode

MAX_THREADS_PER_CORE = 4
"""More torch threads than this many per core only add waiting; more than that is refused."""

FLOAT_BYTES = 4


def check_threads(threads: int | None) -> None:
    """``--threads``: a positive integer, at most :data:`MAX_THREADS_PER_CORE` per core this process may use."""
    if threads is None:
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"--threads must be a positive integer, got {threads!r}")
    cores = available_cores()
    if threads > MAX_THREADS_PER_CORE * cores:
        raise ValueError(f"--threads {threads} is more than {MAX_THREADS_PER_CORE} per core of the {cores} this "
                         "process may use; more threads than cores only add waiting")


def step_bytes(cfg: RunConfig, num_train: int, num_test: int) -> int:
    """Rough peak memory of training and evaluating ``cfg`` on ``num_train`` / ``num_test`` examples, in bytes.

    Counted: the data (float images), the weights with their guide and Adam state (x 8 per weight; x 2 with the
    evidence guide beside the predicting one), the S warped first-layer filters per particle with their
    gradient (P x S x D x C*H*W, x 3), the hidden activations (P x S x B x D, x 4) and, in inputs mode, the
    transformed images (P x S x B x C*H*W, x 2); for evaluation the same with the evaluation's S and batch.
    """
    m, t = cfg.model, cfg.train
    pixels, D = m.num_pixels, m.hidden
    weights = D * pixels + D + m.num_classes * (D + 1)
    guides = 2 if cfg.train.eta_objective is EtaObjective.EVIDENCE else 1
    batch = min(t.batch_size, num_train)

    def per_pass(particles: int, S: int, B: int) -> int:
        filters = particles * S * D * pixels * 3 if m.transform_mode is TransformMode.WEIGHTS else 0
        images = particles * S * B * pixels * 2 if m.transform_mode is TransformMode.INPUTS else 0
        return filters + images + particles * S * B * D * 4

    train = per_pass(t.num_particles, m.num_transforms, batch)
    draws = cfg.eval.num_samples * num_test * m.num_classes  # the M predictive draws kept for averaging
    evaluate = per_pass(1, cfg.eval.num_transforms, min(500, num_test)) + draws
    return FLOAT_BYTES * ((num_train + num_test) * pixels + 8 * guides * weights + max(train, evaluate))


def available_memory() -> int | None:
    """Memory the machine has available now (``MemAvailable`` of ``/proc/meminfo``), None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_memory(cfg: RunConfig, num_train: int, num_test: int, available: int | None = None) -> None:
    """Refuse a run whose :func:`step_bytes` exceeds the memory available (``available``, default: this machine's;
    on a GPU the device's total memory), naming the settings that decide it."""
    need = step_bytes(cfg, num_train, num_test)
    if available is None:
        available = _device_memory(cfg.device)
    if available is not None and need > available:
        raise ValueError(
            f"this run needs about {need / 2**30:.1f} GiB (hidden {cfg.model.hidden} x {cfg.model.num_pixels} "
            f"pixels, S = {cfg.model.num_transforms} / {cfg.eval.num_transforms} in training / evaluation, batch "
            f"{cfg.train.batch_size}, {cfg.train.num_particles} particle(s), {cfg.eval.num_samples} draws) but "
            f"{available / 2**30:.1f} GiB are available: lower --hidden, --num-transforms, --eval-transforms, "
            "--batch-size, --num-particles or --eval-samples")


def _device_memory(device: str) -> int | None:
    if device.startswith("cuda"):
        if torch.cuda.is_available():
            return torch.cuda.get_device_properties(torch.device(device)).total_memory
        return None
    return available_memory()
