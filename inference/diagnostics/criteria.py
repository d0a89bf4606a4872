"""Criteria: PSIS-LOO and WAIC on the training data, the direct elpd of the held-out test data, model comparison of
InferenceData; the guide's PSIS k-hat.

LOO is what it is made for, the training data (``log_likelihood``, see ``LOO_NOTE``): each example's expected log
predictive density when it is left out of the fit, from the guide's draws reweighted by 1 / p(y_n | theta_m).
The test data were never in the fit, so their elpd is estimated directly, ``elpd_test`` = sum_n log mean_m
p(y_n | x_n, theta_m) (``predictions``). A Pareto k above ArviZ's threshold min(1 - 1 / log10 M, 0.7) for M draws
(0.34 for 32 draws, 0.63 for 500) marks an example whose reweighting is unreliable; few draws lower the
threshold, so a verdict needs a few hundred.

The guide's k-hat (:func:`guide_khat`) uses the importance weights log p(y, theta_m) - log q(theta_m), theta every
latent site but eps (drawn from its prior in model and guide, its density cancels). Sites the guide point-estimates
(``AutoDelta``: the hybrid guide's W1, b1) have log q = 0 and are held fixed: the k-hat is that of q over the random
sites against the posterior *given* the point estimates.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pyro import poutine

from inference.diagnostics.arviz_io import LOO_NOTE, TEST_NOTE, Recorded, az, observed
from inference.draws import GuideDraws, blank_image, predictive_outputs, site_kinds
from models.network import InvariantNet


def elpd_test(idata: az.InferenceData) -> tuple[float, float]:
    """Direct held-out estimate over the test examples: sum_n log mean_m p(y_n | x_n, theta_m), and its standard
    error."""
    ll = idata.predictions["log_lik"].stack(sample=("chain", "draw")).transpose("test_obs", "sample").values
    ll = ll.astype(np.float64)
    pointwise = np.logaddexp.reduce(ll, axis=1) - math.log(ll.shape[1])
    return float(pointwise.sum()), float(math.sqrt(len(pointwise)) * pointwise.std())


def test_summary(idata: az.InferenceData) -> dict[str, Any]:
    """The held-out test set's ``elpd`` (:func:`elpd_test`), ``se``, ``per_example``, ``n_obs``, ``n_draws``,
    ``note``."""
    elpd, se = elpd_test(idata)
    n = int(idata.predictions.sizes["test_obs"])
    return {"elpd": elpd, "se": se, "per_example": elpd / n, "n_obs": n,
            "n_draws": int(idata.predictions.sizes["draw"]), "note": TEST_NOTE}


def pareto_k_counts(k: np.ndarray, good_k: float) -> dict[str, int]:
    """Counts of Pareto k in ArviZ's categories for this many draws: good (``k<=good_k``), bad (``good_k<k<=1``),
    very bad (``k>1``)."""
    k = np.asarray(k, dtype=float)
    return {"k<=good_k": int((k <= good_k).sum()), "good_k<k<=1": int(((k > good_k) & (k <= 1.0)).sum()),
            "k>1": int((k > 1.0).sum())}


def _loo(idata: az.InferenceData) -> tuple[Any, list[str]]:
    with Recorded() as rec:
        loo = az.loo(idata, pointwise=True)
    return loo, rec.messages


def loo_summary(idata: az.InferenceData) -> dict[str, Any]:
    """PSIS-LOO of the training data of ``idata`` with Pareto-k counts.

    Returns
    -------
    dict
        ``elpd_loo``, ``se``, ``p_loo``, ``per_example``, ``n_draws``, ``n_obs``, ``good_k`` (ArviZ's threshold
        min(1 - 1/log10 M, 0.7)), ``pareto_k`` (counts, :func:`pareto_k_counts`), ``max_k``, ``warnings``, ``note``.
    """
    loo, messages = _loo(idata)
    k = np.asarray(loo.pareto_k)
    good_k = float(loo.get("good_k", 0.7))
    return {"elpd_loo": float(loo.elpd_loo), "se": float(loo.se), "p_loo": float(loo.p_loo),
            "per_example": float(loo.elpd_loo) / int(loo.n_data_points), "n_draws": int(loo.n_samples),
            "n_obs": int(loo.n_data_points), "good_k": good_k, "pareto_k": pareto_k_counts(k, good_k),
            "max_k": float(np.max(k)), "warnings": messages, "note": LOO_NOTE}


def pointwise_pareto_k(idata: az.InferenceData) -> tuple[np.ndarray, float]:
    """PSIS-LOO Pareto k of every training example ``(obs,)``, and ArviZ's threshold ``good_k`` for this many
    draws."""
    loo, _ = _loo(idata)
    return np.asarray(loo.pareto_k), float(loo.get("good_k", 0.7))


def waic_summary(idata: az.InferenceData) -> dict[str, Any]:
    """WAIC of ``idata``: ``elpd_waic``, ``se``, ``p_waic``, ``warnings``."""
    with Recorded() as rec:
        waic = az.waic(idata, pointwise=True)
    return {"elpd_waic": float(waic.elpd_waic), "se": float(waic.se), "p_waic": float(waic.p_waic),
            "warnings": rec.messages}


def compare_models(idatas: Mapping[str, az.InferenceData], ic: str = "loo") -> tuple[Any, list[str]]:
    """``az.compare`` of models fitted to the same training observations (by PSIS-LOO on them).

    Returns
    -------
    (pandas.DataFrame, list of str)
        ArviZ's table (rank, elpd_<ic>, p_<ic>, elpd_diff, weight, se, dse, warning) and the warnings
        it raised (Pareto k above its threshold...).

    Raises
    ------
    ValueError
        When the models were evaluated on different observations.
    """
    (first_name, first), *rest = idatas.items()
    for name, idata in rest:
        if observed(idata).shape != observed(first).shape or not np.array_equal(observed(idata), observed(first)):
            raise ValueError(f"{name!r} was fitted to other observations than {first_name!r}: "
                             "compare runs on the same training data")
    with Recorded() as rec:
        table = az.compare(dict(idatas), ic=ic)
    return table, rec.messages


def psis_khat(log_weights: np.ndarray | torch.Tensor) -> float:
    """Pareto k-hat of importance weights given as log weights ``(M,)`` (``az.psislw``, reff = 1).

    Equal weights (q proportional to p) give -inf, where ``az.psislw`` would report inf from a degenerate fit.
    """
    if isinstance(log_weights, torch.Tensor):
        log_weights = log_weights.detach().cpu().numpy()
    lw = np.asarray(log_weights, dtype=np.float64).reshape(-1)
    if np.ptp(lw) <= 1e-9 * max(1.0, float(np.abs(lw).max())):
        return float("-inf")
    with Recorded():
        _, k = az.psislw(lw - lw.max(), reff=1.0)
    return float(k)


# --------------------------------------------------------------------------- the guide's k-hat
@dataclass
class KhatResult:
    """PSIS k-hat of the guide against the model's joint.

    Attributes
    ----------
    khat : float
        Pareto k-hat (NaN when the guide has no random site).
    log_weights : np.ndarray
        ``(M,)`` log p(y, theta_m) - log q(theta_m), not normalised.
    sites : list of str
        The random sites the weights are over; the point-estimated ones are conditioned on.
    ess : float
        Importance-sampling effective sample size 1 / sum w_m^2 of the normalised weights.
    shared_eps : bool
        Whether one eps served every draw (see :func:`guide_khat`).
    seconds : float
    note : str
    """

    khat: float
    log_weights: np.ndarray
    sites: list[str]
    ess: float
    shared_eps: bool
    seconds: float
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly summary (without the weights; a non-finite k-hat is None, spelled out in ``khat_str``)."""
        return {"khat": self.khat if math.isfinite(self.khat) else None, "khat_str": f"{self.khat:.3g}",
                "num_draws": int(self.log_weights.size), "sites": self.sites,
                "ess": self.ess if math.isfinite(self.ess) else None, "shared_eps": self.shared_eps,
                "seconds": round(self.seconds, 2), "note": self.note}


