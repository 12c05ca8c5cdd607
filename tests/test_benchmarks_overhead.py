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


def test_every_task_steady_state_from_runs_alone() -> None:
    from benchmarks.overhead_tasks import REFERENCE as REF
    from benchmarks.overhead_tasks import markdown, summarise

    # cosine steps of 10 ms with a 20 µs LambdaLR step; GRAFF 120 µs direct -> net 100 µs = 1 %;
    # a 50 ms refresh every 1,000 steps of 10 ms -> 0.5 %; repeats 2 and 3 scale it by 2 and 4
    ref = [{"median_step_s": 0.01, "direct_s_per_step": 20e-6}] * 3
    graff = [
        {
            "median_step_s": 0.0101,
            "direct_s_per_step": 120e-6,
            "refresh_s": 0.05 * k,
            "interval": 1000,
        }
        for k in (1, 2, 4)
    ]
    out = summarise({REF: ref, "graff": graff}, steps=300)
    assert out["net_us_per_step"] == pytest.approx(100.0)
    assert out["direct_percent"] == pytest.approx(1.0)
    assert out["refresh_percent"] == pytest.approx(1.0)  # median of 0.5 / 1 / 2 %
    assert out["total_percent"] == pytest.approx(2.0)
    assert out["refresh_ms"] == pytest.approx(100.0)
    # LambdaLR's own step(): 20 µs of a 10 ms step, the floor any torch scheduler pays
    assert out["reference_us_per_step"] == pytest.approx(20.0)
    assert out["reference_percent"] == pytest.approx(0.2)
    assert (out["cosine_step_ms"], out["interval"], out["repeats"]) == (
        pytest.approx(10.0),
        1000,
        3,
    )
    # no λ̂ (no refresh measured): the steady state is the direct cost alone
    alone = summarise(
        {REF: ref[:1], "graff": [{"median_step_s": 0.01, "direct_s_per_step": 60e-6}]}, 9
    )
    assert alone["refresh_percent"] == 0.0
    assert alone["total_percent"] == pytest.approx(0.4)
    table = "\n".join(markdown({"results": {"t": out, "u": alone}, "repeats": 3}))
    assert (
        "| `t` | 10.00 | 0.20 % (20 µs) | 1.00 % (100 µs) | 100 | 1000 | 1.00 % | **2.00 %** | no |"
        in table
    )
    assert (
        "| `u` | 10.00 | 0.20 % (20 µs) | 0.40 % (40 µs) | 0 | — | 0.00 % | **0.40 %** | yes |"
        in table
    )


def test_every_task_measures_a_real_task_alone() -> None:
    """One repeat on a short digits-MLP run: GRAFF costs something, one refresh is timed."""
    from benchmarks.overhead_tasks import measure_task
    from benchmarks.suites import build_task

    task = build_task("digits_mlp", {"steps": 40})
    task.setup(None)
    out = measure_task(task, repeats=1)
    assert out["steps"] == 40
    assert out["repeats"] == 1
    assert out["cosine_step_ms"] > 0
    assert out["net_us_per_step"] > 0
    assert out["refresh_ms"] > 0
    assert out["interval"] >= 10
    assert out["total_percent"] == pytest.approx(out["direct_percent"] + out["refresh_percent"])
