"""Paired significance tests of final losses across seeds, from ``scipy.stats``."""

from __future__ import annotations

import math

import numpy as np
from scipy import stats


def paired_t_test(x: list[float], y: list[float]) -> dict[str, float]:
    """Paired t-test of ``mean(x - y) == 0``; returns mean difference, t and two-sided p.

    With fewer than 2 pairs there is no test (t and p are NaN). With identical differences the
    t statistic is 0 (all zero: p = 1) or ±inf (p = 0), where scipy would answer NaN.
    """
    d = np.asarray(x, dtype=float) - np.asarray(y, dtype=float)
    n = len(d)
    if n < 2:
        return {"mean_diff": float(d.mean()) if n else math.nan, "t": math.nan, "p": math.nan}
    mean = float(d.mean())
    if float(d.std(ddof=1)) == 0.0:
        t = 0.0 if mean == 0 else math.copysign(math.inf, mean)
        return {"mean_diff": mean, "t": t, "p": 1.0 if t == 0.0 else 0.0}
    result = stats.ttest_rel(x, y)
    return {"mean_diff": mean, "t": float(result.statistic), "p": float(result.pvalue)}


def sign_flip_test(x: list[float], y: list[float]) -> float:
    """Exact two-sided sign-flip permutation p-value of the mean paired difference.

    With n pairs the smallest attainable p is 2 / 2**n (0.25 for n = 3).
    """
    d = np.asarray(x, dtype=float) - np.asarray(y, dtype=float)
    if len(d) < 2:  # scipy needs two pairs; one pair's two sign flips are equally extreme
        return 1.0 if len(d) else math.nan
    result = stats.permutation_test(
        (d,), np.mean, permutation_type="samples", n_resamples=math.inf, alternative="two-sided"
    )
    return float(result.pvalue)
