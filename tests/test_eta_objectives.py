"""The three eta objectives: which term moves which parameter, the held-out split, and training end to end.

Reference implementations: each combined loss is compared with its two terms computed one by one
under the same random numbers (same seed, same order of draws).
"""

from __future__ import annotations

import pyro
import pytest
import torch
from pyro import poutine

from guides.factory import eta_guide_of, make_evidence_guide, make_guide
from guides.meanfield import EVIDENCE_GUIDE_NAME
from inference.data import Split
from inference.eta_objectives import (
    EvidenceEtaLoss,
    HeldOutEtaLoss,
    SequentialEvidenceLoss,
    eta_dict,
    heldout_loglik,
    reported_guide,
    split_holdout,
)
from inference.optim import named_params
from inference.svi import TrainConfig, fit, make_elbo
from models import InvariantNet, ModelConfig


def tiny_model(num_data: int = 40, first_layer_prior: bool = False, eta_prior: str = "none") -> InvariantNet:
    cfg = ModelConfig(image_shape=(1, 8, 8), hidden=6, num_transforms=3, generators=("rotate", "translate_x"),
                      eta_init=0.3, first_layer_prior=first_layer_prior, eta_prior=eta_prior)
    return InvariantNet(cfg, num_data=num_data)


def batch(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def grads(*modules) -> dict[str, torch.Tensor]:
    """Gradients of every parameter of ``modules`` (zeros where none arrived), then cleared."""
    out = {}
    for name, p in named_params(*modules).items():
        out[name] = torch.zeros_like(p) if p.grad is None else p.grad.clone()
        p.grad = None
    return out


def assert_grads_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


def test_eta_frozen_keeps_the_value_and_blocks_the_gradient():
    model = tiny_model()
    eta = model.eta_effective
    with model.eta_frozen():
        frozen = model.eta_effective
    assert torch.equal(frozen, eta) and not frozen.requires_grad and eta.requires_grad
    assert not model._eta_frozen  # restored on exit


def test_heldout_loss_moves_the_guide_by_the_fitting_elbo_and_eta_by_the_heldout_loglik():
    model = tiny_model()
    guide = make_guide(model, "hybrid")
    elbo = make_elbo(TrainConfig())
    (x, y), (xh, yh) = batch(8, 1), batch(5, 2)
    guide(x, y)  # create the guide's parameters

    pyro.set_rng_seed(3)  # reference: the two terms one after the other, with the same random numbers
    with model.eta_frozen():
        elbo.differentiable_loss(model, guide, x, y).backward()
    fit_grads = grads(model, guide)
    (-heldout_loglik(model, guide, xh, yh) * (20 / 5)).backward()
    eta_grad = grads(model, guide)["eta"]

    pyro.set_rng_seed(3)
    loss = HeldOutEtaLoss(elbo, num_heldout=20)(model, guide, x, y, xh, yh)
    loss.backward()
    got = grads(model, guide)
    assert got["eta"].abs().sum() > 0 and fit_grads["eta"].abs().sum() == 0
    torch.testing.assert_close(got.pop("eta"), eta_grad)
    fit_grads.pop("eta")
    assert_grads_equal(got, fit_grads)
    pyro.set_rng_seed(3)
    with model.eta_frozen():
        assert loss.item() == pytest.approx(elbo.differentiable_loss(model, guide, x, y).item(), rel=1e-6)


def test_evidence_loss_moves_eta_and_the_evidence_guide_by_the_evidence_elbo_only():
    model = tiny_model(first_layer_prior=True)
    guide = make_guide(model, "hybrid")
    evidence = make_evidence_guide(model, "hybrid")
    elbo = make_elbo(TrainConfig())
    x, y = batch(8, 1)
    guide(x, y)
    evidence(x, y)

    pyro.set_rng_seed(4)
    with model.eta_frozen():
        fit_loss = elbo.differentiable_loss(model, guide, x, y)
    fit_loss.backward()
    want = grads(model, guide, evidence)
    elbo.differentiable_loss(model, evidence, x, y).backward()
    ev = grads(model, guide, evidence)
    for name, g in ev.items():  # the evidence ELBO reaches eta and the evidence guide, nothing of the other guide
        if name == "eta" or name.startswith(EVIDENCE_GUIDE_NAME):
            want[name] = want[name] + g
        else:
            assert g.abs().sum() == 0, name

    pyro.set_rng_seed(4)
    loss = EvidenceEtaLoss(elbo, evidence)(model, guide, x, y)
    loss.backward()
    assert loss.item() == pytest.approx(fit_loss.item(), rel=1e-6)
    got = grads(model, guide, evidence)
    assert got["eta"].abs().sum() > 0
    assert_grads_equal(got, want)


def test_evidence_guide_needs_a_point_estimate_guide_and_the_first_layer_prior():
    with pytest.raises(ValueError, match="already has one objective"):
        make_evidence_guide(tiny_model(first_layer_prior=True), "normal")
    with pytest.raises(ValueError, match="first_layer_prior=True"):
        make_evidence_guide(tiny_model(first_layer_prior=False), "hybrid")


def test_full_bayes_evidence_shares_q_eta_on_the_sequential_schedule_only():
    x, y = batch(40, 0)
    model = tiny_model(first_layer_prior=True, eta_prior="uniform")
    guide = make_guide(model, "hybrid")
    with pytest.raises(ValueError, match="pass predicting_guide"):
        make_evidence_guide(model, "hybrid")
    evidence = make_evidence_guide(model, "hybrid", predicting_guide=guide)
    with pytest.raises(ValueError, match="'sequential' schedule"):
        fit(model, guide, Split(x, y), TrainConfig(num_steps=2, eta_objective="evidence"), progress=False,
            evidence_guide=evidence)
    own = make_guide(model, "meanfield")  # q(eta) inside its own family: nothing to hold apart
    with pytest.raises(ValueError, match="burn-in"):
        fit(model, own, Split(x, y), TrainConfig(num_steps=2, eta_burnin=1), progress=False)


def test_split_holdout_is_stratified_disjoint_and_complete():
    y = torch.arange(10).repeat_interleave(20)  # class-sorted, like the shared subset
    x = torch.arange(200, dtype=torch.float).reshape(200, 1, 1, 1)
    fit_part, held = split_holdout(Split(x, y), 0.25, seed=0)
    assert len(held) == 50 and len(fit_part) == 150
    assert torch.bincount(held.y, minlength=10).tolist() == [5] * 10
    ids = torch.cat([fit_part.x.flatten(), held.x.flatten()]).long()
    assert sorted(ids.tolist()) == list(range(200))
    again = split_holdout(Split(x, y), 0.25, seed=0)[1]
    other = split_holdout(Split(x, y), 0.25, seed=1)[1]
    assert torch.equal(again.x, held.x) and not torch.equal(other.x, held.x)
    with pytest.raises(ValueError, match="must lie in"):
        split_holdout(Split(x, y), 0.0, seed=0)


@pytest.mark.parametrize("objective", ["heldout", "evidence"])
def test_fit_checks_what_each_objective_needs(objective):
    model = tiny_model(first_layer_prior=objective == "evidence")
    guide = make_guide(model, "hybrid")
    x, y = batch(40, 0)
    cfg = TrainConfig(num_steps=2, batch_size=8, eta_objective=objective)
    with pytest.raises(ValueError, match=f"exactly when the eta objective is '{objective}'"):
        fit(model, guide, Split(x, y), cfg, progress=False)


def test_unknown_objective_and_bad_fraction_are_one_line_errors():
    with pytest.raises(ValueError, match="unknown eta objective 'bayes'"):
        TrainConfig(eta_objective="bayes")
    with pytest.raises(ValueError, match="eta_holdout must lie in"):
        TrainConfig(eta_holdout=1.0)


@pytest.mark.parametrize("schedule, stop_at, eta_prior", [("joint", 3, "none"), ("sequential", 3, "none"),
                                                         ("sequential", 8, "none"), ("sequential", 3, "uniform"),
                                                         ("sequential", 8, "uniform")])
def test_evidence_fit_trains_both_guides_and_resumes_exactly(tmp_path, schedule, stop_at, eta_prior):
    """Interrupted and resumed (on the sequential schedule in either phase, with eta a parameter or under full
    Bayes), an evidence run ends where the uninterrupted one ends."""
    from inference.state import CheckpointPolicy
    from inference.stopping import TrainingInterrupted

    x, y = batch(40, 0)
    data = Split(x, y)
    cfg = TrainConfig(num_steps=6, batch_size=8, eta_objective="evidence", log_every=1, evidence_schedule=schedule,
                      eta_burnin=2)

    def run(folder, stop_at=None):
        pyro.set_rng_seed(0)
        model = tiny_model(first_layer_prior=True, eta_prior=eta_prior)
        guide = make_guide(model, "hybrid")
        evidence = make_evidence_guide(model, "hybrid", predicting_guide=guide)
        policy = CheckpointPolicy(folder, every=1)

        def stop(step, loss):
            if step == stop_at:
                raise KeyboardInterrupt

        from inference.checkpoint import find_latest_valid

        start = find_latest_valid(folder)[0] if stop_at is None and folder.exists() else None
        try:
            result = fit(model, guide, data, cfg, callback=stop, progress=False, checkpoints=policy, start=start,
                         evidence_guide=evidence)
        except TrainingInterrupted:
            return None
        return result, {k: v.detach().clone() for k, v in named_params(model, guide, evidence).items()}

    full, params = run(tmp_path / "a")
    assert any(k.startswith(EVIDENCE_GUIDE_NAME) for k in params) and any(k.startswith("AutoGuideList") for k in params)
    assert run(tmp_path / "b", stop_at=stop_at) is None
    resumed, params_b = run(tmp_path / "b")
    assert resumed.eta_history == full.eta_history
    assert resumed.elbo_history == full.elbo_history
    for name, value in params.items():
        torch.testing.assert_close(params_b[name], value, rtol=0, atol=0, msg=name)


def test_evidence_guide_has_its_own_learning_rate_and_follows_lr_by_default():
    from inference.svi import make_optimizer

    model = tiny_model(first_layer_prior=True)
    guide, evidence = make_guide(model, "hybrid"), make_evidence_guide(model, "hybrid")
    x, y = batch(8, 1)
    guide(x, y)
    evidence(x, y)
    for evidence_lr, want in ((None, 5e-3), (5e-2, 5e-2)):
        optim = make_optimizer(TrainConfig(lr=5e-3, eta_lr=3e-2, evidence_lr=evidence_lr, cosine=False))
        lrs = {name: optim.lr_of(name) for name in named_params(model, guide, evidence)}  # per parameter
        assert lrs["eta"] == 3e-2
        assert {v for k, v in lrs.items() if k.startswith(EVIDENCE_GUIDE_NAME + ".")} == {want}
        assert {v for k, v in lrs.items() if k != "eta" and not k.startswith(EVIDENCE_GUIDE_NAME)} == {5e-3}


@pytest.mark.parametrize("objective, eta_prior", [("elbo", "none"), ("evidence", "none"), ("elbo", "uniform"),
                                                  ("evidence", "uniform")])
def test_eta_burnin_holds_eta_at_its_start_then_lets_it_move(objective, eta_prior):
    """Under full Bayes the burn-in holds q(eta) (the median recorded here, and its scale)."""
    x, y = batch(40, 0)
    model = tiny_model(first_layer_prior=True, eta_prior=eta_prior)
    guide = make_guide(model, "hybrid")
    evidence = make_evidence_guide(model, "hybrid", predicting_guide=guide) if objective == "evidence" else None
    start = torch.tensor(list(eta_dict(model, guide).values()))
    cfg = TrainConfig(num_steps=8, batch_size=8, eta_objective=objective, log_every=1, eta_burnin=4, eta_lr=0.1,
                      evidence_schedule="sequential" if eta_prior == "uniform" else "joint")
    scales, snapshots = [], {}
    piece = eta_guide_of(guide)

    def record_scale(step, loss):
        if piece is not None:
            scales.append(piece.scales.eta.detach().clone())
        snapshots[step] = {k: v.detach().clone() for k, v in named_params(model, guide, evidence or guide).items()}

    result = fit(model, guide, Split(x, y), cfg, progress=False, evidence_guide=evidence, callback=record_scale)
    rows = [torch.tensor([r[g] for g in model.generator_names]) for r in result.eta_history]
    if piece is not None:
        for scale in scales[:4]:
            torch.testing.assert_close(scale, scales[0], rtol=0, atol=0)
        assert not torch.equal(scales[7], scales[0])
    for row in rows[:4]:  # steps 1..4: eta untouched (the guides train)
        torch.testing.assert_close(row, start, rtol=0, atol=0)
    assert not torch.equal(rows[-1], start)  # after the burn-in eta follows its objective
    moved = [k for k, v in snapshots[4].items() if not torch.equal(v, snapshots[1][k])]
    assert moved and not any(k == "eta" or k.endswith(".eta") for k in moved)  # only the guides trained in steps 2..4


def test_eta_burnin_needs_eta_as_a_learned_parameter():
    model_fixed = InvariantNet(ModelConfig(image_shape=(1, 8, 8), hidden=4, num_transforms=2, learn_eta=False),
                               num_data=40)
    x, y = batch(40, 0)
    with pytest.raises(ValueError, match="burn-in"):
        fit(model_fixed, make_guide(model_fixed, "normal"), Split(x, y), TrainConfig(num_steps=2, eta_burnin=1),
            progress=False)
    with pytest.raises(ValueError, match="eta_burnin"):
        TrainConfig(eta_burnin=-1)


@pytest.mark.parametrize("eta_prior", ["none", "uniform"])
def test_sequential_schedule_learns_eta_first_then_fits_the_predicting_guide_at_that_eta(eta_prior):
    """Under full Bayes the two guides share q(eta): phase 1 learns it, phase 2 holds it."""
    x, y = batch(40, 0)
    model = tiny_model(first_layer_prior=True, eta_prior=eta_prior)
    guide = make_guide(model, "hybrid")
    evidence = make_evidence_guide(model, "hybrid", predicting_guide=guide)
    piece = eta_guide_of(guide)
    assert (piece is not None) == (eta_prior == "uniform") and eta_guide_of(evidence) is piece
    q_eta = [] if piece is None else [f"{piece._pyro_name}.{part}.eta" for part in ("locs", "scales")]
    cfg = TrainConfig(num_steps=5, batch_size=8, eta_objective="evidence", evidence_schedule="sequential",
                      log_every=1, eta_lr=0.1)
    assert cfg.total_steps == 10
    snapshots = {}

    def snap(step, loss):
        snapshots[step] = {k: v.detach().clone() for k, v in named_params(model, guide, evidence or guide).items()}

    result = fit(model, guide, Split(x, y), cfg, callback=snap, progress=False, evidence_guide=evidence)
    assert [r["step"] for r in result.eta_history] == list(range(1, 11))
    eta = [torch.tensor([r[g] for g in model.generator_names]) for r in result.eta_history]
    assert not torch.equal(eta[4], eta[0])  # phase 1 moves eta ...
    for later in eta[5:]:
        torch.testing.assert_close(later, eta[4], rtol=0, atol=0)  # ... phase 2 (Adam's momentum included) does not
    first, end1, last = snapshots[1], snapshots[5], snapshots[10]
    predicting = [k for k in last if k.startswith("AutoGuideList") and k not in q_eta]
    assert predicting and not any(k in end1 for k in predicting)  # the predicting guide is not run in phase 1
    for k in (k for k in end1 if k.startswith(EVIDENCE_GUIDE_NAME) or k in q_eta):
        assert not torch.equal(end1[k], first[k]) or k.endswith("b1")  # the evidence guide trains in phase 1
        torch.testing.assert_close(last[k], end1[k], rtol=0, atol=0)  # and rests in phase 2
    assert any(not torch.equal(last[k], snapshots[6][k]) for k in predicting)  # the predicting guide trains


def test_sequential_predicting_phase_leaves_out_the_first_layer_prior():
    x, y = batch(8, 0)
    model = tiny_model(first_layer_prior=True)
    guide = make_guide(model, "hybrid")
    guide(x, y)
    trace = poutine.trace(poutine.replay(model, trace=poutine.trace(guide).get_trace(x, y))).get_trace(x, y)
    with model.first_layer_prior_masked():
        masked = poutine.trace(poutine.replay(model, trace=poutine.trace(guide).get_trace(x, y))).get_trace(x, y)
    trace.compute_log_prob()
    masked.compute_log_prob()
    assert trace.nodes["W1"]["log_prob_sum"] != 0 and masked.nodes["W1"]["log_prob_sum"] == 0
    assert model.config.first_layer_prior  # the evidence guide, outside the block, keeps it


def test_the_recorded_elbo_terms_are_those_of_the_guide_whose_elbo_the_loss_is():
    """Sequential schedule: phase 1 reports the evidence guide's ELBO; phase 2 the predicting guide's, W1's prior
    masked; the other objectives report the guide's own."""
    x, y = batch(8, 0)
    model = tiny_model(first_layer_prior=True)
    guide = make_guide(model, "hybrid")
    evidence = make_evidence_guide(model, "hybrid", predicting_guide=guide)
    guide(x, y)
    loss = SequentialEvidenceLoss(make_elbo(TrainConfig()), evidence)
    assert reported_guide(loss, model, guide)[0] is evidence
    loss.predicting = True
    reported, context = reported_guide(loss, model, guide)
    with context:
        masked = poutine.trace(poutine.replay(model, trace=poutine.trace(guide).get_trace(x, y))).get_trace(x, y)
    masked.compute_log_prob()
    assert reported is guide and masked.nodes["W1"]["log_prob_sum"] == 0
    assert reported_guide(make_elbo(TrainConfig()), model, guide)[0] is guide
    assert reported_guide(EvidenceEtaLoss(make_elbo(TrainConfig()), evidence), model, guide)[0] is guide
