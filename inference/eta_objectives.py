"""What sets eta: the paper's ELBO, the model's evidence, or held-out data (``TrainConfig.eta_objective``).

With a point-estimated first layer the paper's objective (Eq. 8) bounds ``log p(y | x, W1, eta)`` at a W1 fitted
to the same examples; nothing charges W1's weights for fitting them without the invariance, so it prefers less
invariance than the data hold (README, "When can the ELBO set eta?"). Three objectives:

``elbo`` (the paper)
    eta and the guide maximise one ELBO on the whole training set.

``evidence`` (recommended for relaxed invariance)
    eta and the *evidence guide* q_ev, a mean-field Gaussian over every weight (W1 included), maximise
    ``ELBO(q_ev, eta) = E_q_ev log p(y | x, theta, eta) - KL(q_ev || p) <= log p(y | x, eta)``, in which W1's KL
    term is the Occam factor a point estimate lacks; the *predictive guide* (``hybrid`` or ``paper``) is fitted
    at that eta and makes the predictions (LILA's division of labour, Immer et al. 2022). Schedules:
    :class:`EvidenceEtaLoss` (``joint``) and :class:`SequentialEvidenceLoss` (``sequential``, recommended).

``heldout``
    The guide fits part A of the training set with eta held fixed; eta maximises ``E_q log p(y_B | x_B, theta,
    eta)`` on the held-out part B, a bound on the conditional marginal likelihood of Lotfi et al. (2022) with q
    in place of the exact posterior (:class:`HeldOutEtaLoss`).

In every case eta's gradient is the partial derivative at the current guide. Shapes: ``x (B, C, H, W)``, ``y (B,)``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from enum import StrEnum

import torch
from pyro import poutine
from pyro.infer import Trace_ELBO

from guides.factory import eta_guide_of
from inference.data import Split
from inference.draws import blank_image
from models.network import InvariantNet
from models.priors import EtaPrior


class EtaObjective(StrEnum):
    """What eta maximises (see the module docstring)."""

    ELBO = "elbo"
    EVIDENCE = "evidence"
    HELDOUT = "heldout"


class EvidenceSchedule(StrEnum):
    """How the ``evidence`` objective's two guides share the training steps."""

    JOINT = "joint"  # both guides every step, the predicting one at the current eta (MAP in W1)
    SEQUENTIAL = "sequential"  # first eta and the evidence guide, then the predicting guide at the final eta


@contextlib.contextmanager
def eta_held(model: InvariantNet, *guides: Callable | None) -> Iterator[None]:
    """Within this block eta passes no gradient: the model's eta parameter (empirical Bayes) and q(eta) of
    every guide with an :class:`~guides.meanfield.EtaGuide` piece (full Bayes) are used as they are."""
    pieces = {id(e): e for e in map(eta_guide_of, guides) if e is not None}
    with contextlib.ExitStack() as stack:
        stack.enter_context(model.eta_frozen())
        for piece in pieces.values():
            stack.enter_context(piece.frozen())
        yield


def hide_eta(model: InvariantNet, guide: Callable) -> tuple[Callable, Callable]:
    """``(model, guide)`` with eta's parameters hidden from the optimiser (SVI steps what a trace records).

    Empirical Bayes: the model's ``eta`` param; full Bayes: the parameters of the guide's q(eta) piece.
    Hidden parameters get no Adam step at all, so momentum from earlier steps cannot move them.
    """
    if model.config.eta_prior is EtaPrior.NONE:
        return poutine.block(model, hide=["eta"]), guide
    piece = eta_guide_of(guide)
    if piece is None:
        raise ValueError("this guide has no separate q(eta) to hold fixed (use the 'normal', 'hybrid' or 'paper' "
                         "family under full Bayes)")
    prefix = f"{piece._pyro_name}."
    return model, poutine.block(guide, hide_fn=lambda msg: msg["type"] == "param" and msg["name"].startswith(prefix))


