"""LossTracker, the loss average the peak search backs off on: its averages, its noise floor and
when it calls a loss rising."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from graff.planner.features import LossTracker


def _feed(tracker: LossTracker, values: list[float]) -> None:
    for v in values:
        tracker.update(v)


def _noise_bound(sigma: float, scale: float, count: int) -> float:
    """σ after one more loss (``count`` losses in), at most: its squared deviation is clipped to
    (3 · scale)², and σ² is the average over 1 − β^(count−1), so the older terms only shrink
    (β (1 − β^(count−2)) ≤ 1 − β^(count−1))."""
    return math.sqrt(sigma**2 + 9 * scale**2 * 0.02 / (1 - 0.98 ** (count - 1)))


def test_averages_are_bias_corrected_exponential_means() -> None:
    values = [3.0, 1.0, 2.0, 5.0, 4.0, 0.5]
    tracker = LossTracker()
    _feed(tracker, values)
    for beta, got in ((0.9, tracker.fast), (0.98, tracker.slow)):
        ema = 0.0
        for v in values:
            ema = beta * ema + (1 - beta) * v
        assert got == pytest.approx(ema / (1 - beta ** len(values)))


def test_minibatch_noise_below_the_tolerance_is_never_rising() -> None:
    gen = torch.Generator().manual_seed(0)
    tracker = LossTracker()
    for v in (1.0 + 0.02 * torch.randn(2000, generator=gen)).tolist():
        tracker.update(v)
        assert not tracker.rising(0.05)


def test_a_level_shift_is_rising_within_a_few_steps() -> None:
    gen = torch.Generator().manual_seed(1)
    tracker = LossTracker()
    _feed(tracker, (1.0 + 0.02 * torch.randn(50, generator=gen)).tolist())
    after = []
    for v in (1.3 + 0.02 * torch.randn(20, generator=gen)).tolist():
        tracker.update(v)
        after.append(tracker.rising(0.05))
    assert any(after[:5])


def test_one_outlier_does_not_mask_the_plateau_after_it() -> None:
    """A lone spike (a bad batch, or the step that killed half the units) must not raise the
    noise floor for the ~50 steps the slow average remembers: the worse plateau after it is
    rising, as it would be without the spike."""
    gen = torch.Generator().manual_seed(2)
    tracker = LossTracker()
    _feed(tracker, (1.0 + 0.03 * torch.randn(40, generator=gen)).tolist())
    sigma = tracker.noise_std
    tracker.update(20.0)  # the spike, 600 σ out
    assert tracker.noise_std <= _noise_bound(sigma, max(sigma, 0.01), tracker.count)
    plateau = (1.15 + 0.03 * torch.randn(30, generator=gen)).tolist()
    after = []
    for v in plateau:
        tracker.update(v)
        after.append(tracker.rising(0.05))
    assert all(after[-15:])


def test_noise_grows_from_a_constant_start() -> None:
    """Clipping is relative to σ with a floor at 1 % of the loss, so a loss constant at first
    cannot lock σ at 0: a later noise level is learnt."""
    tracker = LossTracker()
    _feed(tracker, [1.0] * 10)
    assert tracker.noise_std == pytest.approx(0.0, abs=1e-12)
    _feed(tracker, [1.2, 0.8] * 150)
    assert tracker.noise_std == pytest.approx(0.2, rel=0.1)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0.1, 10.0), min_size=6, max_size=60), st.floats(0.1, 10.0))
def test_one_value_moves_the_noise_by_a_bounded_factor(values: list[float], x: float) -> None:
    tracker = LossTracker()
    _feed(tracker, values)
    sigma, scale = tracker.noise_std, max(tracker.noise_std, 0.01 * abs(tracker.slow))
    tracker.update(x)
    assert tracker.noise_std <= _noise_bound(sigma, scale, tracker.count) * (1 + 1e-9)
