"""inference/uncertainty.py: the posterior predictive against the rotation of the input, and its figure."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from guides import make_guide
from inference import plots
from inference.draws import draw_posterior, predictive_outputs
from inference.uncertainty import entropy, rotate_images, rotation_sweep
from models import InvariantNet, ModelConfig


def tiny(generators=("rotate",), eta_init=0.1):
    model = InvariantNet(ModelConfig(hidden=8, num_transforms=3, generators=generators, eta_init=eta_init,
                                     first_layer_prior=False), num_data=20)
    return model, make_guide(model, "hybrid")


def test_rotating_by_a_quarter_turn_is_rot90_and_by_zero_the_identity():
    x = torch.rand(3, 1, 28, 28)
    torch.testing.assert_close(rotate_images(x, 90), torch.rot90(x, 1, (-2, -1)), atol=1e-5, rtol=0)
    torch.testing.assert_close(rotate_images(x, 0), x, atol=1e-5, rtol=0)  # grid round-off only


def test_entropy_of_uniform_and_certain_predictions():
    log_p = torch.log(torch.tensor([[0.1] * 10, [1.0] + [0.0] * 9]))
    torch.testing.assert_close(entropy(log_p), torch.tensor([math.log(10), 0.0]))


def test_sweep_at_zero_degrees_is_the_posterior_predictive_of_the_inputs():
    model, guide = tiny()
    x, y = torch.rand(12, 1, 28, 28), torch.randint(0, 10, (12,))
    draws = draw_posterior(model, guide, 5)
    sweep = rotation_sweep(model, draws, x, y, [0.0, 90.0])
    _, log_probs = predictive_outputs(model, draws, x)  # (M, N, C)
    predictive = torch.logsumexp(log_probs, 0) - math.log(5)
    assert sweep.accuracy[0] == pytest.approx((predictive.argmax(-1) == y).float().mean().item())
    assert sweep.nll[0] == pytest.approx(-predictive.gather(1, y[:, None]).mean().item(), rel=1e-5)
    assert sweep.entropy[0] == pytest.approx(entropy(predictive).mean().item(), rel=1e-5)
    assert (sweep.mutual_information >= -1e-6).all() and sweep.num_draws == 5 and sweep.num_classes == 10
    one = rotation_sweep(model, draw_posterior(model, guide, 1), x, y, [0.0])
    assert one.mutual_information[0] == pytest.approx(0.0, abs=1e-6)  # one draw cannot disagree with itself


def test_a_network_averaged_over_every_quarter_turn_predicts_the_same_at_every_quarter_turn():
    model, guide = tiny(eta_init=math.pi)
    draws = draw_posterior(model, guide, 3, num_transforms=4)
    draws.eps = torch.zeros(1, 4, 6)
    draws.eps[0, :, 2] = torch.tensor([-1.0, -0.5, 0.0, 0.5])  # the orbit of quarter turns: exact invariance
    x, y = torch.rand(10, 1, 28, 28), torch.randint(0, 10, (10,))
    sweep = rotation_sweep(model, draws, x, y, [-180.0, -90.0, 0.0, 90.0, 180.0])
    np.testing.assert_allclose(sweep.nll, sweep.nll[2], rtol=1e-4)
    np.testing.assert_allclose(sweep.entropy, sweep.entropy[2], rtol=1e-4)


def test_rotation_figure_marks_the_data_range_and_the_learned_extent(tmp_path):
    model, guide = tiny()
    x, y = torch.rand(6, 1, 28, 28), torch.randint(0, 10, (6,))
    sweep = rotation_sweep(model, draw_posterior(model, guide, 2), x, y, [-180.0, 0.0, 180.0])
    fig = plots.plot_rotation_sweep({"run": sweep}, tmp_path / "rot.png", data_range_deg=90, eta_deg={"run": 60})
    assert (tmp_path / "rot.png").stat().st_size > 2000
    acc, ent = fig.axes
    np.testing.assert_allclose(acc.lines[0].get_ydata(), 100 * sweep.accuracy)
    np.testing.assert_allclose(ent.lines[1].get_ydata(), sweep.mutual_information)
    assert sorted(line.get_xdata()[0] for line in acc.lines if line.get_linestyle() == ":") == [-60, 60]
    labels = [t.get_text() for t in acc.get_legend().get_texts()]
    assert any("within +-90 deg" in t for t in labels)
    assert sweep.entropy.max() < ent.get_ylim()[1] <= math.log(10) * 1.02  # up to the uniform prediction's entropy
    assert acc.get_xlabel() == "rotation of the input (degrees)"