class SequentialEvidenceLoss:
    """Loss of one SVI step of the ``evidence`` objective on the ``sequential`` schedule.

    Empirical Bayes in its textbook order, over ``2 * num_steps`` steps of one guide each (the compute of
    ``num_steps`` joint steps):

    1. while ``predicting`` is False: eta and the evidence guide maximise the evidence ELBO
       (the predicting guide is not run);
    2. then (``fit`` sets ``predicting``): the predicting guide maximises its ELBO with eta fixed at
       the value of step 1 and W1's prior masked (W1 a hyperparameter, the paper's ReLU network), so the
       network that predicts trains for all of its steps at the learned invariance. eta is hidden from
       the optimiser in this phase, so its Adam momentum cannot move it.

    Under full Bayes (``eta_prior="uniform"``) step 1 learns q(eta), which the two guides share, and
    step 2 holds q(eta) fixed in the same way: the predicting guide trains at eta ~ q(eta).

    Its value is the current phase's negative ELBO. Call it as SVI's loss: ``loss(model, guide, x, y)``.
    """

    def __init__(self, elbo: Trace_ELBO, evidence_guide: Callable) -> None:
        self.elbo = elbo
        self.evidence_guide = evidence_guide
        self.predicting = False

    def __call__(self, model: InvariantNet, guide: Callable, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not self.predicting:
            return self.elbo.differentiable_loss(model, self.evidence_guide, x, y)
        with eta_held(model, guide), model.first_layer_prior_masked():
            return self.elbo.differentiable_loss(*hide_eta(model, guide), x, y)


def reported_guide(objective: Callable, model: InvariantNet, guide: Callable
                   ) -> tuple[Callable, contextlib.AbstractContextManager]:
    """The guide whose ELBO a training step's loss reports, and the model context that ELBO is taken in.

    The loss of every objective is one guide's negative ELBO: ``guide``'s (``elbo``, ``heldout``: on the
    fitting part, ``evidence`` joint: the predicting guide at the held eta), or on the sequential schedule the
    evidence guide's in phase 1 and, in phase 2, the predicting guide's with W1's prior masked.
    """
    if isinstance(objective, SequentialEvidenceLoss):
        if not objective.predicting:
            return objective.evidence_guide, contextlib.nullcontext()
        return guide, model.first_layer_prior_masked()
    return guide, contextlib.nullcontext()


def split_holdout(data: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """Split ``data`` into a fitting part A and a held-out part B of about ``fraction * N`` examples.

    The split is class-stratified (each class gives the same fraction, so a class-sorted set gives a
    balanced B) and fixed by ``seed``.

    Returns
    -------
    (Split, Split)
        A and B, each with images ``(N_part, C, H, W)`` and labels ``(N_part,)`` in their original order.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"the held-out fraction must lie in (0, 1), got {fraction}")
    gen = torch.Generator().manual_seed(int(seed))
    y = data.y.cpu()
    held = []
    for c in torch.unique(y):
        idx = torch.nonzero(y == c).flatten()
        take = int(round(fraction * len(idx)))
        held.append(idx[torch.randperm(len(idx), generator=gen)[:take]])
    mask = torch.zeros(len(y), dtype=torch.bool)
    mask[torch.cat(held)] = True
    if mask.all() or not mask.any():
        raise ValueError(f"a held-out fraction of {fraction} leaves one part of the {len(y)} examples empty")
    mask = mask.to(data.x.device)
    return Split(data.x[~mask], data.y[~mask]), Split(data.x[mask], data.y[mask])


def heldout_loglik(model: InvariantNet, guide: Callable, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``sum_b log p(y_b | x_b, theta, eta)`` for one draw theta ~ q and one set of eps, differentiable in eta only.

    The guide is run without gradients, so nothing the guide owns receives one.
    """
    with torch.no_grad():
        guide_trace = poutine.trace(guide).get_trace(x, y)
    log_p = poutine.replay(model, trace=guide_trace)(x, None)  # (B, classes) normalised log-probabilities
    return log_p.gather(-1, y[:, None]).sum()


class HeldOutEtaLoss:
    """Loss of one SVI step of the ``heldout`` objective.

    Its value is the negative ELBO of the fitting minibatch (what the progress bar and the loss history
    show); its gradient moves the guide by that ELBO and eta by the held-out log-likelihood, scaled to
    the whole held-out part (``num_heldout / batch``). Call it as SVI's loss:
    ``loss(model, guide, x, y, x_heldout, y_heldout)``.
    """

    def __init__(self, elbo: Trace_ELBO, num_heldout: int) -> None:
        self.elbo = elbo
        self.num_heldout = int(num_heldout)

    def __call__(self, model: InvariantNet, guide: Callable, x: torch.Tensor, y: torch.Tensor,
                 x_heldout: torch.Tensor, y_heldout: torch.Tensor) -> torch.Tensor:
        with model.eta_frozen():
            loss_fit = self.elbo.differentiable_loss(model, guide, x, y)
        loss_eta = -heldout_loglik(model, guide, x_heldout, y_heldout) * (self.num_heldout / len(y_heldout))
        return loss_fit + (loss_eta - loss_eta.detach())  # value: the fitting ELBO; gradient: both terms


class EvidenceEtaLoss:
    """Loss of one SVI step of the ``evidence`` objective.

    The gradient moves the predictive guide by its objective with eta held fixed, and the evidence
    guide and eta by the evidence ELBO, both on the same minibatch. The value is the predictive
    guide's loss (the evidence ELBO is estimated apart, see :func:`inference.evaluate.elbo_estimate`).
    Call it as SVI's loss: ``loss(model, guide, x, y)``.
    """

    def __init__(self, elbo: Trace_ELBO, evidence_guide: Callable) -> None:
        self.elbo = elbo
        self.evidence_guide = evidence_guide

    def __call__(self, model: InvariantNet, guide: Callable, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with model.eta_frozen():
            loss_fit = self.elbo.differentiable_loss(model, guide, x, y)
        loss_ev = self.elbo.differentiable_loss(model, self.evidence_guide, x, y)
        return loss_fit + (loss_ev - loss_ev.detach())


def eta_dict(model: InvariantNet, guide: Callable | None = None, num_samples: int = 64) -> dict[str, float]:
    """Current effective eta per generator (0 for inactive generators).

    Under full Bayes (``eta_prior != "none"``) eta is a latent variable: this is then the median of
    ``num_samples`` draws from q(eta), taken without disturbing the global random stream.
    """
    if model.config.eta_prior is EtaPrior.NONE:
        return dict(zip(model.generator_names, model.eta_effective.detach().cpu().tolist(), strict=True))
    piece = eta_guide_of(guide)
    if piece is not None:  # a separate q(eta): its exact median
        eta = piece.median() * model.generator_mask
        return dict(zip(model.generator_names, eta.cpu().tolist(), strict=True))
    if guide is None:
        raise ValueError("under full Bayes eta is latent: pass the guide to read q(eta)")
    eta = _eta_draws(model, guide, num_samples).median(0).values * model.generator_mask
    return dict(zip(model.generator_names, eta.cpu().tolist(), strict=True))


def _eta_draws(model: InvariantNet, guide: Callable, num_samples: int) -> torch.Tensor:
    """``(num_samples, K)`` draws of eta from a guide that covers it inside its own family, taken without
    disturbing the global random stream."""
    x = blank_image(model)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        return torch.stack([poutine.trace(guide).get_trace(x, None, 1).nodes["eta"]["value"].reshape(-1)
                            for _ in range(num_samples)])


def eta_interval(model: InvariantNet, guide: Callable, level: float = 0.9) -> dict[str, list[float]] | None:
    """Full Bayes: the central ``level`` interval of q(eta) per generator, ``{name: [low, high]}``; None otherwise.

    Exact for a separate q(eta) piece; from 256 draws (without disturbing the global random stream) for
    guides that cover eta inside their own family.
    """
    if model.config.eta_prior is EtaPrior.NONE:
        return None
    lo_q, hi_q = (1 - level) / 2, (1 + level) / 2
    piece = eta_guide_of(guide)
    if piece is not None:
        low, high = piece.quantile(lo_q), piece.quantile(hi_q)
    else:
        draws = _eta_draws(model, guide, 256)
        low, high = torch.quantile(draws, lo_q, dim=0), torch.quantile(draws, hi_q, dim=0)
    low, high = (t * model.generator_mask for t in (low, high))
    return {name: [float(a), float(b)] for name, a, b in zip(model.generator_names, low, high, strict=True)}
