"""benchmarks/stats.py: scipy.stats p-values agree with closed forms, with the former
hand-written Simpson integration (kept here as an independent oracle), and with the p-values
stored in the committed benchmark results."""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("scipy")

from benchmarks.report import summarize
from benchmarks.stats import paired_t_test, sign_flip_test

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def _simpson_p(t: float, df: int) -> float:
    """The former benchmarks/stats.py p-value: I_{df/(df+t²)}(df/2, 1/2) by Simpson's rule."""
    a, b = df / 2.0, 0.5
    x_max = df / (df + t * t)
    s = np.linspace(0.0, 1.0, 20001)
    x = x_max * s * s
    f = np.power(x, a - 1.0, where=x > 0, out=np.zeros_like(x)) * (1.0 - x) ** (b - 1.0)
    f = f * 2.0 * x_max * s
    h = s[1] - s[0]
    integral = h / 3.0 * (f[0] + f[-1] + 4.0 * f[1:-1:2].sum() + 2.0 * f[2:-1:2].sum())
    log_beta = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    return float(min(1.0, integral / math.exp(log_beta)))


def _enumerated_sign_flip(d: list[float]) -> float:
    observed = abs(float(np.mean(d)))
    flips = np.array(list(itertools.product((1.0, -1.0), repeat=len(d))))
    return float((np.abs((flips * np.asarray(d)).mean(axis=1)) >= observed - 1e-15).mean())


def _pairs(n: int, seed: int) -> tuple[list[float], list[float]]:
    rng = random.Random(seed)
    x = [rng.gauss(0.0, 1.0) for _ in range(n)]
    return x, [v + rng.gauss(0.3, 0.5) for v in x]


@pytest.mark.parametrize("seed", range(5))
def test_p_matches_the_closed_forms_for_one_and_two_degrees_of_freedom(seed: int) -> None:
    for n, exact in (
        (2, lambda t: 1.0 - 2.0 / math.pi * math.atan(abs(t))),
        (3, lambda t: 1.0 - abs(t) / math.sqrt(2.0 + t * t)),
    ):
        r = paired_t_test(*_pairs(n, seed))
        assert r["p"] == pytest.approx(exact(r["t"]), abs=1e-12)


@pytest.mark.parametrize("n", [3, 4, 5, 8])
def test_p_agrees_with_the_former_simpson_integration(n: int) -> None:
    for seed in range(20):
        x, y = _pairs(n, seed)
        r = paired_t_test(x, y)
        d = np.subtract(x, y)
        assert r["t"] == pytest.approx(d.mean() / (d.std(ddof=1) / math.sqrt(n)), rel=1e-12)
        assert r["p"] == pytest.approx(_simpson_p(r["t"], n - 1), abs=1e-6)


def test_degenerate_inputs_keep_their_former_answers() -> None:
    assert paired_t_test([1.0, 2.0], [1.0, 2.0]) == {"mean_diff": 0.0, "t": 0.0, "p": 1.0}
    shifted = paired_t_test([2.0, 3.0, 4.0], [1.0, 2.0, 3.0])
    assert shifted["t"] == math.inf
    assert shifted["p"] == 0.0
    one = paired_t_test([1.0], [0.5])
    assert one["mean_diff"] == 0.5
    assert math.isnan(one["t"])
    assert math.isnan(one["p"])
    assert math.isnan(sign_flip_test([], []))
    assert sign_flip_test([1.0], [0.5]) == 1.0


@pytest.mark.parametrize("n", [2, 3, 5])
def test_sign_flip_matches_full_enumeration(n: int) -> None:
    for seed in range(10):
        x, y = _pairs(n, seed)
        assert sign_flip_test(x, y) == _enumerated_sign_flip(list(np.subtract(x, y)))
    assert sign_flip_test([1.0, 2.0, 3.0], [0.0, 1.0, 2.0]) == pytest.approx(2 / 2**3)


@pytest.mark.parametrize("suite", ["full", "floor"])
def test_committed_results_tests_are_reproduced(suite: str) -> None:
    data = json.loads((RESULTS / suite / "results.json").read_text())
    stored = {t: ts["tests"] for t, ts in data["summary"]["tasks"].items()}
    fresh = {t: ts["tests"] for t, ts in summarize(data["runs"])["tasks"].items()}
    assert fresh.keys() == stored.keys()
    compared = 0
    for task, tests in stored.items():
        assert tests.keys() <= fresh[task].keys()  # newer code may test more pairs
        for name, old in tests.items():
            new = fresh[task][name]
            assert new["against"] == old["against"]
            assert new["n"] == old["n"]
            assert new["t"] == pytest.approx(old["t"], rel=1e-9)
            assert new["p"] == pytest.approx(old["p"], abs=1e-6)
            assert new["sign_flip_p"] == old["sign_flip_p"]
            compared += 1
    assert compared > 0


def test_a_clock_budget_spent_before_the_loop_still_takes_one_step() -> None:
    """A few-millisecond budget can run out while a loaded machine preempts the process
    between set-up and the loop: the run still takes its first step, then stops."""
    from benchmarks.loop import clock_budget
    from graff import BudgetClock

    now = [0.0]
    clock = BudgetClock(seconds=0.01, time_fn=lambda: now[0]).start()
    now[0] = 1.0  # the whole budget gone before the first step
    stop = clock_budget(clock, max_steps=5)
    assert not stop(0)
    assert stop(1)
    fresh = BudgetClock(seconds=10.0, time_fn=lambda: now[0]).start()
    assert not clock_budget(fresh, max_steps=5)(4)
    assert clock_budget(fresh, max_steps=5)(5)
