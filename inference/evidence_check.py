"""Is the learned eta the data's doing? The bound that set it, against a prediction that ignores the images.

eta maximises a lower bound on the marginal likelihood (Eq. 6 of the paper),

    ELBO(eta) = E_q[log p(y | x, theta, eta)] - KL(q(theta) || p(theta)).

When the bound's data term is no higher than the log-likelihood of the best prediction that ignores the images
(the labels' own frequencies; -log C, chance, for C balanced classes), q has stopped fitting the labels and the
bound ranks the values of eta by its KL term alone: a wider eta averages the network over more transformations,
which lets q stay nearer the prior at no cost in a fit it does not make. Such an eta says nothing about the
invariance in the data.

This is what happens when the generators offered cannot express the data's transformation (Table 2 in the
README: rotation alone or scale alone on translated digits, where the learned extent goes to the full circle or
to a factor of up to 49 and test accuracy falls to or below that of no invariance), and in none of the other runs
that learned eta in the README's tables and calibration grids. The check is necessary, not sufficient: a bound
above the constant prediction can still prefer a harmful eta.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from inference.eta_objectives import EtaObjective
from models.network import InvariantNet


@dataclass(frozen=True)
class EvidenceCheck:
    """The data term of the bound that set eta against the constant prediction's log-likelihood.

    Parameters
    ----------
    expected_loglik : float
        E_q[log p(y | x, theta, eta)] / N of the bound that set eta, on the training data.
    constant_loglik : float
        Log-likelihood / N of the same labels under the best prediction that ignores the inputs
        (``likelihood.constant_loglik``).
    """

    expected_loglik: float
    constant_loglik: float

    @property
    def fits_labels(self) -> bool:
        """Whether the bound's data term beats the prediction that ignores the images."""
        return self.expected_loglik > self.constant_loglik

    def warning(self) -> str | None:
        """A one-paragraph warning when the check fails, else None."""
        if self.fits_labels:
            return None
        return (f"warning: the bound that set eta fits the training labels no better than a prediction that ignores "
                f"the images (expected log-likelihood {self.expected_loglik:.3f} nats per example, constant "
                f"prediction {self.constant_loglik:.3f}), so it chose eta by its KL term alone: the learned eta is "
                "not evidence of invariance in the data. This happens when the generators cannot express the data's "
                "transformation; offer more of them (e.g. --generators affine) or fix eta.")

    def to_dict(self) -> dict[str, float | bool]:
        """``{"expected_loglik", "constant_loglik", "fits_labels"}`` for ``metrics.json``."""
        return {"expected_loglik": self.expected_loglik, "constant_loglik": self.constant_loglik,
                "fits_labels": self.fits_labels}

    @classmethod
    def from_dict(cls, record: dict) -> EvidenceCheck:
        """Inverse of :meth:`to_dict`."""
        return cls(float(record["expected_loglik"]), float(record["constant_loglik"]))


def sets_eta_by_bound(learn_eta: bool, generators: tuple[str, ...] | list[str], objective: EtaObjective) -> bool:
    """Whether a bound on the marginal likelihood chose eta: eta learned, some generator, not the held-out
    objective (which sets eta by the held-out log-likelihood)."""
    return bool(learn_eta and generators) and EtaObjective(objective) is not EtaObjective.HELDOUT


def check_evidence(model: InvariantNet, y: torch.Tensor, expected_loglik: float) -> EvidenceCheck:
    """The check for a bound whose data term on labels ``y`` (the training set's: ``(N,)``, or ``(N, outputs)``
    for regression) is ``expected_loglik`` per example."""
    return EvidenceCheck(float(expected_loglik), model.likelihood.constant_loglik(y))