def guide_khat(
    model: InvariantNet, guide: Callable, x: torch.Tensor, y: torch.Tensor, num_draws: int = 100,
    num_transforms: int | None = None, shared_eps: bool = False, batch_size: int = 250,
) -> KhatResult:
    """PSIS k-hat of the guide over ``num_draws`` draws; a guide with no random site (``map``, ``ml``) gets NaN.

    Parameters
    ----------
    x, y : torch.Tensor
        The training data the guide was fitted to (the joint is over all of it, unscaled).
    num_draws : int
        M importance draws (k-hat is unreliable below ~100).
    num_transforms : int, optional
        S inside the likelihood (default: the model's).
    shared_eps : bool
        False: each draw has its own eps, the k-hat of q(theta) p(eps) against p(theta, eps | y).
        True: one eps for all draws, the k-hat of q(theta) against p(theta | y, eps_0); with a point-estimated
        first layer the features are then computed once (many times faster on the paper's network).
    """
    start = time.perf_counter()
    kinds = site_kinds(model, guide)
    random = [n for n, k in kinds.items() if k == "random"]
    if not random:
        return KhatResult(float("nan"), np.zeros(0), [], float("nan"), shared_eps, time.perf_counter() - start,
                          "not applicable: the guide point-estimates every site (log q is 0, all weights equal)")
    draws = draw_with_log_q(model, guide, num_draws, num_transforms, shared_eps)
    log_lik, _ = predictive_outputs(model, draws, x, y, batch_size)
    lw = (log_prior(model, draws) + log_lik.sum(1).cpu() - draws.log_q.cpu()).numpy().astype(np.float64)
    w = np.exp(lw - np.logaddexp.reduce(lw))
    point = [n for n, k in kinds.items() if k == "point"]
    note = ("weights over " + ", ".join(random)
            + (f", conditioned on the point estimates {', '.join(point)}" if point else "")
            + ("; one eps shared by all draws" if shared_eps else "; fresh eps per draw (extended space)"))
    return KhatResult(psis_khat(lw), lw, random, float(1.0 / np.sum(w**2)), shared_eps,
                      time.perf_counter() - start, note)


