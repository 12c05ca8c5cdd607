"""The peak-LR search (PeakSearch) and its call site in GraffScheduler.

Closed-form checks of the three rules (ceiling, ceiling only removes what the search added,
back-off to the best level), scripted loss streams through a real GraffScheduler (a loss that
rises above an LR X; a stream where raising never helps; a user LR already too high), and
hypothesis properties of the bounds.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import graff
from graff.planner.config import GraffConfig
from graff.planner.peak_search import PeakSearch
from graff.planner.search_defaults import FAR_BELOW_CEILING
from graff.schedulers.graff import GraffScheduler

LOG10 = math.log(10.0)


def _calibrator(**kw: float) -> PeakSearch:
    args = {"enabled": True, "search_fraction": 0.5, "peak_max": 10.0, "backoff": 3.0} | kw
    return PeakSearch(**args)


# ------------------------------------------------------------------ closed form
def test_rise_rate_reaches_peak_max_half_way_through_the_search() -> None:
    cal = _calibrator(search_fraction=0.4)  # 100-step budget: a 40-step search, 20 steps to 10x
    for step in range(1, 21):
        cal.update(step / 100, 0.0, unstable=False)
    assert cal.log_peak == pytest.approx(LOG10)
    assert cal.searching  # the phase ends at the next step (peak_max reached)
    cal.update(0.21, 0.0, unstable=False)
    assert not cal.searching


def test_rise_stops_at_the_ceiling_and_flags_it() -> None:
    cal = _calibrator()
    ceiling = math.log(2.0)
    for step in range(1, 40):
        cal.update(step / 100, 0.0, unstable=False, log_ceiling=ceiling)
        assert cal.log_peak <= ceiling + 1e-12
    assert cal.log_peak == pytest.approx(ceiling)
    assert cal.capped
    assert cal.searching


def test_ceiling_is_log_bound_minus_log_headroom() -> None:
    cal = _calibrator(headroom=4.0)
    assert cal.ceiling(math.log(12.0)) == pytest.approx(math.log(3.0))
    assert cal.ceiling(None) is None


def test_a_lower_ceiling_removes_the_raise_but_never_cuts_the_user_lr() -> None:
    cal = _calibrator()
    for step in range(1, 21):
        cal.update(step / 100, 0.0, unstable=False)
    assert cal.log_peak > math.log(3.0)
    cal.update(0.21, 0.0, unstable=False, log_ceiling=math.log(1.5))  # λ̂ grew
    assert cal.log_peak == pytest.approx(math.log(1.5))
    cal.update(0.22, 0.0, unstable=False, log_ceiling=-2.0)  # the limit is below the user's LR
    assert cal.log_peak == 0.0  # the guard itself, not the search, handles that case


def test_a_ceiling_below_the_user_lr_keeps_the_search_at_the_user_lr() -> None:
    cal = _calibrator()
    for step in range(1, 40):
        cal.update(step / 100, 0.0, unstable=False, log_ceiling=-0.5)
    assert cal.log_peak == 0.0
    assert cal.capped


def test_backoff_returns_to_the_smallest_level_of_the_lag_before_the_best() -> None:
    cal = _calibrator(lag=3)
    levels = []
    for step in range(1, 9):
        cal.update(step / 100, 0.0, unstable=False, at_best=step <= 5)
        levels.append(cal.log_peak)
    # at step 5 the history held the levels before steps 3, 4, 5 (appended before the rise)
    assert cal.best_level == pytest.approx(levels[1])
    assert cal.update(0.09, 0.0, unstable=True)
    assert cal.log_peak == pytest.approx(levels[1])
    assert not cal.searching
    assert cal.backoffs == 1


def test_backoff_at_the_user_lr_divides_the_lr_reached_by_backoff() -> None:
    cal = _calibrator(search_fraction=0.1)  # watching until 20 % of the budget
    cal.update(0.01, math.log(0.5), unstable=False, hold=True, at_best=True)
    assert cal.update(0.02, math.log(0.5), unstable=True)
    assert cal.log_peak == pytest.approx(math.log(0.5) - math.log(3.0))
    for step in range(3, 22):  # cool-down: no second back-off within 20 steps
        assert not cal.update(step / 100, 0.0, unstable=True)
    assert cal.watching(0.19)
    assert not cal.watching(0.2)
    assert cal.update(0.3, 0.0, unstable=True)  # after the watch: halve
    assert cal.log_peak == pytest.approx(math.log(0.5) - math.log(3.0) - math.log(2.0))


def test_an_excursion_after_the_ceiling_removed_the_raise_does_not_blame_the_user_lr() -> None:
    """The loss average lags the LR by ``lag`` steps: a loss excursion that arrives just after a
    new λ̂ took the raise back (rule 2) was caused by the raised LR, which is already gone, so
    the ceiling has answered it: σ stays where it is and the search goes on under the new
    ceiling, instead of ending with the user's LR cut by ``backoff`` (traced on the SGD CNN: 5.2×
    the user's LR, a λ̂ 19× larger, the spike two steps later, a λ̂ back near its first value
    ten steps after that)."""
    cal = _calibrator(lag=5)
    for step in range(1, 11):
        cal.update(step / 100, 0.0, unstable=False, at_best=6 <= step <= 8)
    assert cal.log_peak > cal.best_level > 0.0
    cal.update(0.11, 0.0, unstable=False, log_ceiling=-1.0)  # a new λ̂: the raise is removed
    assert cal.log_peak == 0.0
    assert cal.update(0.12, 0.0, unstable=True)  # the excursion of the raised LR arrives
    assert cal.log_peak == 0.0  # not 0 - log(backoff): the user's LR was not the cause
    assert cal.searching
    assert cal.backoffs == 1
    # once the lag has passed with no raise in it, an instability does blame the user's LR
    for step in range(13, 40):
        cal.update(step / 100, 0.0, unstable=False, log_ceiling=-1.0)
    assert cal.log_peak == 0.0
    assert cal.update(0.4, 0.0, unstable=True)
    assert cal.log_peak == pytest.approx(-math.log(3.0))
    assert not cal.searching


def test_an_excursion_after_the_applied_lr_was_cut_does_not_blame_the_user_lr() -> None:
    """Whoever cut the LR within the loss average's lag has answered the excursion the average
    now shows: here the guard (not the ceiling, so σ never moved) cut the applied LR 8× one step
    before the spike arrived. σ stays and the search goes on, instead of the user's LR being cut
    by ``backoff`` on top of the guard's cut (traced on the SGD CNN at 10× its LR: 0.103 →
    0.134). A cut smaller than ``backoff`` does not count: the LR the loss blames may still be
    in use."""
    for cut, blamed in ((2.0, True), (8.0, False)):
        cal = _calibrator(lag=5, search_fraction=0.1)
        for step in range(1, 5):
            cal.update(step / 100, 0.0, unstable=False, hold=True, applied=0.0)
        assert cal.log_peak == 0.0
        cal.update(0.05, 0.0, unstable=False, hold=True, applied=-math.log(cut))  # the guard
        assert cal.update(0.06, 0.0, unstable=True, applied=-math.log(cut))  # the spike
        assert cal.backoffs == 1
        if blamed:
            assert cal.log_peak == pytest.approx(-math.log(3.0))
            assert not cal.searching
        else:
            assert cal.log_peak == 0.0
            assert cal.searching
    # once the lag has passed at the cut LR, an instability does blame the user's LR
    for step in range(7, 40):
        cal.update(step / 100, 0.0, unstable=False, hold=True, applied=-math.log(8.0))
    assert cal.update(0.4, 0.0, unstable=True, applied=-math.log(8.0))
    assert cal.log_peak == pytest.approx(-math.log(2.0))  # after the watch: halved


def test_refresh_due_at_most_every_n_steps() -> None:
    cal = _calibrator()
    due = []
    for step in range(1, 26):
        cal.update(step / 100, 0.0, unstable=False)
        due.append(cal.refresh_due(every=10))
    assert [i + 1 for i, d in enumerate(due) if d] == [1, 11, 21]


def test_state_round_trip_continues_identically() -> None:
    a = _calibrator(lag=4)
    for step in range(1, 12):
        a.update(step / 100, -0.1, unstable=step == 9, log_ceiling=1.5, at_best=step % 3 == 0)
    b = _calibrator(lag=4)
    b.load_state_dict(a.state_dict())
    for step in range(12, 40):
        args = (step / 100, 0.0, step == 33)
        kw = {"log_ceiling": 1.0 if step > 20 else None, "at_best": step % 2 == 0}
        assert a.update(*args, **kw) == b.update(*args, **kw)
        assert a.state_dict() == b.state_dict()


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.one_of(st.none(), st.floats(-5.0, 5.0)),  # ceiling
            st.booleans(),  # unstable
            st.booleans(),  # at_best
            st.floats(-3.0, 0.0),  # log prior
        ),
        min_size=1,
        max_size=60,
    )
)
def test_bounds_hold_for_any_signal_stream(stream: list) -> None:
    cal = _calibrator(peak_max=10.0)
    for step, (ceiling, unstable, at_best, log_prior) in enumerate(stream, 1):
        before = cal.log_peak
        cal.update(step / 100, log_prior, unstable, log_ceiling=ceiling, at_best=at_best)
        assert -math.log(1e3) <= cal.log_peak <= LOG10 + 1e-12
        if ceiling is not None:  # a raise never exceeds the ceiling of its step
            assert cal.log_peak <= max(0.0, ceiling, min(before, 0.0)) + 1e-12
        if not cal.searching:
            assert cal.log_peak <= max(before, 0.0) + 1e-12  # no rise after the search


# --------------------------------------------------- scripted streams, real scheduler
def _scripted(
    lr0: float, loss_of_lr, steps: int = 200, seed: int = 0, **kw
) -> tuple[GraffScheduler, list[float]]:
    """GraffScheduler without λ̂ (no model, no loss_fn) fed a loss that depends on its LR."""
    p = nn.Parameter(torch.zeros(4))
    opt = torch.optim.SGD([p], lr=lr0)
    warm_start = kw.pop("warm_start", None)
    config = graff.GraffConfig(**({"online": False, "search_fraction": 0.25} | kw))
    sched = GraffScheduler(
        opt, budget=graff.BudgetClock(steps=steps), warm_start=warm_start, config=config
    )
    gen = torch.Generator().manual_seed(seed)
    loss, lrs = 3.0, []
    for _ in range(steps):
        lr = sched.get_last_lr()[0]
        lrs.append(lr)
        p.grad = torch.full_like(p, 0.1)
        opt.step()
        loss = loss_of_lr(loss, lr) + 0.01 * float(torch.randn((), generator=gen))
        sched.step(torch.tensor(loss))
    return sched, lrs


def _rises_above(x: float):
    """Loss falls with the LR up to ``x`` and rises in proportion to how far above ``x`` it is."""

    def step(loss: float, lr: float) -> float:
        drop = 0.01 * min(lr, x) / x
        return loss - drop * loss / 3.0 + (0.05 * (lr / x - 1.0) if lr > x else 0.0)

    return step


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_loss_rising_above_x_ends_the_search_at_or_below_x(seed: int) -> None:
    lr0, x = 1e-3, 4e-3  # the user's LR is 4x too small, raising above 4e-3 hurts
    sched, lrs = _scripted(lr0, _rises_above(x), seed=seed)
    assert sched.peak_search.backoffs >= 1
    assert max(lrs) > x  # the search did look above x ...
    stable = [lr for lr, k in zip(lrs, range(len(lrs)), strict=True) if 60 <= k < 160]
    assert max(stable) <= x * (1 + 1e-9)  # ... and the stable phase runs at or below it
    assert max(stable) > lr0  # but it kept part of the rise


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_when_raising_never_helps_the_search_ends_at_the_prior(seed: int) -> None:
    lr0 = 1e-3
    sched, lrs = _scripted(lr0, _rises_above(lr0), seed=seed)
    prior = [lr0 * max(sched.prior(k / 200), 1e-3) for k in range(200)]
    assert sched.peak_search.log_peak == 0.0
    assert lrs[60:] == pytest.approx(prior[60:], rel=1e-9)  # the prior alone from then on


def test_a_user_lr_above_the_limit_is_lowered() -> None:
    lr0, x = 1e-2, 2e-3  # the user's LR is 5x above where the loss starts to rise
    sched, lrs = _scripted(lr0, _rises_above(x))
    assert sched.peak_search.log_peak < 0.0
    assert max(lrs[60:]) < lr0 * 0.5


@pytest.mark.parametrize("bias", [0.0, 3.0])
def test_the_search_never_rises_above_its_ceiling_on_a_real_model(bias: float) -> None:
    """With λ̂ (SGD, quadratic), the raised LR stays within c / (headroom · λ̂), also when the
    learned residual asks for more (``bias`` = 3: the decoder wants e^3, clipped to 1.25×)."""
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(10, 10))
    a = q @ torch.diag(torch.linspace(1.0, 20.0, 10)) @ q.T
    theta = nn.Parameter(torch.randn(10))
    opt = torch.optim.SGD([theta], lr=1e-3)  # 95x below c/λ_max

    def loss_fn() -> torch.Tensor:
        return 0.5 * theta @ a @ theta

    sched = GraffScheduler(
        opt,
        budget=graff.BudgetClock(steps=100),
        loss_fn=loss_fn,
        warm_start=None,
        guard=True,
        config=graff.GraffConfig(
            online=False, peak_max=1e3, search_headroom=4.0, curvature_every=5
        ),
    )
    with torch.no_grad():
        sched.planner.lr_b.fill_(bias)
    for _ in range(100):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step(loss)
        lam = sched.curvature.lambda_max_safe
        if lam is not None:
            assert sched.get_last_lr()[0] * lam <= sched.guard_c / 4.0 * (1 + 1e-6)
    assert sched.peak_search.log_peak > math.log(5.0)  # it did rise, up to the ceiling


def test_default_headroom_is_optimizer_aware() -> None:
    from graff.planner.search_defaults import default_headroom

    p = nn.Parameter(torch.zeros(2))
    assert default_headroom(torch.optim.AdamW([p])) == 4.0
    assert default_headroom(torch.optim.RMSprop([p])) == 4.0
    assert default_headroom(torch.optim.SGD([p], lr=0.1)) == 8.0
    sched = GraffScheduler(torch.optim.AdamW([p]), budget=10, warm_start=None)
    assert sched.peak_search.log_headroom == pytest.approx(math.log(4.0))


def test_refresh_allowance_allows_a_fraction_of_the_projected_run(monkeypatch) -> None:
    """S + c ≤ f · (T − T_probe) / u, closed form on a fake clock."""
    from graff.planner import refresh as _allowance

    now = [100.0]
    monkeypatch.setattr(_allowance.time, "perf_counter", lambda: now[0])
    budget = _allowance.RefreshAllowance(0.1)
    budget.tick()  # starts at t = 100
    now[0] = 110.0
    budget.tick()  # 10 s elapsed, 4 of them in the probe: 6 s training at u = 0.2 -> 30 s run
    assert budget.affordable(first_cost=3.0, probe_seconds=4.0, fraction_used=0.2)  # 3 <= 3
    assert not budget.affordable(first_cost=3.01, probe_seconds=4.0, fraction_used=0.2)
    budget.charge(2.5)  # the last refresh's cost is the next guess: 2.5 + 2.5 > 3
    assert not budget.affordable(first_cost=0.0, probe_seconds=4.0, fraction_used=0.2)
    assert budget.affordable(first_cost=0.0, probe_seconds=4.0, fraction_used=0.1)  # 60 s run
    assert not budget.affordable(first_cost=0.0, probe_seconds=4.0, fraction_used=0.0)
    state = budget.state_dict()
    resumed = _allowance.RefreshAllowance(0.1)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state
    now[0] = 500.0
    resumed.tick()  # the clock restarts at the first tick after a resume: no time lost or added
    assert resumed.elapsed == pytest.approx(10.0)
    assert _allowance.RefreshAllowance(0.0).affordable(0.0, 0.0, 0.5) is False


@pytest.mark.parametrize(
    "state",
    [
        {"spent": -1.0, "count": 0, "last_cost": None, "elapsed": 1.0},
        {"spent": 1.0, "count": 0, "last_cost": float("nan"), "elapsed": 1.0},
        {"spent": 1.0, "count": -2, "last_cost": None, "elapsed": 1.0},
        {"spent": 1.0, "count": 0, "last_cost": None},
        {"spent": "x", "count": 0, "last_cost": None, "elapsed": 1.0},
    ],
)
def test_refresh_allowance_rejects_bad_state(state: dict) -> None:
    from graff.errors import CheckpointError
    from graff.planner.refresh import RefreshAllowance

    budget = RefreshAllowance(0.1)
    with pytest.raises(CheckpointError, match="refresh-allowance"):
        budget.load_state_dict(state)


def test_refresh_allowance_in_steps_reads_no_clock(monkeypatch) -> None:
    """Under a step budget: (count + 1) · c ≤ f · total steps, whatever the clock reads."""
    from graff.planner import refresh as _allowance

    def no_clock() -> float:
        raise AssertionError("the step-priced allowance must not read a clock")

    monkeypatch.setattr(_allowance.time, "perf_counter", no_clock)
    budget = _allowance.RefreshAllowance(0.1)
    assert budget.affordable_steps(cost_steps=13.0, total_steps=130)  # 13 <= 13
    assert not budget.affordable_steps(cost_steps=13.0, total_steps=129)
    budget.charge(123.0)  # the measured seconds are recorded, but only the count prices it
    assert budget.affordable_steps(cost_steps=13.0, total_steps=260)  # 2 · 13 <= 26
    assert not budget.affordable_steps(cost_steps=13.0, total_steps=259)
    assert not _allowance.RefreshAllowance(0.0).affordable_steps(1.0, 1e9)


@pytest.mark.parametrize(("share", "refreshes"), [(1.0, True), (0.0, False)])
def test_time_share_caps_the_search_refreshes_under_a_wall_clock_budget(
    share: float, refreshes: bool
) -> None:
    """Under a clock, extra λ̂ refreshes stop once GRAFF's own time would exceed ``time_share``.

    SGD at 2.0 on a least-squares problem of sharpness ≈ 3: the guard's bound (2/3) is below the
    user's LR, so the search asks for a refresh every 10 steps. A long budget leaves the refresh
    allowance ample, so ``time_share`` alone decides (0: GRAFF's own time, the cold start
    already, is over it). The allowance projects the run from wall-clock time, so how soon the
    first refresh is affordable depends on the machine's load (1-5 refreshes in 60 steps on a
    busy machine): 200 steps leave room for three on any machine.
    """
    from graff import BudgetClock, GraffConfig

    torch.manual_seed(0)
    a, b = torch.randn(32, 8), torch.randn(32)
    w = nn.Parameter(torch.zeros(8))

    def loss_fn() -> torch.Tensor:
        return (a @ w - b).pow(2).mean()

    opt = torch.optim.SGD([w], lr=2.0)
    config = GraffConfig(time_share=share, refresh_allowance=1.0, planner=False)
    sched = GraffScheduler(opt, BudgetClock(seconds=1000.0), loss_fn=loss_fn, config=config)
    for _ in range(200):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
        sched.step(loss)
    assert sched.curvature.lambda_max == pytest.approx(3.0366, rel=0.01)  # 2·λ_max(AᵀA)/32
    assert (sched.peak_search.allowance.count >= 3) is refreshes
    assert max(sched.get_last_lr()) < 2.0 / 3.0  # the guard's bound holds either way


def test_time_share_closed_form(monkeypatch) -> None:
    """O + c ≤ s · T / u on a fake clock, next to the refresh fraction's own test."""
    from graff.planner import refresh as _allowance

    now = [0.0]
    monkeypatch.setattr(_allowance.time, "perf_counter", lambda: now[0])
    budget = _allowance.RefreshAllowance(1.0, time_share=0.02)
    budget.tick()
    now[0] = 10.0
    budget.tick()  # 10 s at u = 0.1: a 100 s run, 2 s of own time allowed
    assert budget.affordable(first_cost=0.5, probe_seconds=0.0, fraction_used=0.1, own_seconds=1.5)
    assert not budget.affordable(0.5, 0.0, 0.1, own_seconds=1.51)
    assert budget.affordable(0.5, 0.0, 0.05, own_seconds=3.5)  # a 200 s run: 4 s allowed
    never = _allowance.RefreshAllowance(1.0, time_share=0.0)
    never.tick()
    now[0] = 20.0
    never.tick()
    assert not never.affordable(first_cost=0.1, probe_seconds=0.0, fraction_used=0.1)


