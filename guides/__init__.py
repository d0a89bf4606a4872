"""Variational families q(theta) for the invariant network."""

from guides.factory import EpsFromPrior, GuideKind, InitLoc, make_guide
from guides.meanfield import MeanFieldGuide

__all__ = ["EpsFromPrior", "GuideKind", "InitLoc", "MeanFieldGuide", "make_guide"]
