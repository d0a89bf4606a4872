"""Property-based robustness: random shapes and values into the public entry points.

Each entry point either works or raises one of its documented exception types with a message;
no other exception escapes, and the CLI never shows a traceback. Tiny models (hidden <= 8) and
few examples keep these fast.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import math
import tempfile
from pathlib import Path

import pyro
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pyro import poutine

from guides import GuideKind, InitLoc, make_guide
from inference.data import CorruptDataError, DataConfig, DataNotFoundError, DatasetName, load_datasets
from inference.sources import read_idx
from inference.train import cli
from models import InvariantNet, ModelConfig

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])

any_float = st.floats(allow_nan=True, allow_infinity=True, width=32)
small_int = st.integers(min_value=-3, max_value=6)


def with_message(err: BaseException) -> None:
    assert str(err).strip(), f"{type(err).__name__} without a message"


# --------------------------------------------------------------------------- InvariantNet.forward
@st.composite
def forward_inputs(draw):
    C, H, W = draw(st.integers(1, 2)), draw(st.integers(2, 5)), draw(st.integers(2, 5))
    right = (draw(st.integers(0, 3)), C, H, W)
    shape = draw(st.one_of(st.just(right), st.lists(st.integers(0, 5), min_size=0, max_size=5).map(tuple)))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))  # tensors replay with the example
    x = torch.rand(shape, generator=gen)
    if x.numel() and draw(st.booleans()):
        x.view(-1)[draw(st.integers(0, x.numel() - 1))] = draw(any_float)
    B = shape[0] if shape else 0
    y_shape = draw(st.one_of(st.just((B,)), st.lists(st.integers(0, 4), max_size=2).map(tuple)))
    y = torch.randint(-3, 14, y_shape, generator=gen) if draw(st.booleans()) else None
    S = draw(st.one_of(st.none(), small_int))
    return (C, H, W), x, y, S


@FAST
@given(inputs=forward_inputs(), first_layer=st.sampled_from(["relu", "rff"]),
       mode=st.sampled_from(["weights", "inputs"]), averaging=st.sampled_from(["probs", "logits"]))
def test_forward_works_or_raises_value_error(inputs, first_layer, mode, averaging):
    pyro.set_rng_seed(0)
    image_shape, x, y, S = inputs
    model = InvariantNet(ModelConfig(image_shape=image_shape, hidden=4, num_transforms=2, first_layer=first_layer,
                                     transform_mode=mode, averaging=averaging), num_data=10)
    try:
        trace = poutine.trace(model).get_trace(x, y, S)
        trace.log_prob_sum()  # checks observed labels against the support as well
    except ValueError as err:  # the model's own checks and pyro/torch validation
        with_message(err)
        return
    log_p = trace.nodes["_RETURN"]["value"]
    assert log_p.shape == (x.shape[0], 10)


# --------------------------------------------------------------------------- make_guide
@FAST
@given(
    kind=st.one_of(st.sampled_from(list(GuideKind)), st.text(max_size=8)),
    init_loc=st.one_of(st.sampled_from(list(InitLoc)), st.text(max_size=8)),
    init_scale=st.one_of(any_float, st.sampled_from([0.01, 0.1, 1.0])),
    first_layer=st.sampled_from(["relu", "rff"]),
    first_layer_prior=st.booleans(),
    hidden=st.integers(1, 8),
)
def test_make_guide_builds_a_working_guide_or_raises_value_error(kind, init_loc, init_scale, first_layer,
                                                                 first_layer_prior, hidden):
    pyro.set_rng_seed(0)
    model = InvariantNet(ModelConfig(image_shape=(1, 4, 4), hidden=hidden, num_transforms=2, first_layer=first_layer,
                                     first_layer_prior=first_layer_prior), num_data=6)
    try:
        guide = make_guide(model, kind, init_scale=init_scale, init_loc=init_loc)
    except ValueError as err:
        with_message(err)
        return
    x, y = torch.rand(3, 1, 4, 4), torch.tensor([0, 4, 9])
    guide_trace = poutine.trace(guide).get_trace(x, y)
    log_p = poutine.replay(model, trace=guide_trace)(x, y)
    assert log_p.shape == (3, 10) and bool(torch.isfinite(log_p).all())


# --------------------------------------------------------------------------- load_datasets
@SLOW
@given(
    dataset=st.one_of(st.sampled_from(list(DatasetName)), st.text(max_size=10)),
    where=st.sampled_from(["shared", "missing"]),
    train_size=st.one_of(st.none(), st.integers(-2, 60), st.just(10**9)),
    test_size=st.one_of(st.none(), st.integers(-2, 30)),
    rotation_deg=st.one_of(st.none(), any_float),
    translation_px=any_float,
    log_scale=any_float,
    data_seed=st.one_of(st.integers(-2, 5), st.integers(2**32 - 1, 2**40)),
)
def test_load_datasets_loads_valid_data_or_raises_documented_errors(data_dir, dataset, where, train_size, test_size,
                                                                    rotation_deg, translation_px, log_scale,
                                                                    data_seed):
    root = data_dir if where == "shared" else data_dir / "no-such-folder"
    try:
        cfg = DataConfig(dataset=dataset, data_dir=str(root), train_size=train_size, test_size=test_size,
                         rotation_deg=rotation_deg, translation_px=translation_px, log_scale=log_scale,
                         data_seed=data_seed)
        data = load_datasets(cfg)
    except (ValueError, DataNotFoundError) as err:  # CorruptDataError is a ValueError
        with_message(err)
        return
    for split in (data.train, data.test):
        assert split.x.dim() == 4 and split.x.shape[1:] == (1, 28, 28) and split.y.shape == split.x.shape[:1]
        assert bool(torch.isfinite(split.x).all()) and 0 <= split.x.min() and split.x.max() <= 1
        assert 0 <= int(split.y.min()) and int(split.y.max()) <= 9


# --------------------------------------------------------------------------- read_idx
@st.composite
def idx_like_bytes(draw):
    """Random bytes, or a plausible idx header with random dims and a payload of random length."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=80))
    ndim = draw(st.integers(0, 4))
    dims = draw(st.lists(st.integers(0, 6), min_size=ndim, max_size=ndim))
    type_code = draw(st.sampled_from([0x08, 0x08, 0x09, 0x0D]))
    header = bytes([0, 0, type_code, ndim]) + b"".join(d.to_bytes(4, "big") for d in dims)
    want = math.prod(dims)
    length = draw(st.one_of(st.just(want), st.integers(0, want + 3)))
    return header + draw(st.binary(min_size=length, max_size=length))


