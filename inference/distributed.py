r"""Data-parallel SVI over several processes, GPUs or machines: ``torch.distributed`` around the existing step.

``python -m inference.train ... --strategy ddp --devices N [--num-nodes M]`` trains one run in ``N x M``
processes (ranks), ``gloo`` on the CPU and ``nccl`` on CUDA (one GPU per process, ``cuda:<local rank>``):

* every step, the global minibatch of ``--batch-size`` B (one stream for all ranks, seeded by ``--seed``) is cut
  into ``R`` equal, contiguous shards, one per rank (:meth:`GradientSync.shard`, a distributed sampler);
* each rank draws its own eps and weight noise from a seed derived from ``(--seed, rank, step)``
  (:func:`noise_seed`), so a resumed run meets the same noise without per-rank random states in its checkpoint;
* each rank computes the loss of its shard with the model's usual ``data`` plate scaling, ``N / (B / R)``, and the
  gradients are averaged over the ranks (:class:`DistributedParamAdam`, one ``all_reduce`` per step) before the
  same Adam step on every rank. The average is the gradient of ``N / B sum_(global batch) E log p - KL``: the
  likelihood scaled by the global batch, the KL counted once. With the same noise on every rank it equals the
  single-process gradient on the concatenated batch, up to float rounding (``tests/test_distributed.py``);
* parameters (created before the first step, :meth:`GradientSync.start`) and the optimiser's state are sent from
  rank 0 to the others, so eta and the guides' parameters are identical on every rank after every step;
* rank 0 does all file I/O (``config.json``, histories, checkpoints, ``metrics.json``, the evaluation) and the
  progress bar; a stop signal on any rank stops every rank after the same step (:meth:`GradientSync.after_step`).

Why not PyTorch Lightning (Pyro's ``examples/svi_lightning.py``): its ``Trainer`` owns the loop, the optimiser and
checkpointing, while this project's loop has per-parameter Adam with lazily created parameters, eta burn-in and a
two-phase ``sequential`` schedule, checkpoints whose resume ends exactly where an uninterrupted run ends, and stop
signals after the running step. Moving those into Lightning callbacks would rewrite the loop; the all-reduce of
gradients around the existing step adds a few hooks to :func:`inference.svi.fit` and no dependency.

How the processes are started and joined: :mod:`inference.launch`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np
import pyro
import torch
import torch.distributed as dist
from pyro import poutine

from inference.draws import blank_image
from inference.optim import ParamAdam, named_params

FLAGS = frozenset({"strategy", "devices", "num_nodes", "reuse"})
"""The flags of :func:`add_flags`: how to run, not what (allowed with ``--config`` and ``--resume``)."""


class Strategy(StrEnum):
    """How many processes train one run."""

    SINGLE = "single"  # one process: the default path, unchanged
    DDP = "ddp"  # data-parallel over --devices x --num-nodes processes


def add_flags(parser: argparse.ArgumentParser) -> None:
    """``--strategy``, ``--devices``, ``--num-nodes`` and a grid job's ``--reuse`` in a group of their own."""
    g = parser.add_argument_group("several processes and machines (inference/distributed.py, inference/commands.py)")
    g.add_argument("--strategy", type=Strategy, choices=list(Strategy), default=Strategy.SINGLE,
                   help="'ddp': split every minibatch over --devices x --num-nodes processes and average their "
                   "gradients (gloo on the CPU, nccl on CUDA: one GPU per process); --batch-size is the global batch")
    g.add_argument("--devices", type=int, default=1, metavar="N", help="ddp: processes (CPU) or GPUs per machine")
    g.add_argument("--num-nodes", type=int, default=1, metavar="M",
                   help="ddp: machines; run the same command on each with MASTER_ADDR, MASTER_PORT and NODE_RANK set")
    g.add_argument("--reuse", action="store_true",
                   help="a grid's job (compare --print-commands): leave a finished run in --out as it is, resume one "
                   "with a checkpoint, start the others (so the job may be run again)")


