"""Shared fixtures: a clean Pyro state per test, the device under test and the MNIST data root.

Environment variables
---------------------
INVW_DEVICE
    Device the model/guide tests run on (default ``cpu``; ``cuda`` needs a GPU, else those tests skip).
INVW_DATA_DIR
    Data root holding ``MNIST/raw`` (default ``<repo>/../shared/data``); data tests skip if it is missing.
"""

from __future__ import annotations

import os
import signal
import tempfile
from pathlib import Path

import pyro
import pytest
import torch

from guides import POINT_FIRST_LAYER, GuideKind

REPO_ROOT = Path(__file__).resolve().parent.parent
MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _cuda_available() -> bool:
    return torch.cuda.is_available()


def pytest_configure(config: pytest.Config) -> None:
    # pyproject turns every warning into an error. When a hypothesis test fails, hypothesis' pytest
    # plugin imports libcst, which triggers a third-party DeprecationWarning inside a pytest hook and
    # would turn an ordinary test failure into an INTERNALERROR. Ignore exactly that warning.
    config.addinivalue_line("filterwarnings", "ignore:mypy_extensions.TypedDict is deprecated:DeprecationWarning")
    # Keep hypothesis' storage (constants cache, failure patches) out of the repository.
    try:
        from hypothesis.configuration import set_hypothesis_home_dir
    except ImportError:  # pragma: no cover - hypothesis is a dev dependency
        return
    set_hypothesis_home_dir(os.path.join(tempfile.gettempdir(), "invw-tests-hypothesis"))


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("cuda") is not None and not _cuda_available():
        pytest.skip("needs a CUDA device (torch.cuda.is_available() is False)")


@pytest.fixture(autouse=True)
def _fresh_pyro_state():
    """Every test starts with validation on and the same seed (parameters live in their modules)."""
    pyro.enable_validation(True)
    pyro.set_rng_seed(0)
    yield


@pytest.fixture
def sigint_default():
    """Python's default Ctrl-C handler for the test (a background job of a non-interactive shell inherits an ignored
    SIGINT, which Python keeps, and then no Ctrl-C reaches the code under test)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture
def device() -> torch.device:
    """``$INVW_DEVICE`` (default ``cpu``); skips when it names CUDA and no GPU is visible."""
    name = os.environ.get("INVW_DEVICE", "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not _cuda_available():
        pytest.skip(f"INVW_DEVICE={name} but torch sees no CUDA device")
    return dev


def _default_data_dir() -> Path:
    env = os.environ.get("INVW_DATA_DIR")
    return Path(env).expanduser() if env else (REPO_ROOT.parent / "shared" / "data")


def _has_mnist(root: Path) -> bool:
    raw = root / "MNIST" / "raw"
    return all((raw / n).is_file() or (raw / f"{n}.gz").is_file() for n in MNIST_FILES)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Root holding ``MNIST/raw``: ``$INVW_DATA_DIR`` if set, else ``<repo>/../shared/data``."""
    root = _default_data_dir()
    if not _has_mnist(root):
        pytest.skip(f"MNIST idx files not found under {root / 'MNIST' / 'raw'} (set INVW_DATA_DIR)")
    return root.resolve()


def priors_for(kind, hierarchical: bool = False) -> tuple[bool, bool]:
    """``(first_layer_prior, output_layer_prior)`` of the model each guide is tested with: the paper's model (W1 a
    hyperparameter) for the point-estimate-W1 guides unless the prior is hierarchical, no priors for ``ml``."""
    if GuideKind(kind) is GuideKind.ML:
        return False, False
    return GuideKind(kind) not in POINT_FIRST_LAYER or hierarchical, True
