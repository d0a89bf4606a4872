"""Posterior diagnostics through ArviZ: the ArviZ adapter (only this package imports ``arviz``).

* :mod:`~inference.diagnostics.arviz_io`: a fitted model + guide as an ``arviz.InferenceData`` (guide draws from
  ``pyro.infer.Predictive``, per-example log-likelihood, predictions, point estimates, training history), netCDF
  save / load, and the accessors that read it back;
* :mod:`~inference.diagnostics.criteria`: PSIS-LOO, WAIC, the direct held-out elpd, ``az.compare``; the guide's
  PSIS k-hat against the model's joint;
* :mod:`~inference.diagnostics.nuts`: a NUTS reference posterior of a small model and the guide beside it;
* :mod:`~inference.diagnostics.figures`: the posterior figures (imported on its own: it needs matplotlib);
* :mod:`~inference.diagnostics.runs`: diagnose a finished run folder (``python -m inference.diagnose`` is its CLI).

Honesty notes, also written into the groups' attributes: the draws are independent draws from q stored as one
chain, so R-hat and ESS say nothing about them (k-hat is the diagnostic that applies); LOO is PSIS-LOO on the
training data with q standing in for the posterior, and the held-out test data are scored apart, directly
(``elpd_test``).
"""

from inference.diagnostics.arviz_io import (
    LOO_NOTE,
    MOMENTS_GROUP,
    POINT_GROUP,
    SITE_DIMS,
    TEST_NOTE,
    TRAINING_GROUP,
    VI_NOTE,
    az,
    class_probabilities,
    eta_values,
    load_inference_data,
    observed,
    save_inference_data,
    site_mean,
    test_labels,
    to_inference_data,
    training_history,
    w1_mean,
)
from inference.diagnostics.criteria import (
    KhatResult,
    compare_models,
    elpd_test,
    guide_khat,
    loo_summary,
    pareto_k_counts,
    pointwise_pareto_k,
    psis_khat,
    test_summary,
    waic_summary,
)
from inference.diagnostics.nuts import (
    compare_with_reference,
    guide_draws_to_inference_data,
    num_divergences,
    nuts_reference,
    reference_summary,
    summary_rhat_ess,
)

__all__ = [
    "LOO_NOTE", "MOMENTS_GROUP", "POINT_GROUP", "SITE_DIMS", "TEST_NOTE", "TRAINING_GROUP", "VI_NOTE", "KhatResult",
    "az", "class_probabilities", "compare_models", "compare_with_reference", "elpd_test", "eta_values", "guide_khat",
    "guide_draws_to_inference_data", "load_inference_data", "loo_summary", "num_divergences", "nuts_reference",
    "observed", "pareto_k_counts", "pointwise_pareto_k", "psis_khat", "reference_summary", "save_inference_data",
    "site_mean", "summary_rhat_ess", "test_labels", "test_summary", "to_inference_data", "training_history", "w1_mean",
    "waic_summary",
]
