"""The fast weight path computes the same function as the grid_sample reference.

``bilinear_taps`` reproduces ``warp_images``; ``warp_filters_gather`` reproduces ``warp_filters``;
``warped_linear`` reproduces ``x @ warp_filters(W, T).mT`` in value and in its gradients (W and eta);
the model's ``warp_impl="gather"`` equals ``warp_impl="grid_sample"``; ``transform_mode="identity"``
(the benchmark floor) equals the model without generators; oneDNN GEMMs equal ``torch.mm``.
"""

from __future__ import annotations

import math

import pytest
import torch
from pyro import poutine

import models.kernels as mt
from inference.cpu import available_cores, configure_cpu
from models import GENERATOR_NAMES, InvariantNet, ModelConfig
from models.kernels import TapGather, bilinear_taps, matmul2d, warp_filters_gather, warped_linear
from models.transforms import NUM_GENERATORS, affine_generators, affine_matrices, warp_filters, warp_images

K = NUM_GENERATORS


def random_T(*lead: int, scale: float = 0.6, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    eta = torch.rand(K, generator=gen, dtype=dtype) * scale + 0.05
    eps = torch.rand(*lead, K, generator=gen, dtype=dtype) * 2 - 1
    return affine_matrices(eta, eps, affine_generators(dtype=dtype))


@pytest.mark.parametrize("shape", [(1, 7, 7), (2, 6, 5), (3, 2, 4)])
def test_bilinear_taps_reproduce_warp_images(shape):
    C, H, W = shape
    T = random_T(5, scale=1.5, dtype=torch.float64)
    img = torch.rand(5, C, H, W, dtype=torch.float64)
    index, weights = bilinear_taps(T, (H, W))
    assert index.shape == weights.shape == (5, H * W, 4) and index.dtype == torch.int64
    assert int(index.min()) >= 0 and int(index.max()) < H * W
    flat = img.reshape(5, C, H * W)
    gathered = torch.gather(flat.unsqueeze(-1).expand(5, C, H * W, 4), 2, index.unsqueeze(1).expand(5, C, H * W, 4))
    out = (gathered * weights.unsqueeze(1)).sum(-1).reshape(5, C, H, W)
    torch.testing.assert_close(out, warp_images(img, T), atol=1e-12, rtol=0)


def test_warp_filters_gather_matches_warp_filters_for_every_shape_combination():
    shape = (2, 6, 5)
    P, S, D = 3, 4, 5
    T = random_T(P, S)
    W = torch.randn(P, D, math.prod(shape))
    for w, t in [(W, T), (W[0], T), (W, T[0]), (W[0], T[1]), (W[0].expand(P, D, -1), T)]:
        torch.testing.assert_close(warp_filters_gather(w, t, shape), warp_filters(w, t, shape), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", ["plain", "particles", "shared-expanded", "per-particle-shared-T"])
def test_warped_linear_matches_reference_values_and_gradients(dtype, case):
    shape = (2, 5, 6)
    P, S, D, B = 3, 4, 6, 7
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-10)
    gen = torch.Generator().manual_seed(1)
    eta = (torch.rand(K, generator=gen, dtype=dtype) * 0.5 + 0.1).requires_grad_()
    G = affine_generators(dtype=dtype)
    W0 = torch.randn(P, D, math.prod(shape), generator=gen, dtype=dtype).requires_grad_()
    x = torch.rand(B, *shape, generator=gen, dtype=dtype)
    eps = torch.rand(P, S, K, generator=gen, dtype=dtype) * 2 - 1
    W, e = {
        "plain": (W0[0], eps[0]),
        "particles": (W0, eps),
        "shared-expanded": (W0[0].expand(P, D, -1), eps),
        "per-particle-shared-T": (W0, eps[0]),
    }[case]

    def both():
        T = affine_matrices(eta, e, G)
        ref = torch.matmul(x.reshape(B, -1), warp_filters(W, T, shape).transpose(-1, -2))
        return ref, warped_linear(x, W, T, shape)

    ref, out = both()
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, **tol)
    probe = torch.randn(ref.shape, generator=gen, dtype=dtype)
    g_ref = torch.autograd.grad((ref * probe).sum(), (eta, W0))
    ref, out = both()
    g_out = torch.autograd.grad((out * probe).sum(), (eta, W0))
    gtol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else tol  # float32 sums over B*S*D*C*H*W terms
    for a, b in zip(g_out, g_ref, strict=True):
        torch.testing.assert_close(a, b, **gtol)
    assert torch.all(g_out[0].abs() > 0), "every generator receives gradient"


