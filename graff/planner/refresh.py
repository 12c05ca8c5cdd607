"""The peak search's allowance for extra λ̂ refreshes: a fraction of the training time.

Split from :mod:`graff.planner.peak_search`, which owns the triggers: this module only counts.
"""

from __future__ import annotations

import math
import time
from typing import Any

from graff._checks import MAX_COUNT
from graff.errors import CheckpointError


class RefreshAllowance:
    r"""Keeps the peak search's extra λ̂ refreshes within a fraction of the training time.

    The probe's scheduled refreshes already keep to its ``overhead_target``; the search asks for
    extra ones (:meth:`PeakSearch.refresh_wanted`) while a stale λ̂ may hold the LR
    down. Each costs as much as the first estimate (20 Hessian-vector products: on a tiny model
    several training steps), so they are allowed only while

    .. math:: S + \hat c \le f \cdot (T - T_\text{probe}) / u,

    :math:`S` the seconds spent in such refreshes so far, :math:`\hat c` the cost of the last one
    (before any: ``first_cost``, the time of the first estimate), :math:`T` the wall time since
    the scheduler's first step, :math:`T_\text{probe}` the probe's time in all its estimates,
    :math:`u` the fraction of the budget used (so the right side is :math:`f` times the projected
    training time of the whole run) and :math:`f` = ``fraction``. ``fraction=0`` turns them off.

    Under a wall-clock budget a refresh must also keep GRAFF's *whole* own time within
    ``time_share`` of the projected run (:math:`O + \hat c \le s \cdot T / u`, :math:`O` the
    seconds of its per-step work and of every λ̂ estimate so far, :math:`s` = ``time_share``):
    there every second spent measuring is a second not trained.

    Under a step budget the same rule is kept in units of training steps, from counts alone
    (:meth:`affordable_steps`): the run is exactly the budget's steps, and every extra refresh
    costs the same number of step-equivalents; ``time_share`` does not apply (it would need
    measured times).
    """

    def __init__(self, fraction: float, time_share: float = 1.0) -> None:
        self.fraction = fraction
        self.time_share = time_share
        self.spent = 0.0
        self.count = 0
        self.last_cost: float | None = None
        self.elapsed = 0.0  # wall time since the first step, at the last tick
        self._elapsed_before = 0.0  # wall time of the run before a resume
        self._t0: float | None = None

    def tick(self) -> None:
        """Advance the wall clock to now (once per scheduler step; the first call starts it).

        ``elapsed`` moves only here, so a state saved between two steps is the same each time.
        """
        now = time.perf_counter()
        if self._t0 is None:
            self._t0 = now
        self.elapsed = self._elapsed_before + (now - self._t0)

    def affordable(
        self,
        first_cost: float,
        probe_seconds: float,
        fraction_used: float,
        own_seconds: float = 0.0,
    ) -> bool:
        """Whether one more refresh keeps the refreshes within ``fraction`` of the projected
        training time and GRAFF's own time within ``time_share`` of the projected run.

        Args:
            first_cost: Cost guess before any refresh was charged (the first estimate's time).
            probe_seconds: Seconds the curvature probe has spent so far (all its estimates),
                left out of the training time the run is projected from.
            fraction_used: Fraction of the budget used (the projection's denominator).
            own_seconds: Seconds of all of GRAFF's own work so far (per-step work and every λ̂
                estimate), held to ``time_share``.
        """
        if self.fraction <= 0 or not fraction_used > 0:
            return False
        cost = self.last_cost if self.last_cost is not None else first_cost
        u = min(fraction_used, 1.0)
        projected_training = max(self.elapsed - probe_seconds, 0.0) / u
        within_fraction = self.spent + cost <= self.fraction * projected_training
        return within_fraction and own_seconds + cost <= self.time_share * self.elapsed / u

    def affordable_steps(self, cost_steps: float, total_steps: float) -> bool:
        """Whether one more refresh of ``cost_steps`` keeps all of them (``count`` so far, each
        of the same cost) within ``fraction`` of a ``total_steps`` run. Reads no clock."""
        if self.fraction <= 0:
            return False
        return (self.count + 1) * cost_steps <= self.fraction * total_steps

    def charge(self, seconds: float) -> None:
        """Record a refresh that took ``seconds``."""
        seconds = max(0.0, float(seconds))
        self.spent += seconds
        self.last_cost = seconds
        self.count += 1

    def state_dict(self) -> dict[str, Any]:
        """Seconds spent, refreshes counted, the last one's cost and the run's wall time."""
        return {
            "spent": self.spent,
            "count": self.count,
            "last_cost": self.last_cost,
            "elapsed": self.elapsed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; :class:`CheckpointError` (nothing changed) if invalid."""
        try:
            spent, count = float(state["spent"]), int(state["count"])
            last = None if state["last_cost"] is None else float(state["last_cost"])
            elapsed = float(state["elapsed"])
        except (KeyError, TypeError, ValueError, OverflowError) as err:
            raise CheckpointError(f"invalid refresh-allowance state: {err}") from err
        values = (spent, elapsed) if last is None else (spent, elapsed, last)
        if not all(math.isfinite(v) and v >= 0 for v in values) or not 0 <= count < MAX_COUNT:
            raise CheckpointError(
                f"invalid refresh-allowance state: spent={spent}, elapsed={elapsed}, "
                f"last_cost={last}, count={count}."
            )
        self.spent, self.count, self.last_cost = spent, count, last
        self.elapsed = self._elapsed_before = elapsed
        self._t0 = None