@torch.no_grad()
def draw_with_log_q(
    model: InvariantNet, guide: Callable, num_draws: int, num_transforms: int | None = None,
    shared_eps: bool = False,
) -> GuideDraws:
    """M guide draws with log q(theta_m) over the random sites (point estimates contribute log 1 = 0).

    eps is left out of log q (q(eps) = p(eps) cancels); with ``shared_eps`` one eps ``(1, S, K)`` drawn from
    the prior serves every draw.
    """
    S = model.config.num_transforms if num_transforms is None else int(num_transforms)
    kinds = site_kinds(model, guide)
    random: dict[str, list[torch.Tensor]] = {n: [] for n, k in kinds.items() if k == "random"}
    eps, log_q, point = [], [], {}
    for _ in range(int(num_draws)):
        trace = poutine.trace(guide).get_trace(blank_image(model), None, S)
        trace.compute_log_prob(site_filter=lambda name, site: name != "eps")
        log_q.append(_sum_log_prob(trace, exclude=("eps",)))
        for name in random:
            random[name].append(trace.nodes[name]["value"])
        eps.append(trace.nodes["eps"]["value"])
        point = {n: trace.nodes[n]["value"] for n, k in kinds.items() if k == "point"}
    eps_t = model.eps_prior(S).sample().unsqueeze(0) if shared_eps else torch.stack(eps)
    return GuideDraws({n: torch.stack(v) for n, v in random.items()}, point, eps_t, torch.stack(log_q).reshape(-1))


@torch.no_grad()
def log_prior(model: InvariantNet, draws: GuideDraws) -> torch.Tensor:
    """log p(theta_m) over the latent sites but eps, ``(M,)``, with the model's masks (a hybrid guide's W1
    prior is masked out)."""
    out = []
    for m in range(draws.num_draws):
        values = draws.draw(m)
        values["eps"] = model.eps_prior(1).sample()  # S = 1: the prior needs no transformations
        trace = poutine.trace(poutine.condition(model, data=values)).get_trace(blank_image(model), None, 1)
        trace.compute_log_prob(site_filter=lambda name, site: name not in ("eps", "obs"))
        out.append(_sum_log_prob(trace, exclude=("eps", "obs")))
    return torch.stack(out).reshape(-1).cpu()


def _sum_log_prob(trace: poutine.Trace, exclude: tuple[str, ...]) -> torch.Tensor:
    return sum((site["log_prob_sum"] for name, site in trace.nodes.items()
                if site["type"] == "sample" and name not in exclude), torch.tensor(0.0))
