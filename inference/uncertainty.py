"""Predictive uncertainty against a rotation of the input: what invariance buys, seen through the posterior predictive.

For test images rotated by each angle phi, the posterior predictive over M guide draws, p(y | x, D) ~= (1/M)
sum_m p(y | x, theta_m), gives the accuracy, the NLL and three entropies per example (in nats):

* total: H[p(y | x, D)], the uncertainty of the prediction;
* expected: (1/M) sum_m H[p(y | x, theta_m)], the part each network already has (aleatoric);
* mutual information: total - expected, the part from disagreement between weight draws (epistemic).

An invariant network gives flat curves over the angles it averages over; a network that never saw a digit upside
down loses accuracy and gains uncertainty there. The draws come from :mod:`inference.draws` (the one prediction
path). Shapes: ``x (N, C, H, W)``, ``y (N,)``, per-draw log-probabilities ``(M, N, classes)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from inference.draws import GuideDraws, predictive_outputs
from models.network import InvariantNet
from models.transforms import affine_generators, warp_images

ROTATION_GENERATOR = affine_generators(("rotate",))[0]  # (3, 3)


def rotate_images(x: torch.Tensor, degrees: float) -> torch.Tensor:
    """Images ``(N, C, H, W)`` rotated by ``degrees`` about their centre as the rotated datasets rotate them
    (:func:`inference.data.transformation_matrices`): ``x'(p) = x(R_phi p)``, bilinear, zeros outside; 90 degrees
    is ``torch.rot90(x, 1, (-2, -1))``."""
    T = torch.linalg.matrix_exp(math.radians(degrees) * ROTATION_GENERATOR.to(x))
    return warp_images(x, T.expand(len(x), 3, 3))


def entropy(log_p: torch.Tensor) -> torch.Tensor:
    """H = -sum_c p_c log p_c over the last dimension, in nats (0 log 0 = 0)."""
    return -(log_p.exp() * log_p.clamp_min(-1e30)).sum(-1)


@dataclass(frozen=True)
class RotationSweep:
    """Posterior-predictive metrics per input rotation: every field but the counts is ``(A,)``, one per angle.

    Attributes
    ----------
    angles_deg : rotations of the input, in degrees.
    accuracy, nll : of the posterior predictive over the M draws.
    entropy, expected_entropy, mutual_information : means over the examples, in nats (module docstring).
    num_examples, num_draws, num_classes : N, M and the number of classes (the largest entropy is its log).
    """

    angles_deg: np.ndarray
    accuracy: np.ndarray
    nll: np.ndarray
    entropy: np.ndarray
    expected_entropy: np.ndarray
    mutual_information: np.ndarray
    num_examples: int
    num_draws: int
    num_classes: int

    def as_dict(self) -> dict:
        """JSON-friendly (lists of floats)."""
        return {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in asdict(self).items()}


@torch.no_grad()
def rotation_sweep(model: InvariantNet, draws: GuideDraws, x: torch.Tensor, y: torch.Tensor,
                   angles_deg: Sequence[float], batch_size: int = 250) -> RotationSweep:
    """The posterior predictive of ``draws`` on ``x`` rotated by each of ``angles_deg`` (:class:`RotationSweep`)."""
    rows = {k: [] for k in ("accuracy", "nll", "entropy", "expected_entropy", "mutual_information")}
    for phi in angles_deg:
        _, log_probs = predictive_outputs(model, draws, rotate_images(x, phi), batch_size=batch_size)  # (M, N, C)
        predictive = torch.logsumexp(log_probs, 0) - math.log(log_probs.shape[0])  # (N, C)
        total, expected = entropy(predictive), entropy(log_probs).mean(0)  # (N,)
        rows["accuracy"].append((predictive.argmax(-1) == y).float().mean().item())
        rows["nll"].append(-predictive.gather(1, y[:, None]).mean().item())
        rows["entropy"].append(total.mean().item())
        rows["expected_entropy"].append(expected.mean().item())
        rows["mutual_information"].append((total - expected).mean().item())
    return RotationSweep(np.asarray(angles_deg, dtype=float), *(np.asarray(v) for v in rows.values()),
                         num_examples=len(y), num_draws=draws.num_draws, num_classes=int(log_probs.shape[-1]))