def test_gradcheck_eta_and_filters_through_warped_linear():
    f64 = torch.float64
    shape = (1, 5, 5)
    G = affine_generators(dtype=f64)
    gen = torch.Generator().manual_seed(3)
    eps = torch.rand(3, K, generator=gen, dtype=f64) * 2 - 1
    x = torch.rand(4, 25, generator=gen, dtype=f64)
    eta = (torch.rand(K, generator=gen, dtype=f64) * 0.3 + 0.05).requires_grad_()
    W = torch.randn(2, 25, generator=gen, dtype=f64, requires_grad=True)

    def fn(eta_, W_):
        return warped_linear(x, W_, affine_matrices(eta_, eps, G), shape)

    assert torch.autograd.gradcheck(fn, (eta, W), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_gradcheck_tap_gather():
    f64 = torch.float64
    gen = torch.Generator().manual_seed(4)
    table = torch.randn(6, 3, generator=gen, dtype=f64, requires_grad=True)
    index = torch.randint(0, 6, (5, 4), generator=gen)
    weights = torch.rand(5, 4, generator=gen, dtype=f64, requires_grad=True)
    assert torch.autograd.gradcheck(TapGather.apply, (table, index, weights))
    expected = (table[index] * weights.unsqueeze(-1)).sum(1)
    torch.testing.assert_close(TapGather.apply(table, index, weights), expected)


@pytest.mark.parametrize(("angle", "k"), [(math.pi / 2, 1), (-math.pi / 2, -1), (math.pi, 2)])
def test_warped_linear_rotation_by_quarter_turns_is_rot90(angle, k):
    C, H, D, B = 2, 7, 3, 4
    filt = torch.rand(D, C * H * H)
    eta = torch.zeros(K, dtype=torch.float64)
    eta[GENERATOR_NAMES.index("rotate")] = abs(angle)
    eps = torch.zeros(1, K, dtype=torch.float64)
    eps[0, GENERATOR_NAMES.index("rotate")] = math.copysign(1.0, angle)
    T = affine_matrices(eta, eps, affine_generators(dtype=torch.float64))
    x = torch.rand(B, C * H * H)
    rotated = torch.rot90(filt.reshape(D, C, H, H), k, dims=(-2, -1)).reshape(D, -1)
    torch.testing.assert_close(warped_linear(x, filt, T, (C, H, H))[0], x @ rotated.T, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("warp", [warp_filters, warp_filters_gather], ids=["reference", "gather"])
@pytest.mark.parametrize("k", [1, 2, 3, -1])
def test_quarter_turns_of_three_channel_filters_are_rot90_per_channel(warp, k):
    """3-channel (CIFAR-shaped) filters: a turn by k * 90 degrees warps every channel of every filter alike, exactly
    as ``torch.rot90`` does per channel; one transform per sample, shared by the D filters and their channels."""
    C, H, D = 3, 32, 5
    filt = torch.rand(D, C * H * H, generator=torch.Generator().manual_seed(k % 4))
    rotate = GENERATOR_NAMES.index("rotate")
    eta = torch.zeros(K, dtype=torch.float64)
    eta[rotate] = math.pi / 2
    eps = torch.zeros(2, K, dtype=torch.float64)
    eps[:, rotate] = torch.tensor([float(k), 0.0])  # sample 0: k quarter turns; sample 1: the identity
    T = affine_matrices(eta, eps, affine_generators(dtype=torch.float64)).float()
    out = warp(filt, T, (C, H, H)).reshape(2, D, C, H, H)
    expected = torch.rot90(filt.reshape(D, C, H, H), k, dims=(-2, -1))
    torch.testing.assert_close(out[0], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1], filt.reshape(D, C, H, H), atol=1e-5, rtol=0)


@pytest.mark.parametrize("transpose_b", [False, True])
def test_matmul2d_onednn_equals_mm(monkeypatch, transpose_b):
    """Above the size threshold float32 CPU GEMMs may go through oneDNN: same values, same gradients."""
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(256, 300, generator=gen, requires_grad=True)
    b0 = torch.randn(260, 300, generator=gen, requires_grad=True)
    assert 256 * 300 * 260 >= mt.ONEDNN_MIN_MACS
    probe = torch.randn(256, 260, generator=gen)
    outs = {}
    for flag in (True, False):
        monkeypatch.setattr(mt, "USE_ONEDNN", flag)
        b = b0.t() if transpose_b else b0.detach().t().contiguous().requires_grad_()
        y = matmul2d(a, b)
        outs[flag] = (y, *torch.autograd.grad((y * probe).sum(), (a, b)))
    for fast, ref in zip(outs[True], outs[False], strict=True):
        torch.testing.assert_close(fast, ref, atol=1e-3, rtol=1e-4)


# --------------------------------------------------------------------------- the model
def _model(**overrides) -> InvariantNet:
    kwargs = dict(image_shape=(1, 7, 6), hidden=8, num_transforms=3, eta_init=0.4, first_layer_prior=False)
    kwargs.update(overrides)
    return InvariantNet(ModelConfig(**kwargs), num_data=20)


@pytest.mark.parametrize("num_particles", [1, 3])
def test_model_gather_and_grid_sample_warps_agree(num_particles):
    """warp_impl only changes how (W1 o T) x is computed: outputs and eta's gradient agree."""
    fast, ref = _model(warp_impl="gather", learn_eta=False), _model(warp_impl="grid_sample", learn_eta=False)
    gen = torch.Generator().manual_seed(6)
    lead = (num_particles, 1) if num_particles > 1 else ()
    data = {name: torch.randn(*lead, *shape, generator=gen) for name, shape in fast.weight_shapes().items()}
    data["eps"] = torch.rand(*lead, 3, K, generator=gen) * 2 - 1
    x, y = torch.rand(5, 1, 7, 6, generator=gen), torch.randint(0, 10, (5,), generator=gen)
    outs, grads = [], []
    for model in (fast, ref):
        eta = model.eta.detach().clone().requires_grad_()
        model.eta = eta  # eta is a buffer (learn_eta=False): differentiate through it directly
        out = poutine.condition(model, data=data)(x, y)
        outs.append(out)
        grads.append(torch.autograd.grad(out.logsumexp(-1).sum() + out[..., 0].sum(), eta)[0])
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-4, rtol=1e-4)