# ----------------------------------------------------------- search_after_hold
def _phase_end(
    after_hold: bool | None,
    hold_steps: int,
    *,
    search_fraction: float = 0.15,
    ceiling: float = 0.5,
    peaks: list[float] | None = None,
) -> int:
    """The step (of a 100-step budget) at which the search stops, holding for the first
    ``hold_steps`` (no λ̂ yet) and then rising under a ceiling that stops it at σ = ``ceiling``
    (appending σ after each step to ``peaks``)."""
    cal = _calibrator(search_fraction=search_fraction, peak_max=1e4, search_after_hold=after_hold)
    for step in range(1, 101):
        cal.update(step / 100, 0.0, unstable=False, hold=step <= hold_steps, log_ceiling=ceiling)
        if peaks is not None:
            peaks.append(cal.log_peak)
        if not cal.searching:
            return step
    return 101


def test_search_after_hold_starts_the_phase_at_the_first_estimate() -> None:
    """Closed form: the phase ends at 15 % of the budget counted from the last hold step (10 +
    15 = 25 of 100), against 15 without the option; no hold: both end at 15."""
    assert _phase_end(False, 10) == 15
    assert _phase_end(True, 10) == 25
    assert _phase_end(True, 0) == _phase_end(False, 0) == 15


def test_search_after_hold_delays_the_phase_by_at_most_its_length() -> None:
    """A λ̂ that never comes: the hold delays the phase by at most ``search_fraction``, so the
    search (and its tight watch) still ends, at twice ``search_fraction``."""
    assert _phase_end(True, 100) == 30
    cal = _calibrator(search_fraction=0.15, search_after_hold=True)
    for step in range(1, 31):
        cal.update(step / 100, 0.0, unstable=False, hold=True)
    assert cal.hold_until == pytest.approx(0.15)
    assert cal.watching(0.44)
    assert not cal.watching(0.46)