@FAST
@given(payload=idx_like_bytes(), gz=st.booleans(), cut=st.one_of(st.none(), st.integers(0, 40)))
def test_read_idx_returns_a_tensor_or_raises_corrupt_data_error(tmp_path_factory, payload, gz, cut):
    folder = tmp_path_factory.mktemp("idx")
    path = folder / ("x-ubyte.gz" if gz else "x-ubyte")
    raw = gzip.compress(payload) if gz else payload
    path.write_bytes(raw if cut is None else raw[:cut])
    try:
        out = read_idx(path)
    except CorruptDataError as err:
        with_message(err)
        return
    assert out.dtype == torch.uint8
    assert 4 + 4 * out.dim() + out.numel() == len(payload)


# --------------------------------------------------------------------------- the CLI
SIZE_FLAGS = {  # flag -> values that keep a successful run tiny
    "--hidden": st.integers(-2, 8),
    "--num-transforms": st.integers(-2, 3),
    "--eval-transforms": st.integers(-1, 3),
    "--eval-samples": st.integers(-1, 2),
    "--num-particles": st.integers(-1, 2),
    "--batch-size": st.integers(-2, 16),
    "--num-steps": st.integers(-1, 3),
    "--train-size": st.integers(-1, 30),
    "--test-size": st.integers(-1, 20),
    "--checkpoint-every": st.integers(-1, 3),
    "--keep-checkpoints": st.integers(-1, 3),
    "--seed": st.one_of(st.integers(-1, 3), st.just(2**40)),
    "--data-seed": st.integers(-1, 3),
}
FLOAT_FLAGS = ["--lr", "--eta-lr", "--init-scale", "--eta-init-deg", "--prior-scale", "--rotation-deg",
               "--translation-px", "--log-scale"]
