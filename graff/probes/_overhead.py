"""The seconds the curvature probe costs training, by account, and the step time around them.

One object keeps every timing the probe takes, so the readings a user sees
(``overhead_seconds``, ``hook_seconds``, ``estimate_seconds``, ``step_cost_seconds``) and the
ones the ``auto`` λ̂ interval is priced from (``step_time``, ``step_cost_seconds``) come from one
place. Timings are measurements, never state: only ``overhead_seconds`` is saved (as a report).
"""

from __future__ import annotations

import time


class OverheadMeter:
    """Seconds spent in a probe's hooks and λ̂ estimates, and moving averages per step.

    Attributes:
        overhead_seconds: Hooks and estimates together, since construction (or the last load).
        hook_seconds: The per-step hooks, estimates excluded.
        estimate_seconds: The λ̂ estimates.
        step_cost_seconds: Moving average of the per-step cost: the hooks' time plus what
            :meth:`add_step_cost` reported; ``None`` before the first step.
        step_time: Moving average of the time of a training step from one post-step hook to
            the next, the estimates run in between excluded; ``None`` before the second step.
    """

    def __init__(self) -> None:
        self.overhead_seconds = 0.0
        self.hook_seconds = self.estimate_seconds = 0.0
        self.step_cost_seconds: float | None = None
        self.step_time: float | None = None
        self._step_costs = 0.0  # accumulated since the last post-step hook
        self._t_post: float | None = None  # when the last post-step hook ended
        self._estimates_since_post = 0.0

    def add_hook(self, seconds: float) -> None:
        """Book the time of one hook call (its estimates excluded) in every account it feeds."""
        self.overhead_seconds += seconds
        self.hook_seconds += seconds
        self._step_costs += seconds

    def add_estimate(self, seconds: float) -> None:
        """Book one λ̂ estimate (not part of the step time or the per-step cost)."""
        self.overhead_seconds += seconds
        self.estimate_seconds += seconds
        self._estimates_since_post += seconds

    def add_step_cost(self, seconds: float) -> None:
        """Count per-step work done outside the probe (NaN and negative timings are dropped)."""
        if seconds > 0:
            self._step_costs += seconds

    def close_step(self, now: float) -> None:
        """At the post-step hook's start (``now``): update the step time and the per-step cost."""
        if self._t_post is not None:
            dt = max(now - self._t_post - self._estimates_since_post, 1e-9)
            self.step_time = dt if self.step_time is None else 0.9 * self.step_time + 0.1 * dt
            cost, old = self._step_costs, self.step_cost_seconds
            # a slow average: the sampled steps (one in ``stats_every``) cost far more than the rest
            self.step_cost_seconds = cost if old is None else 0.98 * old + 0.02 * cost
        self._step_costs = 0.0
        self._estimates_since_post = 0.0

    def hooks_done(self) -> None:
        """At the post-step hook's end: the next step's time starts now."""
        self._t_post = time.perf_counter()
        self._estimates_since_post = 0.0  # this hook's estimates lie before _t_post already
