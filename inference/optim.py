"""Adam with a learning rate per parameter and cosine annealing, over module-local parameters.

Parameters live in their modules (``pyro.settings.set(module_local_params=True)``, set by :mod:`models`), so
there is no global param store to read them from. A training step records which parameters take part (the
``param`` sites of its trace, as ``pyro.infer.SVI`` does) and hands them here by name:

* a parameter gets its own ``torch.optim.Adam`` and, with ``cosine``, its own ``CosineAnnealingLR`` over
  ``num_steps`` steps when it first takes part, so parameters created late (the predicting guide on the
  ``sequential`` schedule) anneal over their own steps;
* only parameters that take part in a step are updated and have their gradients zeroed (a parameter hidden
  from a step keeps its value and its Adam moments);
* every schedule advances once per step.

These are the rules of ``pyro.optim.PyroLRScheduler`` with ``SVI``, so a run gives the numbers it gave with
them, to the last digit. The state is plain: per parameter name, an optimiser and a scheduler ``state_dict``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from pyro import poutine
from pyro.infer import ELBO


class ParamAdam:
    """Per-parameter Adam (and cosine schedule) keyed by parameter name.

    Parameters
    ----------
    lr_of : callable
        ``lr_of(name) -> float``, the learning rate of the parameter called ``name``.
    betas : (float, float)
        Adam's betas.
    num_steps : int or None
        ``T_max`` of each cosine schedule; None: a constant learning rate.
    """

    def __init__(self, lr_of: Callable[[str], float], betas: tuple[float, float] = (0.9, 0.999),
                 num_steps: int | None = None) -> None:
        self.lr_of, self.betas, self.num_steps = lr_of, tuple(betas), num_steps
        self.params: dict[str, torch.Tensor] = {}
        self.optimizers: dict[str, torch.optim.Adam] = {}
        self.schedulers: dict[str, torch.optim.lr_scheduler.CosineAnnealingLR] = {}

    def _add(self, name: str, param: torch.Tensor) -> None:
        adam = torch.optim.Adam([param], lr=self.lr_of(name), betas=self.betas)
        self.params[name], self.optimizers[name] = param, adam
        if self.num_steps is not None:
            self.schedulers[name] = torch.optim.lr_scheduler.CosineAnnealingLR(adam, T_max=self.num_steps)

    def step(self, taking_part: Mapping[str, torch.Tensor]) -> None:
        """Update the parameters ``taking_part`` (name -> unconstrained leaf tensor) and zero their gradients."""
        for name, param in taking_part.items():
            if name not in self.optimizers:
                self._add(name, param)
            elif self.params[name] is not param:
                raise ValueError(f"two parameters are called {name!r}: build one model and its guides per optimiser")
            self.optimizers[name].step()
        for param in taking_part.values():
            if param.grad is not None:
                param.grad = torch.zeros_like(param.grad)

    def schedule_step(self) -> None:
        """Advance every cosine schedule by one step."""
        for scheduler in self.schedulers.values():
            scheduler.step()

    def lr(self, name: str) -> float:
        """The current learning rate of parameter ``name``."""
        return self.optimizers[name].param_groups[0]["lr"]

    def state_dict(self) -> dict[str, Any]:
        """``{name: {"optimizer": ..., "scheduler": ...}}`` of plain ``state_dict``s."""
        return {name: {"optimizer": adam.state_dict(),
                       "scheduler": self.schedulers[name].state_dict() if name in self.schedulers else None}
                for name, adam in self.optimizers.items()}

    def load_state_dict(self, state: Mapping[str, Any], params: Mapping[str, torch.Tensor]) -> None:
        """Restore every saved optimiser and schedule onto ``params`` (name -> unconstrained tensor).

        Where ``lr_of`` now gives another initial rate than the saved one (a resume with a changed learning rate),
        the rate is rescaled: the schedule goes on from the same step with the new peak."""
        missing = sorted(set(state) - set(params))
        if missing:
            raise KeyError(f"the saved optimiser state has parameters the model and guides lack: {missing}")
        self.params.clear()
        self.optimizers.clear()
        self.schedulers.clear()
        for name, entry in state.items():
            self._add(name, params[name])
            self.optimizers[name].load_state_dict(entry["optimizer"])
            if entry["scheduler"] is not None:
                self.schedulers[name].load_state_dict(entry["scheduler"])
            self._rescale(name, self.lr_of(name))

    def _rescale(self, name: str, lr: float) -> None:
        """Make ``lr`` the initial rate of ``name``, scaling its current (scheduled) rate alike."""
        group = self.optimizers[name].param_groups[0]
        saved = group.get("initial_lr", group["lr"])
        if saved == lr:
            return
        group["lr"] = group["lr"] * lr / saved if saved > 0 else lr
        group["initial_lr"] = lr
        if name in self.schedulers:
            self.schedulers[name].base_lrs = [lr]


def named_params(*modules: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The unconstrained parameters of Pyro modules (a model, its guides) by their Pyro names.

    The names are those a trace records (``"eta"``, ``"AutoGuideList.0.W1"``, ``"EvidenceGuide.locs.W2"``) and
    that :class:`ParamAdam` and the checkpoints use. Autoguides create their parameters on their first call.
    """
    out: dict[str, torch.Tensor] = {}
    for module in modules:
        prefix = getattr(module, "_pyro_name", "")
        for path, param in module.named_parameters():
            name = ".".join(p for p in (prefix, path.removesuffix("_unconstrained")) if p)
            out.setdefault(name, param)
    return out