def test_search_after_hold_state_round_trips_and_old_states_load() -> None:
    cal = _calibrator(search_fraction=0.15, search_after_hold=True)
    for step in range(1, 8):
        cal.update(step / 100, 0.0, unstable=False, hold=True)
    state = cal.state_dict()
    other = _calibrator(search_fraction=0.15, search_after_hold=True)
    other.load_state_dict(state)
    assert other.hold_until == pytest.approx(0.07)
    old = {k: v for k, v in state.items() if k != "hold_until"}  # a checkpoint from before
    fresh = _calibrator(search_fraction=0.15, search_after_hold=True)
    fresh.load_state_dict(old)
    assert fresh.hold_until == 0.0
    with pytest.raises(graff.errors.CheckpointError):
        fresh.load_state_dict({**state, "hold_until": 2.0})


@pytest.mark.parametrize("hold_steps", [0, 5, 10, 14])
def test_search_after_hold_auto_counts_the_hold_only_under_a_far_ceiling(hold_steps) -> None:
    """``None`` (the default): a first λ̂ whose ceiling is ≥ 20× (FAR_BELOW_CEILING) counts the
    hold out of the phase, as True does; a nearer ceiling gives False's run, σ for σ."""
    far, near = math.log(FAR_BELOW_CEILING), math.log(FAR_BELOW_CEILING) - 1e-6
    for ceiling, twin in ((far, True), (near, False), (math.log(200.0), True), (0.5, False)):
        auto_peaks: list[float] = []
        twin_peaks: list[float] = []
        end = _phase_end(None, hold_steps, ceiling=ceiling, peaks=auto_peaks)
        assert end == _phase_end(twin, hold_steps, ceiling=ceiling, peaks=twin_peaks)
        assert auto_peaks == twin_peaks
    assert _phase_end(None, 10, ceiling=far) == 25  # closed form: 10 held + 15 searched
    assert _phase_end(None, 10, ceiling=near) == 15


