"""How far and how close to the stability limit GRAFF's peak search may rise, by default.

The optimizer-aware defaults of :class:`graff.planner.peak_search.PeakSearch`: its rise rate, its
largest peak factor (``GraffConfig(peak_max=None)``) and its headroom below the guard
(``GraffConfig(search_headroom=None)``). Kept apart from the search's rules so that the values
and the reasons for them read in one place (``docs/concepts/graff.md``).
"""

from __future__ import annotations

import math

import torch

from graff.probes.preconditioner import preconditioner_kind

#: The search's rise per half of its phase, in log units (×10): a larger ``peak_max`` lets it
#: rise for longer, not faster — a faster rise overshoots, as the loss average lags ~10 steps.
RISE = math.log(10.0)
#: The default ``peak_max`` (``GraffConfig(peak_max=None)``) of an adaptive optimizer while a
#: measured λ̂ gives the search a ceiling (:func:`default_peak_max`).
PEAK_MAX_MEASURED = 30.0
#: The default ``peak_max`` otherwise: SGD-type optimizers, or no λ̂ (yet) to stop the rise.
PEAK_MAX_UNMEASURED = 10.0
#: ``GraffConfig(search_after_hold=None)``: the search's phase counts from the end of its hold
#: for a first λ̂ only when that λ̂ lets it rise at least this far (the ceiling
#: :math:`c/(\rho\hat\lambda\eta)` ≥ 20×, i.e. :math:`\eta\hat\lambda \le c/92` for Adam at
#: ρ = 4 with the 1.15 margin): an LR that far below the edge of stability is a poor default, and
#: the hold must not eat the steps it needs to rise. Nearer the limit the hold counts, as before.
FAR_BELOW_CEILING = 20.0


def default_headroom(optimizer: torch.optim.Optimizer) -> float:
    r"""The peak search's default ``search_headroom``: 4 for adaptive optimizers, else 8.

    The search rises only while :math:`\eta\hat\lambda \le c/\text{headroom}`, leaving room for
    the sharpness to grow: under plain (momentum) SGD :math:`\lambda_{\max}(H)` grows during
    training (progressive sharpening), so the margin is wide; under Adam-type optimizers the
    preconditioned sharpness adapts to the LR (adaptive edge of stability), so a narrower one
    suffices. The values were chosen on the benchmark's quality floor
    (``docs/design-log.md``).
    """
    return 4.0 if preconditioner_kind(optimizer) is not None else 8.0


def default_peak_max(adaptive: bool, measured: bool) -> float:
    r"""The largest peak factor the search may reach when ``GraffConfig(peak_max=None)``.

    30× the user's LR for an adaptive optimizer while a measured λ̂ caps the rise (``measured``:
    the search has a ceiling this step), 10× otherwise. Why: a poor default LR can be 30× or
    more below the best one, but a rise past 10× is safe only where something other than the
    loss can stop it — the loss average lags the LR by ~10 steps, so without a ceiling the search
    is past the edge before the back-off sees it. Under SGD the back-off from a higher rise
    returns to a level far below the best, so SGD-type optimizers keep 10×. The measurements
    behind both choices are in ``docs/design-log.md`` ("How far the search may rise").
    """
    return PEAK_MAX_MEASURED if (adaptive and measured) else PEAK_MAX_UNMEASURED
