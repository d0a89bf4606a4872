"""Variational families q(theta) for the invariant network."""

from guides.factory import (
    POINT_FIRST_LAYER,
    EpsFromPrior,
    GuideKind,
    InitLoc,
    make_evidence_guide,
    make_guide,
)
from guides.meanfield import MeanFieldGuide
from guides.paper import ClasswiseFullCovGuide

__all__ = [
    "POINT_FIRST_LAYER",
    "ClasswiseFullCovGuide",
    "EpsFromPrior",
    "GuideKind",
    "InitLoc",
    "MeanFieldGuide",
    "make_evidence_guide",
    "make_guide",
]