def test_search_after_hold_auto_decides_once_and_a_lambda_that_never_comes_ends_it() -> None:
    """The decision is the first λ̂'s: a later, lower ceiling does not shorten the phase again.
    Held for the whole phase (no λ̂ ever), the search ends at ``search_fraction``, as False."""
    cal = _calibrator(search_fraction=0.15, peak_max=1e4, search_after_hold=None)
    for step in range(1, 11):
        cal.update(step / 100, 0.0, unstable=False, hold=True)
    cal.update(0.11, 0.0, unstable=False, log_ceiling=math.log(50.0))
    assert cal.hold_decided
    assert cal.counted_hold() == pytest.approx(0.10)
    for step in range(12, 25):
        cal.update(step / 100, 0.0, unstable=False, log_ceiling=0.1)  # a refresh: ceiling 1.1x
        assert cal.searching
    assert _phase_end(None, 100) == 15


def test_search_after_hold_auto_state_round_trips_mid_hold_and_after_the_decision() -> None:
    cal = _calibrator(search_fraction=0.15, peak_max=1e4, search_after_hold=None)
    for step in range(1, 8):
        cal.update(step / 100, 0.0, unstable=False, hold=True)
    assert not cal.hold_decided
    assert cal.counted_hold() == 0.0  # undecided: behaves as False
    mid = _calibrator(search_fraction=0.15, peak_max=1e4, search_after_hold=None)
    mid.load_state_dict(cal.state_dict())
    for c in (cal, mid):  # both resume to the same decision and the same phase
        for step in range(8, 11):
            c.update(step / 100, 0.0, unstable=False, hold=True)
        c.update(0.11, 0.0, unstable=False, log_ceiling=math.log(30.0))
    assert mid.state_dict() == cal.state_dict()
    assert mid.hold_decided
    assert mid.counted_hold() == pytest.approx(0.10)
    old = {k: v for k, v in cal.state_dict().items() if k != "hold_decided"}  # before auto
    fresh = _calibrator(search_fraction=0.15, search_after_hold=None)
    fresh.load_state_dict(old)
    assert fresh.hold_decided  # an old run's hold was already settled
    with pytest.raises(graff.errors.CheckpointError):
        fresh.load_state_dict({**cal.state_dict(), "hold_decided": "yes"})


