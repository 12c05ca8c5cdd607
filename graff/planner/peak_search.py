"""GRAFF's peak-LR search: the rules, their triggers, and the allowance for extra λ̂ refreshes.

:class:`PeakSearch` finds the peak LR the user did not tune (``docs/concepts/graff.md``). It owns
everything that moves it: the loss average and its back-off test (:class:`LossTracker`), the
explosion watch (:class:`ExplosionWatch`), the ceiling below the guard, the stop at the guard,
and the extra λ̂ refreshes it asks for, kept within a :class:`RefreshAllowance`.
"""

from __future__ import annotations

import math
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import torch

from graff.errors import ProbeError
from graff.planner._search_state import parse_search_state, search_state
from graff.planner.features import ExplosionWatch, LossTracker
from graff.planner.refresh import RefreshAllowance
from graff.planner.search_defaults import (
    FAR_BELOW_CEILING,
    RISE,
    default_headroom,
    default_peak_max,
)
from graff.probes.curvature import estimate_cost_steps
from graff.probes.preconditioner import preconditioner_kind

if TYPE_CHECKING:
    from graff.clock import BudgetClock
    from graff.planner.config import GraffConfig
    from graff.probes.curvature import CurvatureProbe

#: Hessian-vector products of a λ̂ refresh the search asks for: warm-started from the last
#: eigenvector, a third of a fresh estimate's cost (``docs/concepts/graff.md``).
REFRESH_ITERS = 6
#: Under loss evidence, an estimate that puts the LR the loss was just seen stable at more than
#: this factor above the guard's limit is implausible (``docs/concepts/guard.md``): it is set
#: aside until the next estimate.
IMPLAUSIBLE = 4.0


