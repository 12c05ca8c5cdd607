"""Small running statistics behind GraffScheduler: loss/entropy trends and the peak-LR search."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from graff.errors import CheckpointError


class LossTracker:
    r"""Bias-corrected fast (β = 0.9) and slow (β = 0.98) moving averages and the best fast value.

    Non-finite or missing values are ignored. ``rising(tol)`` tells when the fast average is more
    than ``tol`` (relative) above the best fast average seen *and* more than three standard errors
    of the fast average above it (minibatch noise alone must not look like divergence): the
    loss-based instability signal. The standard error is
    :math:`\sigma\sqrt{(1-\beta)/(1+\beta)}`, :math:`\sigma^2` a slow average of squared
    deviations from the slow mean.
    """

    def __init__(self, fast: float = 0.9, slow: float = 0.98, min_count: int = 5) -> None:
        self.beta_fast, self.beta_slow, self.min_count = fast, slow, min_count
        self._fast = self._slow = self._var = 0.0
        self.count = 0
        self.best = math.inf

    @property
    def fast(self) -> float:
        r"""Bias-corrected fast average (0 before any value)."""
        return self._fast / (1 - self.beta_fast**self.count) if self.count else 0.0

    @property
    def slow(self) -> float:
        """Bias-corrected slow average (0 before any value)."""
        return self._slow / (1 - self.beta_slow**self.count) if self.count else 0.0

    def update(self, value: float | None) -> None:
        """Fold in one value (``None``, NaN, inf, or one that would overflow the averages: skipped)."""
        if value is None or not math.isfinite(value):
            return
        deviation = value - self.slow if self.count else 0.0
        var = self.beta_slow * self._var + (1 - self.beta_slow) * deviation * deviation
        fast = self.beta_fast * self._fast + (1 - self.beta_fast) * value
        slow = self.beta_slow * self._slow + (1 - self.beta_slow) * value
        if not all(math.isfinite(x) for x in (var, fast, slow)):
            return
        self._var, self._fast, self._slow = var, fast, slow
        self.count += 1
        if self.count >= self.min_count:
            self.best = min(self.best, self.fast)

    def rising(self, tolerance: float) -> bool:
        """Whether the fast average exceeds the best by more than ``tolerance`` (relative)."""
        if self.count < self.min_count or not math.isfinite(self.best):
            return False
        noise = math.sqrt(self._var / (1 - self.beta_slow ** max(self.count - 1, 1)))
        noise *= math.sqrt((1 - self.beta_fast) / (1 + self.beta_fast))
        return self.fast - self.best > max(tolerance * max(abs(self.best), 1e-12), 3.0 * noise)

    def reset_best(self) -> None:
        """Forget the best value (after a back-off, so one event is not counted twice)."""
        self.best = self.fast if self.count >= self.min_count else math.inf

    def trend(self) -> float:
        """``tanh(10 · (fast − slow) / |slow|)`` in [-1, 1]; 0 before ``min_count`` values."""
        if self.count < self.min_count:
            return 0.0
        return math.tanh(10.0 * (self.fast - self.slow) / max(abs(self.slow), 1e-12))

    def state_dict(self) -> dict[str, Any]:
        return {
            "fast": self._fast,
            "slow": self._slow,
            "var": self._var,
            "count": self.count,
            "best": self.best,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            self._fast, self._slow, self._var = (
                float(state["fast"]),
                float(state["slow"]),
                float(state["var"]),
            )
            self.count, self.best = int(state["count"]), float(state["best"])
        except (KeyError, TypeError, ValueError, OverflowError) as err:
            raise CheckpointError(f"invalid running-average state: {err}") from err
        if self._var < 0 or not 0 <= self.count < 2**63:
            raise CheckpointError(
                f"invalid running-average state: var={self._var}, count={self.count}."
            )


class ExplosionWatch:
    r"""Detects a loss that explodes: growing by a large factor step over step.

    A step *explodes* when its loss :math:`L_t`

    - is more than ``high`` (4) times the fast loss average before it, :math:`\bar L_{t-1}`
      (β = 0.9): :math:`L_t - \bar L_{t-1} > 3\,s`, with the scale
      :math:`s = \max(|\bar L_{t-1}|, 0.01\,|\bar L_{\text{start}}|)` (the floor keeps the
      bounces of a loss that converged to ~0 from counting),
    - is above the previous step's loss, :math:`L_t > L_{t-1}`,
    - and either the step before exploded, or it too was high and rising: two consecutive
      outlier batches of rising loss are not yet an explosion, a third is (heavy-tailed
      minibatch losses, Student-t targets, stayed clear of this in the tests).

    A sustained growth by a factor :math:`g` per step keeps :math:`L_t/\bar L_{t-1} \approx
    10g - 9`, so it explodes as long as :math:`g \gtrsim 1.3`. A non-finite loss right after an
    exploding or high step explodes too (the growth went past the float range). Slower rises
    are left to the loss back-off of :class:`PeakCalibrator`.
    """

    high, min_count = 4.0, 3

    def __init__(self, beta: float = 0.9) -> None:
        self.beta = beta
        self._ema = 0.0
        self.count = 0
        self.start: float | None = None  # the average after min_count losses
        self.prev: float | None = None  # the last step's loss (inf: non-finite)
        self.prev_high = False  # the last step's loss was high and rising
        self.active = False  # the last step exploded

    @property
    def mean(self) -> float | None:
        """Bias-corrected fast average, ``None`` before ``min_count`` losses."""
        if self.count < self.min_count:
            return None
        return self._ema / (1 - self.beta**self.count)

    def update(self, loss: float | None, nonfinite: bool = False) -> bool:
        """Fold in one step's loss; True if the step explodes.

        Args:
            loss: The step's finite loss, or None (no loss, or a non-finite one).
            nonfinite: The step's loss was NaN or infinite.
        """
        if nonfinite:
            fired = self.active or self.prev_high
            self.prev, self.active = math.inf, fired
            return fired
        if loss is None:
            return False
        mean = self.mean
        fired = high = False
        if mean is not None:
            scale = max(abs(mean), 0.01 * abs(self.start or 0.0), 1e-30)
            rising = self.prev is not None and loss > self.prev
            high = rising and loss - mean > (self.high - 1.0) * scale
            fired = high and (self.active or self.prev_high)
        ema = self.beta * self._ema + (1 - self.beta) * loss
        if math.isfinite(ema):
            self._ema = ema
            self.count += 1
            if self.count == self.min_count:
                self.start = self.mean
        self.prev, self.prev_high, self.active = loss, high, fired
        return fired

    def state_dict(self) -> dict[str, Any]:
        return {
            "ema": self._ema,
            "count": self.count,
            "start": self.start,
            "prev": self.prev,
            "prev_high": self.prev_high,
            "active": self.active,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            ema, count = float(state["ema"]), int(state["count"])
            start = None if state["start"] is None else float(state["start"])
            prev = None if state["prev"] is None else float(state["prev"])
            flags = (state["prev_high"], state["active"])
        except (KeyError, TypeError, ValueError, OverflowError) as err:
            raise CheckpointError(f"invalid explosion-watch state: {err}") from err
        if not (
            math.isfinite(ema)
            and 0 <= count < 2**63
            and (start is None or math.isfinite(start))
            and (prev is None or not math.isnan(prev))
            and all(isinstance(f, bool) for f in flags)
        ):
            raise CheckpointError("invalid explosion-watch state.")
        self._ema, self.count, self.start, self.prev = ema, count, start, prev
        self.prev_high, self.active = flags


class PeakCalibrator:
    r"""The peak-LR search of GraffScheduler: a log peak factor :math:`\sigma` over the user's LR.

    The LR at the peak of the prior is :math:`\eta^0 e^{\sigma}`; :math:`\sigma = 0` is the user's
    LR, i.e. the budget prior alone, which is the fallback of every rule below.

    1. **Rise only with slack.** While searching (the first ``search_fraction`` of the budget),
       :math:`\sigma` grows by ``log(peak_max) / max(10, n/2)`` per step (``n`` the estimated
       number of steps of the search phase), but never above the *ceiling*
       :math:`\log\bigl(c / (\rho\,\hat\lambda\,\eta^0)\bigr)` passed as ``log_ceiling``: a raised
       peak keeps :math:`\eta\hat\lambda \le c/\rho`, a fraction ``1/headroom`` of the stability
       limit, because the sharpness measured early grows during training (progressive
       sharpening) and an LR at the limit becomes unstable later. ``log_ceiling=None`` (no
       curvature estimate) means no ceiling; ``hold=True`` keeps :math:`\sigma` still.
    2. **The ceiling only removes what the search added.** Whenever the ceiling falls below a
       raised :math:`\sigma` (a new, larger :math:`\hat\lambda`), :math:`\sigma` comes down to it,
       but never below 0 on this account: the user's own LR is cut only by the guard itself
       (:math:`\eta\hat\lambda \le c`) and by observed instability.
    3. **Back off to the best level seen.** On instability (at most once per ``cooldown`` steps)
       the search ends; if :math:`\sigma` is above the *best level* — the smallest
       :math:`\sigma` of the ``lag`` steps before the loss average was last at its best (the
       average lags the LR by about ``lag`` steps) — it returns to that level; otherwise the
       user's LR itself is too high, and the peak LR becomes the LR just reached divided by
       ``backoff`` (while :meth:`watching`: the search and as long again after it) or is
       halved (later).
    4. **Cut an exploding loss every step.** A step whose loss explodes
       (:class:`ExplosionWatch`) halves the peak LR at once, after first returning a raised
       :math:`\sigma` to the best level — every such step, regardless of the cool-down and of
       ``enabled``: a loss growing geometrically needs an answer as fast as the growth, not
       one per ``cooldown`` steps. The search ends and the cool-down restarts, so the slower
       back-off of rule 3 does not cut again on the excursion's aftermath; :math:`\sigma` is not
       raised again afterwards (the LR stays at most a few halvings below the first stable one).
    """

    def __init__(
        self,
        *,
        enabled: bool,
        search_fraction: float,
        peak_max: float,
        backoff: float,
        headroom: float = 8.0,
        lag: int = 10,
        cooldown: int = 20,
    ) -> None:
        self.enabled, self.search_fraction = enabled, search_fraction
        self.log_peak_max, self.log_backoff = math.log(peak_max), math.log(backoff)
        self.log_headroom = math.log(headroom)
        self.lag, self.cooldown_steps = lag, cooldown
        self.log_peak = 0.0
        self.searching = enabled
        self.steps = 0
        self.cooldown = 0
        self.backoffs = 0
        self.cuts = 0  # rule 4: steps whose exploding loss halved the peak LR
        self.best_level = 0.0
        self.capped = False  # the ceiling stopped the last rise (GraffScheduler refreshes λ̂)
        self.last_refresh = -(10**9)  # step of the last λ̂ refresh the search asked for
        self._history: deque[float] = deque(maxlen=lag)

    def watching(self, fraction_used: float) -> bool:
        """Whether the search or its aftermath (up to twice ``search_fraction``) is running.

        While watching, GraffScheduler uses a tight loss-rise test: the harm of a raise shows in
        the loss average only with a lag, so the test outlives the rise itself.
        """
        return self.enabled and fraction_used < 2.0 * self.search_fraction

    def refresh_due(self, every: int = 10) -> bool:
        """True (and recorded) if no λ̂ refresh was requested in the last ``every`` steps."""
        if self.steps - self.last_refresh < every:
            return False
        self.last_refresh = self.steps
        return True

    def ceiling(self, log_bound: float | None) -> float | None:
        """The search ceiling ``log_bound − log(headroom)`` for a guard bound (factor units)."""
        return None if log_bound is None else log_bound - self.log_headroom

    def update(
        self,
        fraction_used: float,
        log_prior: float,
        unstable: bool,
        hold: bool = False,
        *,
        log_ceiling: float | None = None,
        at_best: bool = False,
        exploding: bool = False,
    ) -> bool:
        """Advance one step; returns True when it backed off.

        Args:
            fraction_used: Fraction of the budget used.
            log_prior: Log of the budget prior now (the LR reached is prior × e^σ).
            unstable: A sign of instability this step (loss rising, non-finite loss, tripwire).
            hold: Keep σ where it is this step (no λ̂ yet, but one will come).
            log_ceiling: Largest σ the search may reach (rule 1), or None (no ceiling).
            at_best: The loss average is at its best so far this step (rule 3).
            exploding: The loss explodes this step (rule 4; also when not ``enabled``).
        """
        self.steps += 1
        self.cooldown = max(0, self.cooldown - 1)
        if exploding:  # rule 4
            level = min(self.log_peak, self.best_level) - math.log(2.0)
            self.log_peak = max(level, -math.log(1e3))
            self.best_level = min(self.best_level, self.log_peak)
            self._history.clear()
            self.searching = False
            self.cooldown = self.cooldown_steps
            self.cuts += 1
            return True
        if not self.enabled:
            return False
        has_ceiling = log_ceiling is not None and not math.isnan(log_ceiling)
        if has_ceiling and self.log_peak > 0.0:
            self.log_peak = min(self.log_peak, max(0.0, log_ceiling))  # rule 2
        self._history.append(self.log_peak)
        if at_best:
            self.best_level = min(self._history)
        if unstable and self.cooldown == 0:
            if self.log_peak > self.best_level:
                self.log_peak = self.best_level
            elif self.watching(fraction_used):
                self.log_peak = self.log_peak + min(0.0, log_prior) - self.log_backoff
            else:
                self.log_peak -= math.log(2.0)
            self.log_peak = max(self.log_peak, -math.log(1e3))
            self.best_level = min(self.best_level, self.log_peak)
            self._history.clear()
            self.searching = False
            self.cooldown = self.cooldown_steps
            self.backoffs += 1
            return True
        self.capped = False
        if self.searching:
            if fraction_used >= self.search_fraction or self.log_peak >= self.log_peak_max - 1e-9:
                self.searching = False
            elif not hold:
                est = self.search_fraction * self.steps / max(fraction_used, 1e-12)
                target = self.log_peak + self.log_peak_max / max(10.0, 0.5 * est)
                top = self.log_peak_max
                if has_ceiling:
                    top = min(top, log_ceiling)
                    self.capped = target > top
                self.log_peak = max(self.log_peak, min(target, top))
        return False

    def state_dict(self) -> dict[str, Any]:
        return {
            "log_peak": self.log_peak,
            "searching": self.searching,
            "steps": self.steps,
            "cooldown": self.cooldown,
            "backoffs": self.backoffs,
            "cuts": self.cuts,
            "best_level": self.best_level,
            "capped": self.capped,
            "history": list(self._history),
            "last_refresh": self.last_refresh,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            self.log_peak, self.searching = float(state["log_peak"]), bool(state["searching"])
            self.steps, self.cooldown = int(state["steps"]), int(state["cooldown"])
            self.backoffs = int(state["backoffs"])
            self.cuts = int(state.get("cuts", 0))  # absent from states of graff <= 0.2
            self.best_level, self.capped = float(state["best_level"]), bool(state["capped"])
            history = [float(v) for v in state["history"]]
            self.last_refresh = int(state["last_refresh"])
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"invalid calibration state: {err}") from err
        self._history = deque(history[-self.lag :], maxlen=self.lag)


@dataclass(frozen=True)
class WindowStats:
    """Curvature-probe statistics summed over a planning window (per block, float32)."""

    hypergrad: Tensor
    grad_sq_norm: Tensor
    update_sq_norm: Tensor
    secant_ratio: Tensor


class StatsWindow:
    """Sums the curvature probe's per-step samples between two planner runs.

    For a log-LR residual held over the window, the derivative of the summed next-step losses is
    the sum of the per-step hypergradients :math:`\\sum_s \\langle g_{s+1}, \\Delta\\theta_s\\rangle`;
    the gradient and update squared norms are summed too, so the window cosine
    :math:`\\sum_s\\langle g_{s+1},\\Delta\\theta_s\\rangle / \\sqrt{\\sum_s\\lVert g_{s+1}\\rVert^2
    \\sum_s\\lVert\\Delta\\theta_s\\rVert^2}` stays in [-1, 1] (Cauchy–Schwarz). Secant ratios
    are averaged. A sample is counted once (by its step index).
    """

    def __init__(self, num_blocks: int) -> None:
        self._sums = torch.zeros(4, num_blocks)
        self.count = 0
        self._last_step: int | None = None

    def add(self, stats: Any) -> None:
        """Fold in the probe's latest sample if it is new (``None`` is ignored)."""
        if stats is None or stats.step == self._last_step:
            return
        sample = torch.stack(
            [stats.hypergrad, stats.grad_sq_norm, stats.update_sq_norm, stats.secant_ratio]
        ).float()
        if not bool(torch.isfinite(sample).all()):
            return
        self._sums += sample
        self.count += 1
        self._last_step = stats.step

    def stats(self) -> WindowStats | None:
        """The window's statistics, or ``None`` if no sample arrived."""
        if not self.count:
            return None
        hyper, gsq, usq, secant = self._sums.clone().unbind(0)
        return WindowStats(hyper, gsq, usq, secant / self.count)

    def reset(self) -> None:
        """Start a new window (the last step index is kept, so no sample is counted twice)."""
        self._sums.zero_()
        self.count = 0

    def state_dict(self) -> dict[str, Any]:
        return {"sums": self._sums.clone(), "count": self.count, "last_step": self._last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            sums, count, last = state["sums"], int(state["count"]), state["last_step"]
        except (KeyError, TypeError, ValueError, OverflowError) as err:
            raise CheckpointError(f"invalid planning-window state: {err}") from err
        if not 0 <= count < 2**63:
            raise CheckpointError(f"invalid planning-window state: count={count}.")
        if not isinstance(sums, Tensor) or sums.shape != self._sums.shape:
            raise CheckpointError("planning-window state does not fit this number of blocks.")
        self._sums, self.count = sums.clone().float(), count
        self._last_step = None if last is None else int(last)