def test_search_after_hold_config_takes_none_true_or_false() -> None:
    assert GraffConfig().search_after_hold is None
    for value in (None, True, False):
        assert GraffConfig(search_after_hold=value).search_after_hold is value
    with pytest.raises(graff.errors.GraffTypeError, match="search_after_hold"):
        GraffConfig(search_after_hold="auto")


# ------------------------------------------------------------ default peak_max
def test_default_peak_max_closed_form() -> None:
    from graff.planner.search_defaults import default_peak_max

    assert default_peak_max(adaptive=True, measured=True) == 30.0
    assert default_peak_max(adaptive=True, measured=False) == 10.0
    assert default_peak_max(adaptive=False, measured=True) == 10.0
    assert default_peak_max(adaptive=False, measured=False) == 10.0
    assert graff.GraffConfig().peak_max is None


def _top_reached(adaptive: bool, ceiling: float | None) -> float:
    """The peak factor a default-``peak_max`` search reaches over a 40-step search phase."""
    cal = _calibrator(search_fraction=0.4, peak_max=None, adaptive=adaptive)
    for step in range(1, 101):
        cal.update(step / 100, 0.0, unstable=False, log_ceiling=ceiling)
    return math.exp(cal.log_peak)


@pytest.mark.parametrize(
    ("adaptive", "ceiling", "expected"),
    [
        (True, math.log(1e3), 30.0),  # a measured ceiling far above: 30x
        (True, None, 10.0),  # nothing but the loss can stop the rise: 10x
        (False, math.log(1e3), 10.0),  # SGD-type: 10x
        (True, math.log(20.0), 20.0),  # the ceiling still binds below 30x
    ],
)
def test_default_peak_max_reached(adaptive: bool, ceiling: float | None, expected: float) -> None:
    assert _top_reached(adaptive, ceiling) == pytest.approx(expected)