@dataclass(frozen=True)
class Launch:
    """The ``--strategy`` / ``--devices`` / ``--num-nodes`` of a command."""

    strategy: Strategy = Strategy.SINGLE
    devices: int = 1
    num_nodes: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "strategy", Strategy(self.strategy))
        for name in ("devices", "num_nodes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.strategy is Strategy.SINGLE and (self.devices, self.num_nodes) != (1, 1):
            raise ValueError("--devices and --num-nodes need --strategy ddp")

    @property
    def world_size(self) -> int:
        return self.devices * self.num_nodes

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Launch:
        return cls(getattr(args, "strategy", Strategy.SINGLE), getattr(args, "devices", 1),
                   getattr(args, "num_nodes", 1))

    def argv(self) -> list[str]:
        """The flags that give this launch (none for the single process)."""
        if self.strategy is Strategy.SINGLE:
            return []
        nodes = ["--num-nodes", str(self.num_nodes)] if self.num_nodes > 1 else []
        return ["--strategy", self.strategy.value, "--devices", str(self.devices), *nodes]


def requested(args: argparse.Namespace) -> bool:
    """Whether the command asks for data-parallel training."""
    return getattr(args, "strategy", Strategy.SINGLE) == Strategy.DDP


def noise_seed(seed: int, step: int, rank: int) -> int:
    """The seed of rank ``rank``'s noise (eps, weight draws) at ``step`` of a run seeded ``seed`` (< 2**32)."""
    return int(np.random.SeedSequence([int(seed), int(rank), int(step)]).generate_state(1)[0])


class DistributedParamAdam(ParamAdam):
    """:class:`~inference.optim.ParamAdam` whose step first averages the gradients over the ranks of ``group``.

    Only parameters with a gradient take part (the same on every rank: the same code runs), so a parameter without
    one keeps its Adam moments, as in the single-process step. One ``all_reduce`` per dtype and step.
    """

    def __init__(self, lr_of: Callable[[str], float], betas: tuple[float, float] = (0.9, 0.999),
                 num_steps: int | None = None, group: Any = None) -> None:
        super().__init__(lr_of, betas, num_steps)
        self.group = group

    def step(self, taking_part: dict[str, torch.Tensor]) -> None:
        average_gradients([taking_part[name] for name in sorted(taking_part)], self.group)
        super().step(taking_part)


def average_gradients(params: Sequence[torch.Tensor], group: Any = None) -> None:
    """Replace each ``param.grad`` by its mean over the ranks (params without a gradient are left alone)."""
    world = dist.get_world_size(group)
    with_grad = [p for p in params if p.grad is not None]
    for dtype in sorted({p.grad.dtype for p in with_grad}, key=str):
        same = [p for p in with_grad if p.grad.dtype == dtype]
        flat = torch.cat([p.grad.reshape(-1) for p in same])
        dist.all_reduce(flat, group=group)
        flat /= world
        offset = 0
        for p in same:
            n = p.grad.numel()
            p.grad = flat[offset : offset + n].view_as(p.grad).clone()
            offset += n


class GradientSync:
    """One rank's part in data-parallel SVI: what :func:`inference.svi.fit` calls when given ``sync=``.

    Parameters
    ----------
    rank, world_size : int
        This process's rank and the number of ranks R (the default process group must be initialised).
    seed : int
        The run's ``--seed``: the noise seeds derive from it (:func:`noise_seed`).
    same_noise : bool
        Every rank draws the noise of rank 0 (tests: the step then equals the single-process step).
    """

    def __init__(self, rank: int, world_size: int, seed: int, same_noise: bool = False, group: Any = None) -> None:
        self.rank, self.world_size, self.seed, self.same_noise, self.group = rank, world_size, seed, same_noise, group

    def optimizer(self, optim: ParamAdam) -> DistributedParamAdam:
        """``optim``'s settings, its steps on gradients averaged over the ranks."""
        return DistributedParamAdam(optim.lr_of, optim.betas, optim.num_steps, self.group)

    def shard(self, batches: Iterator[torch.Tensor] | None) -> Iterator[torch.Tensor] | None:
        """This rank's contiguous part of every global batch of ``batches`` (R equal parts; rank order)."""
        if batches is None:
            return None

        def parts() -> Iterator[torch.Tensor]:
            for idx in batches:
                size, rest = divmod(len(idx), self.world_size)
                if rest or not size:
                    raise ValueError(f"the batch of {len(idx)} examples does not split into {self.world_size} equal "
                                     "parts: choose --batch-size (and the training set) a multiple of the processes")
                yield idx[self.rank * size : (self.rank + 1) * size]

        return parts()

    def start(self, model: torch.nn.Module, guides: Sequence[Callable], optim: ParamAdam, done: int) -> int:
        """Make every rank start from rank 0's state: create every guide's parameters (their first call), then send
        rank 0's step, optimiser state, parameters and buffers to the others; returns the step to continue after."""
        create_parameters(model, guides)
        state = [done, optim.state_dict() if self.rank == 0 else None]
        dist.broadcast_object_list(state, src=0, group=self.group)
        done = int(state[0])
        if self.rank != 0 and state[1]:
            optim.load_state_dict(state[1], named_params(model, *guides))
        with torch.no_grad():
            for module in (model, *guides):
                for tensor in module.state_dict().values():
                    dist.broadcast(tensor, src=0, group=self.group)
        return done

    def begin_step(self, step: int) -> None:
        """Seed this rank's noise for ``step``."""
        pyro.set_rng_seed(noise_seed(self.seed, step, 0 if self.same_noise else self.rank))

    def after_step(self, loss: float, requested: int | None) -> tuple[float, int | None]:
        """The step's loss averaged over the ranks (the global batch's), and the stop signal the ranks agree on.

        ``requested`` is the signal this rank has received so far (None: none). Every rank gets the same answer,
        so all stop after the same step; a signal that lands on a rank after this exchange is counted at the next
        step's, never acted on alone (the other ranks would wait for it in the next all-reduce).
        """
        signum = requested or 0
        device = "cuda" if dist.get_backend(self.group) == "nccl" else "cpu"
        values = torch.tensor([loss, float(signum > 0), float(signum)], dtype=torch.float64, device=device)
        dist.all_reduce(values, group=self.group)
        agreed = int(round(float(values[2] / values[1]))) if values[1] > 0 else None
        return float(values[0]) / self.world_size, agreed

    def describe(self) -> dict:
        """What ``metrics.json`` records of the launch."""
        return {"strategy": Strategy.DDP.value, "world_size": self.world_size, "backend": dist.get_backend(self.group)}


def create_parameters(model: torch.nn.Module, guides: Sequence[Callable]) -> None:
    """Create every guide's parameters now (autoguides do it on their first call, which the sequential schedule's
    predicting guide meets only half-way through), from the global random stream, which is then put back."""
    x = blank_image(model)
    y = model.likelihood.blank_labels(1, x)
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        for guide in guides:
            poutine.replay(model, trace=poutine.trace(guide).get_trace(x, y))(x, y)
