"""Paired significance tests with numpy only (scipy may not be installed)."""

from __future__ import annotations

import itertools
import math

import numpy as np


def _t_sf_two_sided(t: float, df: int) -> float:
    """Two-sided p-value of Student's t: I_{df/(df+t²)}(df/2, 1/2), integrated numerically."""
    if not math.isfinite(t):
        return 0.0
    if t == 0.0:
        return 1.0
    a, b = df / 2.0, 0.5
    x_max = df / (df + t * t)
    # substitute x = x_max * s**2 (smooth near 0 for a >= 1/2) and integrate with Simpson's rule
    s = np.linspace(0.0, 1.0, 20001)
    x = x_max * s * s
    f = np.power(x, a - 1.0, where=x > 0, out=np.zeros_like(x)) * (1.0 - x) ** (b - 1.0)
    f = f * 2.0 * x_max * s
    h = s[1] - s[0]
    integral = h / 3.0 * (f[0] + f[-1] + 4.0 * f[1:-1:2].sum() + 2.0 * f[2:-1:2].sum())
    log_beta = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    return float(min(1.0, integral / math.exp(log_beta)))


def paired_t_test(x: list[float], y: list[float]) -> dict[str, float]:
    """Paired t-test of ``mean(x - y) == 0``; returns mean difference, t and two-sided p."""
    d = np.asarray(x, dtype=float) - np.asarray(y, dtype=float)
    n = len(d)
    if n < 2:
        return {"mean_diff": float(d.mean()) if n else math.nan, "t": math.nan, "p": math.nan}
    sd = float(d.std(ddof=1))
    if sd == 0.0:
        t = 0.0 if d.mean() == 0 else math.copysign(math.inf, float(d.mean()))
    else:
        t = float(d.mean() / (sd / math.sqrt(n)))
    return {"mean_diff": float(d.mean()), "t": t, "p": _t_sf_two_sided(t, n - 1)}


def sign_flip_test(x: list[float], y: list[float]) -> float:
    """Exact two-sided sign-flip permutation p-value of the mean paired difference.

    With n pairs the smallest attainable p is 2 / 2**n (0.25 for n = 3).
    """
    d = np.asarray(x, dtype=float) - np.asarray(y, dtype=float)
    if len(d) == 0:
        return math.nan
    observed = abs(d.mean())
    flips = np.array(list(itertools.product((1.0, -1.0), repeat=len(d))))
    stats = np.abs((flips * d).mean(axis=1))
    return float((stats >= observed - 1e-15).mean())