def loss_and_grads(objective: Callable, model: Callable, guide: Callable, *batch: torch.Tensor) -> float:
    """The objective's loss on ``batch``, its gradients accumulated (``pyro.infer.SVI``'s two cases: an ``ELBO``
    object, or a callable ``objective(model, guide, *batch)`` returning a differentiable loss)."""
    if isinstance(objective, ELBO):
        return float(objective.loss_and_grads(model, guide, *batch))
    loss = objective(model, guide, *batch)
    loss.backward()
    return float(loss.detach())


def svi_step(objective: Callable, model: Callable, guide: Callable, optim: ParamAdam, *batch: torch.Tensor) -> float:
    """One step of ``optim`` on ``objective``: ``pyro.infer.SVI.step`` over module-local parameters.

    The parameters that take part are the ``param`` sites the step's trace records; a parameter hidden from
    it (``poutine.block``) keeps its value and its optimiser state. A model with a ``project_eta_`` method has
    it called after the step (projected gradient: eta_rotate stays <= pi). Returns the loss; the schedules are
    advanced apart (:meth:`ParamAdam.schedule_step`).
    """
    with poutine.trace(param_only=True) as capture:
        loss = loss_and_grads(objective, model, guide, *batch)
    taking_part = {}
    for name, site in capture.trace.nodes.items():
        value = site["value"]  # constrained; PyroParam values point back to their unconstrained leaf
        taking_part[name] = value.unconstrained() if hasattr(value, "unconstrained") else value
    optim.step(taking_part)
    project = getattr(model, "project_eta_", None)  # eta_rotate <= pi (models.network.InvariantNet.project_eta_)
    if project is not None:
        project()
    return loss


class SVI:
    """``pyro.infer.SVI`` for module-local parameters: ``SVI(model, guide, optim, loss).step(*args)``.

    Pyro's own ``SVI`` reads parameter names from the global param store, which module-local parameters
    bypass (and fails on plain ``nn.Parameter`` attributes, as in ``AutoLowRankMultivariateNormal``).
    """

    def __init__(self, model: Callable, guide: Callable, optim: ParamAdam, loss: Callable) -> None:
        self.model, self.guide, self.optim, self.loss = model, guide, optim, loss

    def step(self, *args: torch.Tensor) -> float:
        """One optimisation step on ``args``; returns the loss."""
        return svi_step(self.loss, self.model, self.guide, self.optim, *args)
