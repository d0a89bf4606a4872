"""Every kind of bad input gets an error that names the problem (one line through the CLI).

Covered here: image shape and channels, labels out of range, NaN/inf in the data, non-positive
S (num_transforms), K (num_particles), batch and hidden sizes, unknown dataset and guide names, a
missing data root and corrupt or truncated idx files. Checkpoints from an incompatible config are
covered in ``test_resume_cli.py`` and ``test_checkpoint.py``.
"""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import pytest
import torch

from guides import make_guide
from inference.data import DataConfig, InvalidDataError, Split, validate_split
from inference.evaluate import accuracy_and_nll
from inference.svi import TrainConfig, fit
from inference.train import cli
from models import InvariantNet, ModelConfig
from tests.made_data import idx_bytes

IMAGE = (1, 5, 5)
N = 8


def tiny_model(**overrides) -> InvariantNet:
    kwargs = dict(image_shape=IMAGE, hidden=8, num_transforms=2)
    kwargs.update(overrides)
    return InvariantNet(ModelConfig(**kwargs), num_data=N)


def good_split() -> Split:
    return Split(torch.rand(N, *IMAGE), torch.arange(N) % 10)


def one_line_error(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


# --------------------------------------------------------------------------- data in memory
@pytest.mark.parametrize(
    ("x", "y", "message"),
    [
        (torch.rand(N, 3, 5, 5), None, "training images have 3 channel(s) but the model expects 1"),
        (torch.rand(N, 1, 6, 5), None, "training images are 6x5 pixels but the model expects 5x5"),
        (torch.rand(N, 25), None, r"training images must have shape (N, C, H, W), got (8, 25)"),
        (None, torch.arange(N) + 3, "training labels must lie in [0, 10), found values from 3 to 10"),
        (None, torch.arange(N) - 1, "training labels must lie in [0, 10), found values from -1 to 6"),
        (None, torch.zeros(N), "training labels must be integers, got torch.float32"),
        (None, torch.zeros(N, 1, dtype=torch.long), "training labels must have shape (8,) to match the images"),
        (torch.rand(N, *IMAGE).index_put_((torch.tensor([2]),), torch.tensor(float("nan"))), None,
         "training images contain 25 NaN/inf value(s)"),
        (torch.rand(N, *IMAGE).index_fill_(0, torch.tensor([0]), float("inf")), None,
         "training images contain 25 NaN/inf value(s)"),
        (torch.zeros(N, *IMAGE, dtype=torch.uint8), None, "training images must be floating point, got torch.uint8"),
    ],
    ids=["channels", "height", "flat", "label-high", "label-negative", "label-float", "label-shape", "nan", "inf",
         "uint8"],
)
def test_fit_checks_the_training_set_once(x, y, message):
    data = good_split()
    data = Split(data.x if x is None else x, data.y if y is None else y)
    model = tiny_model()
    with pytest.raises(InvalidDataError) as info:
        fit(model, make_guide(model), data, TrainConfig(num_steps=1, batch_size=4), progress=False)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)


def test_validate_split_names_the_split():
    with pytest.raises(InvalidDataError, match="test labels must lie in"):
        validate_split(Split(torch.rand(2, *IMAGE), torch.tensor([0, 10])), IMAGE, 10, "test")
    with pytest.raises(InvalidDataError, match="the test set is empty"):
        validate_split(Split(torch.rand(0, *IMAGE), torch.zeros(0, dtype=torch.long)), IMAGE, 10, "test")
    validate_split(good_split(), IMAGE, 10)  # fine


@pytest.mark.parametrize(
    ("x", "message"),
    [
        (torch.rand(2, 3, 5, 5), r"expected images of shape \(B, 1, 5, 5\), got \(2, 3, 5, 5\)"),
        (torch.rand(0, 1, 5, 5), "expected at least one image, got an empty batch"),
        (torch.rand(2, 1, 5, 5, dtype=torch.float64), "expected images of dtype torch.float32"),
    ],
    ids=["channels", "empty", "dtype"],
)
def test_model_forward_checks_shape_and_dtype(x, message):
    with pytest.raises(ValueError, match=message):
        tiny_model()(x)


