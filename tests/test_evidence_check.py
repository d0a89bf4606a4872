"""The check that the bound which set eta fits the labels better than a prediction that ignores the inputs."""

from __future__ import annotations

import math

import pyro.distributions as dist
import pytest
import torch

from inference.eta_objectives import EtaObjective
from inference.evidence_check import EvidenceCheck, check_evidence, sets_eta_by_bound
from inference.report import run_row, summarise, unsupported_notes
from models import ModelConfig
from models.likelihoods import CategoricalLikelihood, GaussianLikelihood
from models.network import InvariantNet


def test_constant_loglik_of_labels_is_minus_their_entropy():
    y = torch.tensor([0, 0, 1, 2])  # frequencies 1/2, 1/4, 1/4 and class 3 absent
    expected = 0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)
    assert CategoricalLikelihood(4, "probs").constant_loglik(y) == pytest.approx(expected, abs=1e-12)
    balanced = torch.arange(200) % 10
    assert CategoricalLikelihood(10, "probs").constant_loglik(balanced) == pytest.approx(-math.log(10), abs=1e-12)


def test_no_constant_class_distribution_beats_the_label_frequencies():
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 5, (300,), generator=gen)
    best = CategoricalLikelihood(5, "logits").constant_loglik(y)
    for _ in range(20):
        q = torch.rand(5, generator=gen, dtype=torch.float64) + 1e-3
        q = q / q.sum()  # some other distribution over the classes
        assert q.log()[y].mean().item() <= best + 1e-12
    assert best <= 0


def test_gaussian_constant_loglik_is_the_label_means_and_no_other_constant_beats_it():
    gen = torch.Generator().manual_seed(1)
    y = 3 + 2 * torch.randn(500, 3, generator=gen, dtype=torch.float64)
    likelihood = GaussianLikelihood(3, "probs", noise_scale=0.7)
    at_mean = dist.Normal(y.mean(0), 0.7).to_event(1).log_prob(y).mean().item()
    assert likelihood.constant_loglik(y) == pytest.approx(at_mean, rel=1e-10)
    for shift in (0.1, -0.5, 2.0):
        assert dist.Normal(y.mean(0) + shift, 0.7).to_event(1).log_prob(y).mean().item() < at_mean


def test_check_flags_a_bound_at_or_below_the_constant_prediction_and_says_why():
    chance = -math.log(10)
    fits = EvidenceCheck(expected_loglik=-1.9, constant_loglik=chance)
    assert fits.fits_labels and fits.warning() is None
    for loglik in (chance, -2.48):
        check = EvidenceCheck(expected_loglik=loglik, constant_loglik=chance)
        assert not check.fits_labels
        assert f"{loglik:.3f}" in check.warning() and f"{chance:.3f}" in check.warning()
        assert EvidenceCheck.from_dict(check.to_dict()) == check


def test_check_uses_the_models_likelihood_on_the_training_labels():
    model = InvariantNet(ModelConfig(hidden=4, num_transforms=1, generators=("rotate",)), num_data=20)
    y = torch.arange(20) % 10
    check = check_evidence(model, y, expected_loglik=-2.5)
    assert check.constant_loglik == pytest.approx(-math.log(10), abs=1e-12)
    assert not check.fits_labels


@pytest.mark.parametrize(("learn", "generators", "objective", "expected"), [
    (True, ("rotate",), EtaObjective.EVIDENCE, True),
    (True, ("rotate",), EtaObjective.ELBO, True),
    (True, ("rotate",), EtaObjective.HELDOUT, False),  # the held-out log-likelihood set eta, not a bound
    (False, ("rotate",), EtaObjective.ELBO, False),  # eta fixed
    (True, (), EtaObjective.EVIDENCE, False),  # no eta at all
])
def test_the_check_applies_where_a_bound_chose_eta(learn, generators, objective, expected):
    assert sets_eta_by_bound(learn, generators, objective) is expected


def metrics_with(check: dict | None) -> dict:
    return {"config": {"model": {"generators": ["rotate"], "learn_eta": True}, "guide": {"kind": "hybrid"}},
            "eta": {"rotate": 3.0}, "test_accuracy": 0.6, "test_nll": 1.2, "elbo_per_example": -11.0,
            "train_seconds": 1.0, "elbo_terms": {"expected_loglik": -2.5, "kl": 8.5}, "evidence_check": check}


def test_comparison_tables_name_the_configurations_whose_eta_the_kl_alone_chose():
    flagged = EvidenceCheck(-2.5, -math.log(10)).to_dict()
    fine = EvidenceCheck(-1.9, -math.log(10)).to_dict()
    rows = [run_row("translated", "inv-rotation", seed, metrics_with(check))
            for seed, check in enumerate((flagged, flagged, fine))]
    rows.append(run_row("translated", "inv-none", 0, metrics_with(None)))  # no bound set eta: no verdict
    summary = summarise(rows)
    assert summary[0]["eta_unsupported_mean"] == pytest.approx(2 / 3)
    assert math.isnan(summary[1]["eta_unsupported_mean"])
    notes = "\n".join(unsupported_notes(summary))
    assert "inv-rotation: eta is not the data's in 67% of the seeds checked" in notes
    assert "inv-none" not in notes