class PeakSearch:
    r"""The peak-LR search of GraffScheduler: a log peak factor :math:`\sigma` over the user's LR.

    The LR at the peak of the prior is :math:`\eta^0 e^{\sigma}`; :math:`\sigma = 0` is the user's
    LR, i.e. the budget prior alone, which is the fallback of every rule below.

    1. **Rise only with slack.** While searching (the first ``search_fraction`` of the budget),
       :math:`\sigma` grows by ``log(10) / max(10, n/2)`` per step (``n`` the estimated
       number of steps of the search phase) up to ``log(peak_max)`` (by default 30× for an
       adaptive optimizer under a measured ceiling, else 10×: :func:`default_peak_max`), but
       never above the *ceiling*
       :math:`\log\bigl(c / (\rho\,\hat\lambda\,\eta^0)\bigr)` passed as ``log_ceiling``: a raised
       peak keeps :math:`\eta\hat\lambda \le c/\rho`, a fraction ``1/headroom`` of the stability
       limit, because the sharpness measured early grows during training (progressive
       sharpening) and an LR at the limit becomes unstable later. ``log_ceiling=None`` (no
       curvature estimate) means no ceiling; ``hold=True`` keeps :math:`\sigma` still.
    2. **The ceiling only removes what the search added.** Whenever the ceiling falls below a
       raised :math:`\sigma` (a new, larger :math:`\hat\lambda`), :math:`\sigma` comes down to it,
       but never below 0 on this account: the user's own LR is cut only by the guard itself
       (:math:`\eta\hat\lambda \le c`) and by observed instability.
       Under *loss evidence* (``GraffConfig.loss_evidence``, on by default for adaptive
       optimizers) a step whose loss is healthy skips this rule, and :meth:`limit` keeps the
       LR at least at the last step's: the ceiling then only stops the rise, because a loss that
       keeps falling at the current LR shows that λ̂ over-states the sharpness (young second
       moments; Adam's sharpness tracks the LR in use). With ``keep_raised_peak`` the same
       holds for the guard's own cut of a raised σ (:meth:`guard_floor`).
    3. **Back off to the best level seen.** On instability (at most once per ``cooldown`` steps)
       the search ends; if :math:`\sigma` is above the *best level* — the smallest
       :math:`\sigma` of the ``lag`` steps before the loss average was last at its best (the
       average lags the LR by about ``lag`` steps) — it returns to that level. If it is not
       but was within the last ``lag`` steps, rule 2 already took back the raise whose harm the
       loss shows: :math:`\sigma` stays and the search goes on. So too if the LR *applied*
       within the last ``lag`` steps was ``backoff`` times today's or more: whoever cut it (the
       guard's hard min, usually) has already answered, and a back-off would cut a second
       time for one excursion. Otherwise the user's LR itself
       is too high, and the peak LR becomes the LR just reached divided by
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
        peak_max: float | None,
        backoff: float,
        headroom: float = 8.0,
        adaptive: bool = False,
        refresh_fraction: float = 0.1,
        time_share: float = 1.0,
        guard: bool = True,
        lag: int = 10,
        cooldown: int = 20,
        loss_evidence: bool = False,
        keep_raised_peak: bool = False,
        search_after_hold: bool | None = False,
    ) -> None:
        self.guard = guard
        self.loss_evidence = loss_evidence
        self.keep_raised_peak = keep_raised_peak
        self.search_after_hold = search_after_hold
        # fraction of the budget used at the last step the search held for a first λ̂ (with
        # search_after_hold the search phase and its watch count from there)
        self.hold_until = 0.0
        # search_after_hold=None: whether the first λ̂ has decided if the hold counts (saved)
        self.hold_decided = False
        self.healthy = False  # this step's loss was seen and showed no instability (not saved)
        self.discredited = -1  # n_estimates of the λ̂ the loss contradicted (-1: none)
        self.losses = LossTracker()
        self.explosion = ExplosionWatch()
        self.allowance = RefreshAllowance(refresh_fraction, time_share)
        self.nonfinite_seen = 0  # the scheduler's non-finite-loss count already answered
        self.log_ceiling: float | None = None  # this step's ceiling (set by step(), not saved)
        self.enabled, self.search_fraction = enabled, search_fraction
        #: ``log(peak_max)``, or None: :func:`default_peak_max` decides at each rise.
        self.log_peak_max = None if peak_max is None else math.log(peak_max)
        self.adaptive = adaptive
        self.log_backoff = math.log(backoff)
        self.log_headroom = math.log(headroom)
        self.lag, self.cooldown_steps = lag, cooldown
        self.log_peak = 0.0
        self.searching = enabled
        self.steps = 0
        self.cooldown = 0
        self.backoffs = 0
        self.cuts = 0  # rule 4: steps whose exploding loss halved the peak LR
        self.best_level = 0.0
        self.capped = False  # the ceiling stopped the last rise (a λ̂ refresh may lift it)
        self.last_refresh = -(10**9)  # step of the last λ̂ refresh the search asked for
        self._history: deque[float] = deque(maxlen=lag)
        self._applied: deque[float] = deque(maxlen=lag)  # the applied log LR factors (rule 3)

    def watching(self, fraction_used: float) -> bool:
        """Whether the search or its aftermath (up to twice ``search_fraction``) is running.

        While watching, the loss-rise test is tight: the harm of a raise shows in
        the loss average only with a lag, so the test outlives the rise itself.
        """
        return self.enabled and fraction_used < self.counted_hold() + 2.0 * self.search_fraction

    def counted_hold(self) -> float:
        """Fraction of the budget the search held for a first λ̂ that its phase does not count.

        0 unless ``search_after_hold``: True counts the phase from the last hold step; None (the
        default) only once the first λ̂ showed the user's LR far below the stability limit (its
        ceiling ≥ :data:`~graff.planner.search_defaults.FAR_BELOW_CEILING`), and until then
        behaves as False.
        """
        if self.search_after_hold or (self.search_after_hold is None and self.hold_decided):
            return self.hold_until
        return 0.0

    def refresh_due(self, every: int = 10) -> bool:
        """True (and recorded) if no λ̂ refresh was requested in the last ``every`` steps."""
        if self.steps - self.last_refresh < every:
            return False
        self.last_refresh = self.steps
        return True

    def ceiling(self, log_bound: float | None) -> float | None:
        """The search ceiling ``log_bound − log(headroom)`` for a guard bound (factor units)."""
        return None if log_bound is None else log_bound - self.log_headroom

    @classmethod
    def from_config(
        cls, config: GraffConfig, optimizer: torch.optim.Optimizer, *, guard: bool
    ) -> PeakSearch:
        """The search a :class:`~graff.GraffConfig` asks for (optimizer-aware headroom)."""
        return cls(
            enabled=config.peak_search,
            search_fraction=config.search_fraction,
            peak_max=config.peak_max,
            backoff=config.backoff,
            headroom=config.search_headroom or default_headroom(optimizer),
            adaptive=preconditioner_kind(optimizer) is not None,
            refresh_fraction=config.refresh_allowance,
            time_share=config.time_share,
            guard=guard,
            loss_evidence=(
                preconditioner_kind(optimizer) is not None
                if config.loss_evidence is None
                else config.loss_evidence
            ),
            keep_raised_peak=config.keep_raised_peak,
            search_after_hold=config.search_after_hold,
        )

    # ------------------------------------------------------------- triggers
    def tick(self) -> None:
        """Start of a scheduler step: advance the refresh allowance's wall clock."""
        self.allowance.tick()

    def observe(self, loss: float | None) -> None:
        """Fold the step's finite loss (or None) into the loss average the back-off watches."""
        self.losses.update(loss)

    def refresh_wanted(
        self,
        log_bound: float | None,
        log_prior: float,
        probe: CurvatureProbe,
        budget: BudgetClock,
        owner_seconds: float = 0.0,
    ) -> bool:
        """Whether to re-measure λ̂ now, because a stale estimate may be holding the LR down.

        Asked (at most every 10 steps, within the :class:`RefreshAllowance`) when the search is
        stopped by its ceiling, or when the guard cuts the LR below the prior alone (the user's
        LR): an early estimate of Adam's preconditioned sharpness can be far too large while the
        second-moment estimates are young, and the scheduled refresh may be hundreds of steps
        away. ``owner_seconds``: the owner's own time outside the probe (GraffScheduler: its
        ``step()`` and the entropy lens), which with the probe's time is held to the
        allowance's ``time_share`` under a wall-clock budget.
        """
        if log_bound is None or not (self.guard and probe.hvp and self.enabled):
            return False
        stale = (self.capped and self.searching) or log_bound < log_prior
        return stale and self.refresh_due() and self._affordable(probe, budget, owner_seconds)

    def refresh(self, probe: CurvatureProbe) -> bool:
        """Re-measure λ̂ (a short, warm-started estimate); False if the probe could not."""
        t0 = time.perf_counter()
        try:
            probe.estimate_lambda_max(REFRESH_ITERS)
        except ProbeError:
            return False
        finally:
            self.allowance.charge(time.perf_counter() - t0)
        return True

    def _affordable(self, probe: CurvatureProbe, budget: BudgetClock, owner_seconds: float) -> bool:
        """Whether the allowance takes one more refresh: from counts alone under a step budget
        (the same decision on every run), from measured times otherwise (rank 0 decides)."""
        if probe.cost_model == "steps":
            cost = estimate_cost_steps(REFRESH_ITERS)
            return self.allowance.affordable_steps(cost, budget.total)
        spent = probe.overhead_seconds
        ok = self.allowance.affordable(
            spent, spent, budget.fraction_used, own_seconds=spent + owner_seconds
        )
        if probe.sync is not None:  # timings differ between ranks; every rank must agree
            ok = probe.sync.from_rank0(1.0 if ok else 0.0) > 0.5
        return ok

    def step(
        self,
        fraction_used: float,
        log_prior: float,
        log_bound: float | None,
        *,
        loss: float | None,
        nonfinite_losses: int,
        probe: CurvatureProbe,
        last_log_factor: float,
    ) -> None:
        """One step of the search from this step's signals: the explosion watch, the loss
        back-off, the guard's ceiling (rules 1-4).

        Args:
            fraction_used: Fraction of the budget used.
            log_prior: Log of the budget prior now.
            log_bound: The guard's log LR-factor bound (None without λ̂).
            loss: The step's finite loss, or None.
            nonfinite_losses: The scheduler's count of non-finite losses so far (a new one is a
                sign of instability).
            probe: The curvature probe (its ``hvp``, secant ``tripwire`` and ``n_estimates``).
            last_log_factor: The LR factor of the step just taken (loss evidence).
        """
        nonfinite = loss is None and nonfinite_losses > self.nonfinite_seen
        exploding = self.explosion.update(loss, nonfinite)
        unstable = self._unstable(loss, log_bound, fraction_used, nonfinite_losses, probe)
        self.healthy = loss is not None and not exploding and not unstable
        # Rise toward the stability limit only once the guard can see it (when it can at all),
        # and only up to a fraction 1/headroom of it (rules 1-3).
        hold = self.guard and probe.hvp and log_bound is None
        # An implausible λ̂ is set aside for cuts (the scheduler's guard reads ``discredited``);
        # its ceiling still stops the rise: it errs high, and at 10× a sensible LR it is right.
        self.discredits(log_bound, last_log_factor, probe.n_estimates)
        self.log_ceiling = self.ceiling(log_bound) if self.guard else None
        losses = self.losses
        at_best = losses.count >= losses.min_count and losses.fast <= losses.best
        backed_off = self.update(
            fraction_used,
            log_prior,
            unstable,
            hold=hold,
            log_ceiling=self.log_ceiling,
            at_best=at_best,
            exploding=exploding,
            pull_back=not (self.loss_evidence and self.healthy),
            applied=last_log_factor,
        )
        if backed_off or self.cooldown > 0:
            # Re-baseline the loss average through the cool-down: it is still catching up with
            # the excursion that caused the back-off, which is not a new instability.
            losses.reset_best()

    def _unstable(
        self,
        loss: float | None,
        log_bound: float | None,
        fraction_used: float,
        nonfinite_losses: int,
        probe: CurvatureProbe,
    ) -> bool:
        """Loss- or secant-based sign of instability (drives the back-off).

        The guard itself caps the LR where λ̂ is known and ends the search when it binds; it does
        not also back off the peak (early Adam preconditioners make λ̂ noisy).
        """
        if loss is None and nonfinite_losses > self.nonfinite_seen:
            self.nonfinite_seen = nonfinite_losses
            return True  # a non-finite loss: back off
        if self.losses.rising(tolerance=0.05 if self.watching(fraction_used) else 0.5):
            return True
        if log_bound is not None:  # λ̂ is known: the guard, not the secant, watches stability
            return False
        tripwire = probe.tripwire
        if tripwire is not None and tripwire > 2.0:
            return self.losses.rising(tolerance=0.05)  # q > 2 alone is common under momentum
        return False

    def discredits(self, log_bound: float | None, last_log_factor: float, estimate: int) -> bool:
        """Whether the current λ̂ is set aside (loss evidence): it called the LR the loss was
        just seen stable at more than :data:`IMPLAUSIBLE` times too high. It stays set aside
        until the probe publishes a new estimate (``estimate``: its ``n_estimates``)."""
        if self.discredited != estimate:
            self.discredited = -1
        if (
            self.loss_evidence
            and self.healthy
            and log_bound is not None
            and log_bound < last_log_factor - math.log(IMPLAUSIBLE)
        ):
            self.discredited = estimate
        return self.discredited >= 0

    def limit(self, log_factor: float, log_prior: float, last_log_factor: float) -> float:
        """What GRAFF adds above the prior alone (search and residual) obeys this step's ceiling
        too; a negative residual is always allowed. Under loss evidence with a healthy loss the
        ceiling stops a rise but never takes the LR below ``last_log_factor`` (the last step's)."""
        ceiling = self.log_ceiling
        if ceiling is not None and not math.isnan(ceiling):
            cap = log_prior + max(0.0, ceiling)
            if self.loss_evidence and self.healthy:
                cap = max(cap, last_log_factor)
            return min(log_factor, cap)
        return log_factor

    def guard_floor(self, log_prior: float, last_log_factor: float) -> float:
        """The lowest log LR factor the guard's hard min may set this step.

        ``-inf`` (no floor) unless ``keep_raised_peak`` holds under loss evidence with a healthy
        loss and the search has raised the peak (σ > 0): then the last step's LR, at most the
        prior times the searched peak (so it follows the prior's decay, never a residual's
        raise). A λ̂ measured after the rise sits at Adam's adaptive edge of stability for the
        LR in use, so it calls that LR too high by construction; the loss says whether it is.
        """
        if self.keep_raised_peak and self.loss_evidence and self.healthy and self.log_peak > 0:
            return min(last_log_factor, log_prior + self.log_peak)
        return -math.inf

    def stop_at_guard(self) -> None:
        """The guard bound the LR: the search stops at the stability limit."""
        self.searching = False

    # ---------------------------------------------------------------- rules
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
        pull_back: bool = True,
        applied: float | None = None,
    ) -> bool:
        """Advance one step; returns True when it answered an instability (rules 3 and 4).

        Args:
            fraction_used: Fraction of the budget used.
            log_prior: Log of the budget prior now (the LR reached is prior × e^σ).
            unstable: A sign of instability this step (loss rising, non-finite loss, tripwire).
            hold: Keep σ where it is this step (no λ̂ yet, but one will come).
            log_ceiling: Largest σ the search may reach (rule 1), or None (no ceiling).
            at_best: The loss average is at its best so far this step (rule 3).
            exploding: The loss explodes this step (rule 4; also when not ``enabled``).
            pull_back: Rule 2 applies (``False`` under loss evidence with a healthy loss: the
                ceiling then only stops the rise).
            applied: The log LR factor of the step just taken, after the guard (rule 3: a cut
                of it by ``backoff`` or more within the lag answers an instability), or None.
        """
        self.steps += 1
        self.cooldown = max(0, self.cooldown - 1)
        if exploding:  # rule 4
            level = min(self.log_peak, self.best_level) - math.log(2.0)
            self.log_peak = max(level, -math.log(1e3))
            self.best_level = min(self.best_level, self.log_peak)
            self._history.clear()
            self._applied.clear()
            self.searching = False
            self.cooldown = self.cooldown_steps
            self.cuts += 1
            return True
        if not self.enabled:
            return False
        has_ceiling = log_ceiling is not None and not math.isnan(log_ceiling)
        if pull_back and has_ceiling and self.log_peak > 0.0:
            self.log_peak = min(self.log_peak, max(0.0, log_ceiling))  # rule 2
        self._history.append(self.log_peak)
        if applied is not None:
            self._applied.append(applied)
        if at_best:
            self.best_level = min(self._history)
        if unstable and self.cooldown == 0:
            # rule 2 took back the raise whose harm the loss still shows (the lag), or the LR
            # in use was already cut by backoff or more within the lag (by the guard, say)
            answered = self.log_peak <= self.best_level < max(self._history) or (
                applied is not None and max(self._applied) - applied >= self.log_backoff
            )
            if self.log_peak > self.best_level:
                self.log_peak = self.best_level
            elif not answered:
                if self.watching(fraction_used):
                    self.log_peak = self.log_peak + min(0.0, log_prior) - self.log_backoff
                else:
                    self.log_peak -= math.log(2.0)
            self.log_peak = max(self.log_peak, -math.log(1e3))
            self.best_level = min(self.best_level, self.log_peak)
            self._history.clear()
            self._applied.clear()
            self.searching = self.searching and answered
            self.cooldown = self.cooldown_steps
            self.backoffs += 1
            return True
        self.capped = False
        if self.searching:
            self._rise(fraction_used, hold, log_ceiling if has_ceiling else None)
        return False

    def _rise(self, fraction_used: float, hold: bool, log_ceiling: float | None) -> None:
        """Rule 1 for one step of the search phase: end it, hold, or rise toward the ceiling."""
        if hold and self.search_after_hold is not False:  # the phase starts once it can move
            self.hold_until = min(fraction_used, self.search_fraction)
        elif self.search_after_hold is None and not self.hold_decided:
            self.hold_decided = True  # the first step with λ̂: count the hold only if it is far
            if log_ceiling is None or log_ceiling < math.log(FAR_BELOW_CEILING):
                self.hold_until = 0.0
        top = self.log_peak_max
        if top is None:
            top = math.log(default_peak_max(self.adaptive, measured=log_ceiling is not None))
        phase_over = fraction_used - self.counted_hold() >= self.search_fraction
        if phase_over or self.log_peak >= top - 1e-9:
            self.searching = False
        elif not hold:
            est = self.search_fraction * self.steps / max(fraction_used, 1e-12)
            target = self.log_peak + RISE / max(10.0, 0.5 * est)
            if log_ceiling is not None:
                top = min(top, log_ceiling)
                self.capped = target > top
            self.log_peak = max(self.log_peak, min(target, top))

    def state_dict(self) -> dict[str, Any]:
        """The search's numbers, its loss watchers and its refresh allowance (a tree)."""
        return search_state(self, list(self._history), list(self._applied))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; :class:`CheckpointError` if invalid.

        The numbers are checked before anything changes; the children then validate their own
        state (a failing child leaves the ones before it loaded: the scheduler rolls back).
        """
        parsed = parse_search_state(state)
        children = parsed["children"]
        self.losses.load_state_dict(children[0])
        self.explosion.load_state_dict(children[1])
        self.allowance.load_state_dict(children[2])
        self.log_peak, self.best_level = parsed["log_peak"], parsed["best_level"]
        self.searching, self.capped = parsed["searching"], parsed["capped"]
        self.steps, self.cooldown, self.backoffs, self.cuts, self.nonfinite_seen = parsed["counts"]
        self.last_refresh, self.discredited = parsed["last_refresh"], parsed["discredited"]
        self.hold_until, self.hold_decided = parsed["hold_until"], parsed["hold_decided"]
        history = parsed["history"]
        self._history = deque(history[-self.lag :], maxlen=self.lag)
        self._applied = deque(parsed["applied"][-self.lag :], maxlen=self.lag)