CHOICE_FLAGS = {
    "--dataset": [d.value for d in DatasetName],
    "--guide": [g.value for g in GuideKind],
    "--first-layer": ["relu", "rff"],
    "--transform-mode": ["weights", "inputs"],
    "--averaging": ["probs", "logits"],
    "--generators": ["none", "rotation", "affine", "rotate,shear"],
    "--first-layer-prior": ["on", "off"],
    "--output-layer-prior": ["on", "off"],
}


def mostly(good: st.SearchStrategy, bad: st.SearchStrategy) -> st.SearchStrategy:
    """``good`` three times in four, so that many examples get past validation and train."""
    return st.integers(0, 3).flatmap(lambda i: bad if i == 0 else good)


@st.composite
def cli_overrides(draw) -> list[str]:
    argv: list[str] = []
    for flag in draw(st.lists(st.sampled_from(sorted(SIZE_FLAGS)), max_size=3, unique=True)):
        argv += [flag, str(draw(mostly(SIZE_FLAGS[flag], st.text(max_size=4))))]
    for flag in draw(st.lists(st.sampled_from(FLOAT_FLAGS), max_size=2, unique=True)):
        argv += [flag, str(draw(mostly(st.sampled_from([1e-3, 0.05, 0.5, 2.0, 30.0]), any_float)))]
    for flag in draw(st.lists(st.sampled_from(sorted(CHOICE_FLAGS)), max_size=2, unique=True)):
        argv += [flag, draw(mostly(st.sampled_from(CHOICE_FLAGS[flag]), st.text(max_size=6)))]
    if draw(st.booleans()):
        argv += [draw(st.sampled_from(["--fixed-eta", "--no-vectorize", "--no-cosine"]))]
    return argv


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(overrides=cli_overrides(), where=st.sampled_from(["shared", "shared", "missing"]))
def test_cli_never_shows_a_traceback(data_dir, overrides, where):
    root = data_dir if where == "shared" else data_dir / "no-such-folder"
    with tempfile.TemporaryDirectory() as out:
        argv = ["--data-dir", str(root), "--train-size", "20", "--test-size", "10", "--hidden", "4",
                "--num-steps", "2", "--num-transforms", "2", "--eval-transforms", "2", "--batch-size", "8",
                "--out", str(Path(out) / "run"), "--no-progress", *overrides]  # later flags win
        err, stdout = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(stdout):
            try:
                rc, how = cli(argv), "returned"
            except SystemExit as exit_:  # argparse: a usage line and one error line
                rc, how = exit_.code, "argparse"
    text = err.getvalue()
    last = text.strip().splitlines()[-1] if text.strip() else ""
    event(f"{how} {rc}: {last[:70] if rc else 'ok'}")
    assert "Traceback" not in text, text
    assert rc in (0, 2), (rc, text)
    if how == "argparse":
        assert ": error: " in last, text
    elif rc == 2:
        assert last.startswith("error: ") and len(last) > len("error: "), text
    else:
        assert stdout.getvalue().strip().startswith("{"), stdout.getvalue()


@pytest.mark.parametrize("bad", [["--hidden"], ["--num-steps", "1", "--oops"], ["--out"]])
def test_cli_argparse_errors_exit_2(bad, capsys):
    with pytest.raises(SystemExit) as info:
        cli(bad)
    assert info.value.code == 2 and "error:" in capsys.readouterr().err
