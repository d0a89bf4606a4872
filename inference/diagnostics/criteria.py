"""Predictive criteria of an InferenceData: PSIS-LOO, WAIC, the direct held-out elpd, model comparison, PSIS k-hat.

LOO here is PSIS-LOO on variational draws over held-out test examples (see ``LOO_NOTE``): it reweights draws
from q by 1 / p(y_n | theta) to leave out an example q never saw, so ``elpd_loo`` comes out below the direct
estimate ``elpd_test`` = sum_n log mean_m p(y_n | x_n, theta_m), the one to quote for test data. With few draws
ArviZ's Pareto-k threshold min(1 - 1 / log10 M, 0.7) is stricter than 0.7.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from inference.diagnostics.arviz_io import LOO_NOTE, Recorded, az, observed


def elpd_test(idata: az.InferenceData) -> tuple[float, float]:
    """Direct held-out estimate: sum_n log mean_m p(y_n | x_n, theta_m), and its standard error."""
    ll = idata.log_likelihood["y"].stack(sample=("chain", "draw")).transpose("obs", "sample").values.astype(np.float64)
    pointwise = np.logaddexp.reduce(ll, axis=1) - math.log(ll.shape[1])
    return float(pointwise.sum()), float(math.sqrt(len(pointwise)) * pointwise.std())


def pareto_k_counts(k: np.ndarray, good_k: float = 0.5) -> dict[str, int]:
    """Counts of Pareto k in the usual bins, and ``k<=good_k``: below ArviZ's threshold for this many draws."""
    k = np.asarray(k, dtype=float)
    return {"k<=0.5": int((k <= 0.5).sum()), "0.5<k<=0.7": int(((k > 0.5) & (k <= 0.7)).sum()),
            "0.7<k<=1": int(((k > 0.7) & (k <= 1.0)).sum()), "k>1": int((k > 1.0).sum()),
            "k<=good_k": int((k <= good_k).sum())}


def loo_summary(idata: az.InferenceData) -> dict[str, Any]:
    """PSIS-LOO of ``idata`` with Pareto-k counts.

    Returns
    -------
    dict
        ``elpd_loo``, ``se``, ``p_loo``, ``elpd_test`` (direct held-out), ``elpd_test_se``, ``n_draws``,
        ``n_obs``, ``good_k`` (ArviZ's threshold min(1 - 1/log10 M, 0.7)), ``pareto_k`` (counts),
        ``max_k``, ``warnings`` and ``note``.
    """
    with Recorded() as rec:
        loo = az.loo(idata, pointwise=True)
    k = np.asarray(loo.pareto_k)
    test, test_se = elpd_test(idata)
    good_k = float(loo.get("good_k", 0.7))
    return {"elpd_loo": float(loo.elpd_loo), "se": float(loo.se), "p_loo": float(loo.p_loo),
            "elpd_test": test, "elpd_test_se": test_se, "n_draws": int(loo.n_samples),
            "n_obs": int(loo.n_data_points), "good_k": good_k, "pareto_k": pareto_k_counts(k, good_k),
            "max_k": float(np.max(k)), "warnings": rec.messages, "note": LOO_NOTE}


def pointwise_pareto_k(idata: az.InferenceData) -> np.ndarray:
    """PSIS-LOO Pareto k of every observation ``(obs,)``."""
    with Recorded():
        return np.asarray(az.loo(idata, pointwise=True).pareto_k)


def waic_summary(idata: az.InferenceData) -> dict[str, Any]:
    """WAIC of ``idata``: ``elpd_waic``, ``se``, ``p_waic``, ``warnings``."""
    with Recorded() as rec:
        waic = az.waic(idata, pointwise=True)
    return {"elpd_waic": float(waic.elpd_waic), "se": float(waic.se), "p_waic": float(waic.p_waic),
            "warnings": rec.messages}


def compare_models(idatas: Mapping[str, az.InferenceData], ic: str = "loo") -> tuple[Any, list[str]]:
    """``az.compare`` of models evaluated on the same observations.

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
            raise ValueError(f"{name!r} was evaluated on other observations than {first_name!r}: "
                             "compare runs on the same dataset and test subset")
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
