"""The overhead benchmark's accounting (benchmarks/overhead.py) on hand-made objects."""

from __future__ import annotations

import time

import pytest

from benchmarks.overhead import REFERENCE, CpuMeter, _add_net


def _burn(seconds: float) -> None:
    """Spend ``seconds`` of this thread's CPU time."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


class _Probe:
    def _pre_hook(self) -> None:
        _burn(0.004)

    def _post_hook(self) -> None:  # runs an estimate inside, like CurvatureProbe's
        _burn(0.002)
        self._timed_estimate()

    def _timed_estimate(self) -> None:
        _burn(0.010)


class _Scheduler:
    def __init__(self) -> None:
        self.curvature = _Probe()

    def step(self) -> None:  # runs an estimate inside, like a requested λ̂ refresh
        _burn(0.003)
        self.curvature._timed_estimate()


class _Meter(CpuMeter):
    TARGETS = (
        (_Probe, "_pre_hook", "hooks"),
        (_Probe, "_post_hook", "hooks"),
        (_Probe, "_timed_estimate", "estimate"),
        (_Scheduler, "step", "hooks"),
    )


def test_cpu_meter_excludes_estimates_from_the_parts_they_ran_in() -> None:
    with _Meter() as meter:
        sched = _Scheduler()
        sched.curvature._pre_hook()
        sched.curvature._post_hook()
        sched.step()
    hooks, estimate = meter.of(sched)
    assert estimate == pytest.approx(0.020, rel=0.25)
    assert hooks == pytest.approx(0.009, rel=0.25)  # 4 + 2 + 3 ms, both estimates excluded
    parts = meter.parts_of(sched)
    assert set(parts) == {"_Probe._pre_hook", "_Probe._post_hook", "_Scheduler.step"}
    assert parts["_Probe._pre_hook"] == pytest.approx(0.004, rel=0.25)
    assert parts["_Probe._post_hook"] == pytest.approx(0.002, rel=0.25)
    assert parts["_Scheduler.step"] == pytest.approx(0.003, rel=0.25)


def test_cpu_meter_restores_the_methods() -> None:
    original = _Probe.__dict__["_pre_hook"]
    with _Meter():
        assert _Probe.__dict__["_pre_hook"] is not original
    assert _Probe.__dict__["_pre_hook"] is original


def test_net_cost_subtracts_the_reference_schedulers_own_step() -> None:
    results = {
        REFERENCE: {"direct_us_per_step": 60.0},
        "graff": {"direct_us_per_step": 860.0},
        "fixed": {},  # no scheduler: nothing measured, nothing added
    }
    _add_net(results, ref_cpu_median=0.080)  # an 80 ms reference step
    assert results["graff"]["net_us_per_step"] == pytest.approx(800.0)
    assert results["graff"]["net_percent"] == pytest.approx(1.0)
    assert results["graff"]["reference_step_us"] == 60.0
    assert "net_percent" not in results[REFERENCE]
    assert "net_percent" not in results["fixed"]


def test_long_run_refresh_share_and_steady_state_total() -> None:
    from benchmarks.overhead import _long_run, steady_state

    # one refresh 0.5 s every 500 steps of 0.1 s: 1 % of the step; repeats 0.5/1/2 % -> median 1
    runs = [{"refresh_s": 0.5, "interval": i, "estimate_share": 0.004} for i in (1000, 500, 250)]
    ref = [{"wall": 0.1 * 150}] * 3
    out = _long_run(runs, ref, steps=150)
    assert out["long_run_refresh_percent"] == pytest.approx(2.0 / 2)
    assert out["estimate_share_percent"] == pytest.approx(0.4)
    assert (
        _long_run([{"refresh_s": None, "interval": 10, "estimate_share": None}], ref[:1], 150) == {}
    )
    data = {
        "headline": {"results": {"graff": {"net_percent": 0.7}}},
        "amortised": {"results": {"graff": out}},
    }
    total = steady_state(data)
    assert total == pytest.approx(
        {"direct_percent": 0.7, "refresh_percent": 1.0, "total_percent": 1.7}
    )
    assert steady_state({"headline": data["headline"]}) is None
