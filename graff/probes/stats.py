"""What the probes report: the per-block curvature statistics of one update and the entropy summary.

:class:`CurvatureStats` is the output of :class:`graff.probes.curvature.CurvatureProbe` (its
``last``), :class:`EntropyStats` that of :meth:`graff.probes.entropy.EntropyProbe.stats`. The
planners read both as node features. Both are re-exported by their probe's module and by
:mod:`graff.probes`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["CurvatureStats", "EntropyStats"]


@dataclass(frozen=True)
class CurvatureStats:
    """Per-block statistics of one update, tensors of shape ``[n_blocks]`` (float32, CPU).

    Attributes:
        step: Index ``t`` of the optimizer step whose update :math:`\\Delta\\theta_t` is described.
        hypergrad: :math:`\\langle g_{t+1,i}, \\Delta\\theta_{t,i}\\rangle = \\partial L_{t+1}/\\partial\\log m_{t,i}`.
        grad_dot_update: :math:`\\langle g_{t,i}, \\Delta\\theta_{t,i}\\rangle`.
        update_sq_norm: :math:`\\lVert\\Delta\\theta_{t,i}\\rVert^2`.
        grad_sq_norm: :math:`\\lVert g_{t+1,i}\\rVert^2`.
        secant: :math:`\\langle g_{t+1,i}-g_{t,i}, \\Delta\\theta_{t,i}\\rangle/\\lVert\\Delta\\theta_{t,i}\\rVert^2`
            (0 where the block did not move).
        secant_ratio: :math:`q_i = \\langle g_{t+1,i}-g_{t,i}, \\Delta\\theta_{t,i}\\rangle/(-\\langle g_{t,i}, \\Delta\\theta_{t,i}\\rangle)`
            (0 where the denominator is 0).
    """

    step: int
    hypergrad: Tensor
    grad_dot_update: Tensor
    update_sq_norm: Tensor
    grad_sq_norm: Tensor
    secant: Tensor
    secant_ratio: Tensor


_F32_LIMIT = 3.4028235677973366e38  # |x| below this rounds to a finite float32


def _derived_stats(raw: list[list[float]]) -> tuple[Tensor | None, float]:
    """``([6, n_blocks] float32 statistics, q of the whole update)``, or ``(None, nan)``.

    ``raw`` holds the block sums ``[−hyper, usq, gsq, gdu]`` (lists of ``n_blocks`` floats). Rows
    of the result: hypergrad, ⟨g_t, Δθ_t⟩, ‖Δθ‖², ‖g‖², secant, ratio; the whole update's values
    are the sums over blocks. The handful of divisions are done on the host in float64 (a ratio
    is 0 where its denominator is 0), then rounded to float32 once; ``None`` if any value
    (blocks or whole update) is not finite in float32.
    """
    neg_hyper, usq, gsq, gdu = ([*row, sum(row)] for row in raw)
    hyper = [-x for x in neg_hyper]
    curv = [h - d for h, d in zip(hyper, gdu, strict=True)]
    secant = [c / u if u != 0 else 0.0 for c, u in zip(curv, usq, strict=True)]
    ratio = [c / -d if d != 0 else 0.0 for c, d in zip(curv, gdu, strict=True)]
    rows = (hyper, gdu, usq, gsq, secant, ratio)
    if not all(-_F32_LIMIT < x < _F32_LIMIT for row in rows for x in row):  # NaN fails too
        return None, math.nan
    return torch.tensor([row[:-1] for row in rows], dtype=torch.float32), ratio[-1]


@dataclass(frozen=True)
class EntropyStats:
    """Summary of the sampled entropies of the last forward pass (nats).

    ``std`` is the population standard deviation. ``normalized_mean = mean / log(vocab)`` lies
    in ``[0, 1]``. With no finite sample (before the first forward, or all dropped) every field
    is 0 and ``count`` is 0: check ``count`` before using the values.
    """

    mean: float
    std: float
    min: float
    max: float
    count: int
    normalized_mean: float
