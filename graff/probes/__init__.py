"""Cheap probes of the training state: curvature (optimizer hooks) and token entropy (forward hooks)."""

from graff.probes.curvature import CurvatureProbe, CurvatureStats
from graff.probes.entropy import EntropyProbe, EntropyStats

__all__ = ["CurvatureProbe", "CurvatureStats", "EntropyProbe", "EntropyStats"]