def test_an_explicit_peak_max_is_kept_without_a_ceiling() -> None:
    cal = _calibrator(search_fraction=0.4, peak_max=50.0, adaptive=True)
    for step in range(1, 101):
        cal.update(step / 100, 0.0, unstable=False)
    assert math.exp(cal.log_peak) == pytest.approx(50.0)


def test_adam_with_a_measured_lambda_rises_past_ten_on_a_flat_quadratic() -> None:
    """A real GraffScheduler on AdamW 1e-4 over a flat quadratic (λ̂ tiny, the loss healthy):
    with ``loss_fn`` (a measured ceiling) the search passes 10x the user's LR; without any way
    to measure λ̂ it stops at 10x. The control is the same run without ``loss_fn``."""

    def run(with_lambda: bool) -> float:
        torch.manual_seed(0)
        theta = nn.Parameter(torch.randn(10) * 10)
        opt = torch.optim.AdamW([theta], lr=1e-4, weight_decay=0.0)

        def loss_fn() -> torch.Tensor:
            return 1e-3 * theta.pow(2).sum()

        sched = GraffScheduler(
            opt,
            budget=graff.BudgetClock(steps=400),
            loss_fn=loss_fn if with_lambda else None,
            warm_start=None,
            config=graff.GraffConfig(planner=False),
        )
        peak = 0.0
        for _ in range(400):
            loss = loss_fn()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step(loss)
            peak = max(peak, sched.get_last_lr()[0] / 1e-4)
        return peak

    assert run(with_lambda=True) > 20.0
    assert run(with_lambda=False) == pytest.approx(10.0, rel=1e-6)
