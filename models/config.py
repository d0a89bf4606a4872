"""Typed configuration of the invariant network and string choices shared by code, CLI and docs."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from enum import StrEnum

from models.priors import EtaPrior, PriorKind
from models.transforms import GENERATOR_NAMES, ISOTROPIC_NAMES, generator_basis


class FirstLayer(StrEnum):
    """First-layer feature map phi(W1 x + b1)."""

    RELU = "relu"  # learned W1 with a prior, ReLU activation (paper Sec. 5.2)
    RFF = "rff"  # fixed random W1 and b1, cosine activation: random Fourier features (Sec. 5.1)


class TransformMode(StrEnum):
    """Where the sampled transformation acts."""

    WEIGHTS = "weights"  # (W1 o T) x: cost grows with hidden units (the paper's method)
    INPUTS = "inputs"  # W1 (T^-1 x): Augerino-style, cost grows with the batch
    IDENTITY = "identity"  # W1 x, S times: the same S forward passes with T_s = I and no warp at all. The
    # model equals generators=() (eta is unused); it exists as the honest cost floor of benchmarks/bench_step.py


class WarpImpl(StrEnum):
    """How TransformMode.WEIGHTS computes (W1 o T_s) x; both are the same function (bilinear, zero padding)."""

    GATHER = "gather"  # warped_linear: bilinear taps once per T, one embedding_bag over all filters, one GEMM
    GRID_SAMPLE = "grid_sample"  # warp_filters: grid_sample of all S*D filter images, then a matmul (the reference)


class Likelihood(StrEnum):
    """Observation model p(y | f)."""

    CATEGORICAL = "categorical"  # classification, y in {0..classes-1} (the paper)
    GAUSSIAN = "gaussian"  # regression, y in R^classes with known noise (the conjugate test case)


class Averaging(StrEnum):
    """How the S transformed predictions are combined inside the likelihood."""

    PROBS = "probs"  # log (1/S sum_s softmax f_s): multi-sample Jensen bound of the main text
    LOGITS = "logits"  # log softmax((1/S) sum_s f_s): the supplement's variant


def check_positive_int(name: str, value: object) -> int:
    """``value`` as an ``int`` if it is an integer >= 1, else a ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_positive_float(name: str, value: object) -> float:
    """``value`` as a ``float`` if it is a finite number > 0, else a ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be > 0 and finite, got {value!r}")
    return float(value)


GENERATOR_PRESETS: dict[str, tuple[str, ...]] = {
    "none": (),
    "rotation": ("rotate",),
    "translation": ("translate_x", "translate_y"),
    "scale": ("scale_x", "scale_y"),
    "affine": GENERATOR_NAMES,
    "scale-iso": ("scale",),
    "affine-iso": ISOTROPIC_NAMES,
}
"""Named sets of active generators ("+ rotation", "+ affine", ... of Table 2, in the paper's basis; the
``-iso`` sets use the isotropic basis, :data:`models.transforms.ISOTROPIC_NAMES`)."""


@dataclass(frozen=True)
class ModelConfig:
    """Architecture, prior and invariance settings of :class:`models.InvariantNet`.

    Shapes: inputs ``(B, C, H, W)``, ``W1: (D, C*H*W)``, ``W2: (num_classes, D)``.
    """

    image_shape: tuple[int, int, int] = (1, 28, 28)  # (C, H, W)
    num_classes: int = 10
    hidden: int = 1024  # D
    first_layer: FirstLayer = FirstLayer.RELU
    transform_mode: TransformMode = TransformMode.WEIGHTS
    warp_impl: WarpImpl = WarpImpl.GATHER  # weights mode only: the fast gather warp or the grid_sample reference
    averaging: Averaging = Averaging.PROBS
    num_transforms: int = 32  # S, transformation samples per forward pass
    generators: tuple[str, ...] = GENERATOR_NAMES  # active generators (one basis); the others have eta = 0
    eta_init: float = math.radians(5.0)  # initial eta of every active generator (5 degrees)
    learn_eta: bool = True  # False: eta stays at eta_init (the fixed-eta baselines)
    prior_scale: float = 1.0  # alpha: weights ~ N(0, alpha^2) a priori
    prior: PriorKind = PriorKind.NORMAL  # family of p(theta), see models/priors.py
    output_layer_prior: bool = True  # False (with first_layer_prior False): no prior at all, maximum likelihood
    likelihood: Likelihood = Likelihood.CATEGORICAL
    noise_scale: float = 1.0  # Gaussian likelihood only: y ~ N(f(x), noise_scale^2)
    eta_prior: EtaPrior = EtaPrior.NONE  # "uniform": full Bayes over eta instead of empirical Bayes
    first_layer_prior: bool = True  # False: W1, b1 keep their sites but log p(W1, b1) is masked out, so a
    # point-estimate guide treats them as hyperparameters, as in the paper's ReLU network (ML-II for W1)
    rff_scale: float = 1.0  # RFF only: W1 ~ N(0, rff_scale^2 / (C*H*W))
    rff_blur: float = 0.0  # RFF only: Gaussian blur (std in pixels) of each W1 row: the RBF kernel on blurred images
    max_shift: float | None = None  # bound on eta_translate_x, _y (units of half the frame); None: unbounded (paper)

    def __post_init__(self) -> None:
        object.__setattr__(self, "first_layer", FirstLayer(self.first_layer))
        object.__setattr__(self, "transform_mode", TransformMode(self.transform_mode))
        object.__setattr__(self, "warp_impl", WarpImpl(self.warp_impl))
        object.__setattr__(self, "averaging", Averaging(self.averaging))
        object.__setattr__(self, "prior", PriorKind(self.prior))
        object.__setattr__(self, "likelihood", Likelihood(self.likelihood))
        object.__setattr__(self, "eta_prior", EtaPrior(self.eta_prior))
        if self.eta_prior is not EtaPrior.NONE and not self.learn_eta:
            raise ValueError("a prior over eta (full Bayes) and a fixed eta exclude each other")
        if self.prior is PriorKind.HIERARCHICAL and not (self.first_layer_prior and self.output_layer_prior):
            raise ValueError("the hierarchical prior needs the weight priors switched on")
        object.__setattr__(self, "image_shape", tuple(int(s) for s in self.image_shape))
        object.__setattr__(self, "generators", tuple(self.generators))
        generator_basis(self.generators)  # unknown names or two bases: ValueError
        for name in ("num_classes", "hidden", "num_transforms"):
            check_positive_int(name, getattr(self, name))
        if len(self.image_shape) != 3 or min(self.image_shape) < 1:
            raise ValueError(f"image_shape must be (C, H, W) with positive sizes, got {self.image_shape}")
        if not (math.isfinite(self.rff_blur) and 0 <= self.rff_blur <= max(self.image_shape[1:])):
            raise ValueError(f"rff_blur must be between 0 and the image's size ({max(self.image_shape[1:])} px: a "
                             f"wider blur is flat over the image), got {self.rff_blur}")
        if self.max_shift is not None:
            check_positive_float("max_shift", self.max_shift)
        for name in ("eta_init", "prior_scale", "rff_scale", "noise_scale"):  # eta is a positive parameter
            check_positive_float(name, getattr(self, name))

    @property
    def generator_names(self) -> tuple[str, ...]:
        """The six generators of the basis that ``generators`` belong to, in the order of eta and eps."""
        return generator_basis(self.generators)

    @property
    def num_pixels(self) -> int:
        """C * H * W, the input dimension of the first layer."""
        C, H, W = self.image_shape
        return C * H * W