def test_identity_mode_is_the_unwarped_model_with_S_passes():
    floor, plain = _model(transform_mode="identity"), _model(generators=())
    gen = torch.Generator().manual_seed(7)
    data = {name: torch.randn(shape, generator=gen) for name, shape in floor.weight_shapes().items()}
    data["eps"] = torch.rand(3, K, generator=gen) * 2 - 1
    x, y = torch.rand(5, 1, 7, 6, generator=gen), torch.randint(0, 10, (5,), generator=gen)
    torch.testing.assert_close(poutine.condition(floor, data=data)(x, y), poutine.condition(plain, data=data)(x, y),
                               atol=1e-5, rtol=1e-5)
    W1 = data["W1"].expand(2, *data["W1"].shape)
    logits = floor.transformed_logits(x, W1, data["b1"].expand(2, -1), data["W2"].expand(2, -1, -1),
                                      data["b2"].expand(2, -1), data["eps"].expand(2, -1, -1))
    assert logits.shape == (2, 3, 5, 10)  # P * S forward passes, not one


def test_bad_warp_impl_raises():
    with pytest.raises(ValueError, match="bilinear"):
        ModelConfig(warp_impl="bilinear")


def test_configure_cpu_sets_threads():
    before = torch.get_num_threads()
    try:
        settings = configure_cpu(1, keep_memory=False)
        assert settings == {"threads": 1, "keep_freed_memory": False} and torch.get_num_threads() == 1
        assert available_cores() >= 1
        with pytest.raises(ValueError, match="threads must be a positive integer"):
            configure_cpu(0)
    finally:
        torch.set_num_threads(before)


def test_training_caps_threads_at_the_cores_and_keeps_a_lower_choice(monkeypatch):
    """fit's CPU tuning (the same from Python as from the CLI): more threads than cores are cut to the cores, an
    explicit lower choice stays."""
    from inference import cpu

    before = torch.get_num_threads()
    monkeypatch.setattr(cpu, "available_cores", lambda: 2)
    try:
        torch.set_num_threads(4)
        assert cpu.tune_for_training()["threads"] == 2 and torch.get_num_threads() == 2
        torch.set_num_threads(1)
        assert cpu.tune_for_training()["threads"] == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_non_finite_transforms_give_nan_not_an_index_error():
    """A NaN eta (a diverged run) must surface as NaN outputs, which the training loop reports."""
    T = torch.eye(3).expand(2, 3, 3).clone()
    T[0, 0, 0], T[1, 0, 2] = float("nan"), float("inf")
    index, weights = bilinear_taps(T, (4, 5))
    assert int(index.min()) >= 0 and int(index.max()) < 20
    assert torch.isnan(weights).any(-1).all()
    assert torch.isnan(warped_linear(torch.rand(3, 20), torch.randn(4, 20), T, (1, 4, 5))).any(-1).all()