def test_evaluation_rejects_labels_out_of_range():
    log_p = torch.log_softmax(torch.randn(4, 10), -1)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\), found values from 0 to 12"):
        accuracy_and_nll(log_p, torch.tensor([0, 1, 2, 12]))
    with pytest.raises(ValueError, match=r"expected log_probs \(N, classes\) and labels \(N,\)"):
        accuracy_and_nll(log_p, torch.tensor([0, 1]))


# --------------------------------------------------------------------------- sizes and names in the API
@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: ModelConfig(hidden=0), "hidden must be a positive integer, got 0"),
        (lambda: ModelConfig(hidden=-8), "hidden must be a positive integer, got -8"),
        (lambda: ModelConfig(hidden=2.5), "hidden must be a positive integer, got 2.5"),
        (lambda: ModelConfig(num_transforms=0), "num_transforms must be a positive integer, got 0"),
        (lambda: ModelConfig(eta_init=float("inf")), "eta_init must be > 0 and finite, got inf"),
        (lambda: TrainConfig(batch_size=0), "batch_size must be a positive integer, got 0"),
        (lambda: TrainConfig(batch_size=-1), "batch_size must be a positive integer, got -1"),
        (lambda: TrainConfig(num_particles=0), "num_particles must be a positive integer, got 0"),
        (lambda: TrainConfig(lr=float("nan")), "lr must be > 0 and finite, got nan"),
        (lambda: TrainConfig(betas=(0.9, 1.0)), "betas must be two numbers in [0, 1)"),
        (lambda: TrainConfig(seed=-1), "seed must be an integer in [0, 2**32)"),
        (lambda: DataConfig(dataset="svhn"), "unknown dataset 'svhn'; choose from"),
        (lambda: DataConfig(rotation_deg=float("nan")), "rotation_deg must be a number in [0, 360], got nan"),
        (lambda: DataConfig(train_size=-5), "train_size must be a positive integer, got -5"),
        (lambda: make_guide(tiny_model(), "laplace"), "'laplace' is not a valid GuideKind; guides:"),
        (lambda: make_guide(tiny_model(), "normal", init_scale=float("inf")), "init_scale must be > 0 and finite"),
        (lambda: tiny_model()(torch.rand(2, *IMAGE), num_transforms=0), "num_transforms must be a positive integer"),
    ],
    ids=lambda v: "" if callable(v) else v.split(" must")[0].split(";")[0][:40],
)
def test_bad_sizes_and_names_raise_value_error(make, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make()


# --------------------------------------------------------------------------- through the CLI
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--num-transforms", "0"], "num_transforms must be a positive integer, got 0"),  # S
        (["--num-transforms", "-3"], "num_transforms must be a positive integer, got -3"),
        (["--num-particles", "0"], "num_particles must be a positive integer, got 0"),  # K
        (["--num-particles", "-1"], "num_particles must be a positive integer, got -1"),
        (["--batch-size", "0"], "batch_size must be a positive integer, got 0"),
        (["--batch-size", "-16"], "batch_size must be a positive integer, got -16"),
        (["--hidden", "-8"], "hidden must be a positive integer, got -8"),
        (["--eval-transforms", "-1"], "--eval-transforms, --eval-samples and --elbo-passes must be positive integers"),
        (["--elbo-passes", "0"], "--eval-transforms, --eval-samples and --elbo-passes must be positive integers"),
        (["--rff-blur", "-1"], "rff_blur must be between 0 and the image's size"),
        (["--lr", "nan"], "lr must be > 0 and finite, got nan"),
        (["--eta-lr", "inf"], "eta_lr must be > 0 and finite, got inf"),
        (["--eta-init-deg", "-5"], "eta_init must be > 0 and finite"),
        (["--rotation-deg", "nan"], "rotation_deg must be a number in [0, 360], got nan"),
        (["--seed", "-1"], "seed must be an integer in [0, 2**32), got -1"),
        (["--init-scale", "inf"], "--init-scale must be > 0 and finite, got inf"),
        (["--checkpoint-every", "-1"], "--checkpoint-every must be >= 0"),
        (["--keep-checkpoints", "0"], "--keep-checkpoints >= 1"),
        (["--threads", "0"], "--threads must be a positive integer, got 0"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else "",
)
def test_cli_bad_numbers_are_one_line_errors(tmp_path, capsys, extra, message):
    assert cli(["--data-dir", str(tmp_path), "--out", str(tmp_path / "out"), "--no-progress", *extra]) == 2
    assert message in one_line_error(capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--dataset", "svhn", "argument --dataset: invalid DatasetName value: 'svhn'"),
        ("--guide", "laplace", "argument --guide: invalid GuideKind value: 'laplace'"),
        ("--hidden", "ten", "argument --hidden: invalid int value: 'ten'"),
    ],
)
def test_cli_unknown_names_are_argparse_errors(tmp_path, capsys, flag, value, message):
    with pytest.raises(SystemExit) as info:
        cli(["--out", str(tmp_path), flag, value])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def write_root(root: Path, image_hw: tuple[int, int] = (28, 28), labels: torch.Tensor | None = None) -> Path:
    """A synthetic data root: 20 train and 10 test examples (train images gzipped)."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split, n in (("train", 20), ("t10k", 10)):
        images = torch.randint(0, 256, (n, *image_hw), dtype=torch.uint8)
        y = (torch.arange(n) % 10) if labels is None else labels[:n]
        if split == "train":
            with gzip.open(raw / "train-images-idx3-ubyte.gz", "wb") as f:
                f.write(idx_bytes(images))
        else:
            (raw / f"{split}-images-idx3-ubyte").write_bytes(idx_bytes(images))
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(idx_bytes(y))
    return raw


def cli_on(root: Path, tmp_path: Path) -> int:
    return cli(["--dataset", "mnist", "--data-dir", str(root), "--out", str(tmp_path / "out"), "--hidden", "8",
                "--num-steps", "2", "--num-transforms", "2", "--batch-size", "4", "--no-progress"])


def test_cli_missing_data_root(tmp_path, capsys):
    assert cli_on(tmp_path / "nowhere", tmp_path) == 2
    line = one_line_error(capsys)
    assert f"MNIST not found under {tmp_path / 'nowhere' / 'MNIST' / 'raw'}" in line and "--data-dir" in line


@pytest.mark.parametrize("damage", ["truncated-plain", "truncated-gzip", "bad-magic", "trailing-bytes"])
def test_cli_corrupt_idx_file(tmp_path, capsys, damage):
    raw = write_root(tmp_path / "root")
    plain, gz = raw / "t10k-images-idx3-ubyte", raw / "train-images-idx3-ubyte.gz"
    if damage == "truncated-plain":
        plain.write_bytes(plain.read_bytes()[:-100])
        needle = "truncated"
    elif damage == "truncated-gzip":
        gz.write_bytes(gz.read_bytes()[:200])
        needle = "cannot read idx file"
    elif damage == "bad-magic":
        plain.write_bytes(b"\x00\x00\x0d" + plain.read_bytes()[3:])
        needle = "bad magic number"
    else:
        plain.write_bytes(plain.read_bytes() + b"\x00")
        needle = "bytes but its header"
    assert cli_on(tmp_path / "root", tmp_path) == 2
    assert needle in one_line_error(capsys)


def test_cli_labels_out_of_range(tmp_path, capsys):
    write_root(tmp_path / "root", labels=torch.tensor([3, 12] * 10))
    assert cli_on(tmp_path / "root", tmp_path) == 2
    assert "labels out of range 0..9 (max 12)" in one_line_error(capsys)


def test_cli_wrong_image_size(tmp_path, capsys):
    write_root(tmp_path / "root", image_hw=(28, 27))
    assert cli_on(tmp_path / "root", tmp_path) == 2
    assert "training images are 28x27 pixels but the model expects 28x28" in one_line_error(capsys)


def test_device_names_are_checked_when_parsed():
    from inference.train import build_parser

    parser = build_parser()
    for good in ("cpu", "cuda", "cuda:1"):
        assert parser.parse_args(["--out", "x", "--device", good]).device == good
    for bad in ("gpu", "cuda:", "cuda:x", "cpu:0"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--out", "x", "--device", bad])
