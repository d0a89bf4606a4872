"""The invariant-weights network: generators, weight transforms and the Pyro model."""

from models.config import GENERATOR_PRESETS, Averaging, FirstLayer, ModelConfig, TransformMode
from models.network import InvariantNet
from models.transforms import (
    GENERATOR_NAMES,
    NUM_GENERATORS,
    affine_generators,
    affine_matrices,
    warp_filters,
    warp_images,
)

__all__ = [
    "GENERATOR_NAMES",
    "GENERATOR_PRESETS",
    "NUM_GENERATORS",
    "Averaging",
    "FirstLayer",
    "InvariantNet",
    "ModelConfig",
    "TransformMode",
    "affine_generators",
    "affine_matrices",
    "warp_filters",
    "warp_images",
]
