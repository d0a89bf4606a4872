"""The invariant-weights network: generators, weight transforms and the Pyro model.

Importing this package makes Pyro keep every parameter in its module (``module_local_params``): a model
and its guides own their parameters, so several models coexist in one process (a notebook can train two
and compare them), and nothing reads or clears a global parameter store.
"""

import pyro

from models.config import GENERATOR_PRESETS, Averaging, FirstLayer, ModelConfig, TransformMode, WarpImpl
from models.kernels import batched_linear, bilinear_taps, warp_filters_gather, warped_linear
from models.network import InvariantNet
from models.transforms import (
    ALL_GENERATOR_NAMES,
    GENERATOR_NAMES,
    ISOTROPIC_NAMES,
    NUM_GENERATORS,
    affine_generators,
    affine_matrices,
    generator_basis,
    warp_filters,
    warp_images,
)

pyro.settings.set(module_local_params=True)  # before any module is built: parameters live in their modules

__all__ = [
    "ALL_GENERATOR_NAMES",
    "GENERATOR_NAMES",
    "ISOTROPIC_NAMES",
    "GENERATOR_PRESETS",
    "NUM_GENERATORS",
    "Averaging",
    "FirstLayer",
    "InvariantNet",
    "ModelConfig",
    "TransformMode",
    "WarpImpl",
    "affine_generators",
    "affine_matrices",
    "generator_basis",
    "batched_linear",
    "bilinear_taps",
    "warp_filters",
    "warp_images",
    "warp_filters_gather",
    "warped_linear",
]
