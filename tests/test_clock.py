"""Tests of BudgetClock: validation, units, step budgets, fake time, pauses, checkpoints, energy.

Time is always driven by the ``fake_time`` fixture (or a list of readings); nothing sleeps.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from graff.clock import BudgetClock
from graff.errors import CheckpointError, GraffConfigError, GraffTypeError


def _roundtrip(state: dict) -> dict:
    """Save with torch.save and load back with weights_only=True, as a checkpoint would."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


class Readings:
    """A time source returning a fixed sequence of readings, then repeating the last one."""

    def __init__(self, values: list[float]) -> None:
        self.values = list(values)
        self.i = 0

    def __call__(self) -> float:
        value = self.values[min(self.i, len(self.values) - 1)]
        self.i += 1
        return value


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize("name", ["seconds", "minutes", "hours", "steps"])
@pytest.mark.parametrize("value", [0, -1, -0.5, math.nan, math.inf, -math.inf])
def test_non_positive_or_non_finite_budget_is_rejected(name: str, value: float) -> None:
    with pytest.raises(GraffConfigError, match=rf"BudgetClock\({name}=\.\.\.\) must be"):
        BudgetClock(**{name: value})


@pytest.mark.parametrize(
    "kwargs",
    [
        {"seconds": 10, "steps": 5},
        {"minutes": 1, "hours": 1},
        {"seconds": 1, "minutes": 1, "hours": 1, "steps": 1},
    ],
)
def test_more_than_one_budget_is_rejected(kwargs: dict) -> None:
    with pytest.raises(GraffConfigError, match="needs exactly one of"):
        BudgetClock(**kwargs)


def test_no_budget_is_rejected() -> None:
    with pytest.raises(GraffConfigError, match=r"needs exactly one of .* got none"):
        BudgetClock()


@pytest.mark.parametrize("steps", [2.5, 0.1, 1e-3])
def test_fractional_steps_are_rejected(steps: float) -> None:
    with pytest.raises(GraffConfigError, match=r"steps=\.\.\.\) must be a whole number"):
        BudgetClock(steps=steps)


@pytest.mark.parametrize("name", ["seconds", "steps"])
@pytest.mark.parametrize("value", [True, False])
def test_bool_budget_is_rejected(name: str, value: bool) -> None:
    with pytest.raises(GraffTypeError, match="must be a real number"):
        BudgetClock(**{name: value})


@pytest.mark.parametrize("value", ["10", [10]])
def test_non_number_budget_is_rejected(value: object) -> None:
    with pytest.raises(GraffTypeError, match="must be a real number"):
        BudgetClock(seconds=value)


def test_errors_are_value_and_type_errors() -> None:
    with pytest.raises(ValueError, match="needs exactly one of"):
        BudgetClock()
    with pytest.raises(TypeError, match="must be a real number"):
        BudgetClock(steps=True)


def test_non_callable_time_fn_is_rejected() -> None:
    with pytest.raises(GraffTypeError, match="time_fn must be callable"):
        BudgetClock(seconds=1, time_fn=3.0)


@pytest.mark.parametrize("n", [-1, 1.0, True, "2"])
def test_tick_rejects_bad_counts(n: object) -> None:
    clock = BudgetClock(steps=10)
    with pytest.raises(GraffConfigError, match=r"tick\(n\) needs a non-negative integer"):
        clock.tick(n)


# ----------------------------------------------------------------------------- units
@pytest.mark.parametrize(
    ("kwargs", "seconds"),
    [
        ({"seconds": 90}, 90.0),
        ({"seconds": 0.25}, 0.25),
        ({"minutes": 2}, 120.0),
        ({"minutes": 0.5}, 30.0),
        ({"hours": 1}, 3600.0),
        ({"hours": 0.25}, 900.0),
    ],
)
def test_wall_clock_budgets_are_converted_to_seconds(kwargs: dict, seconds: float) -> None:
    clock = BudgetClock(**kwargs)
    assert clock.kind == "seconds"
    assert clock.total == pytest.approx(seconds)


def test_whole_float_steps_are_accepted() -> None:
    clock = BudgetClock(steps=4.0)
    assert clock.kind == "steps"
    assert clock.total == 4.0


# ----------------------------------------------------------------------------- step budgets
@pytest.mark.parametrize("total", [1, 7, 100])
def test_step_budget_fraction_remaining_and_exhausted(total: int) -> None:
    clock = BudgetClock(steps=total)
    assert clock.fraction_used == 0.0
    assert clock.remaining == total
    for k in range(1, total + 1):
        clock.tick()
        assert clock.steps == k
        assert clock.elapsed == float(k)
        assert clock.fraction_used == pytest.approx(k / total)
        assert clock.remaining == pytest.approx(total - k)
        assert clock.exhausted == (k >= total)
    clock.tick(5)  # past the budget: clamped, never negative
    assert clock.fraction_used == 1.0
    assert clock.remaining == 0.0
    assert clock.exhausted


def test_tick_starts_the_clock_and_chains() -> None:
    clock = BudgetClock(steps=10)
    assert not clock.started
    assert clock.tick(3).tick(0) is clock
    assert clock.started
    assert clock.steps == 3


def test_step_budget_ignores_wall_clock(fake_time) -> None:
    clock = BudgetClock(steps=10, time_fn=fake_time).start()
    fake_time.advance(1e6)
    assert clock.fraction_used == 0.0
    assert clock.elapsed_seconds == pytest.approx(1e6)


# ----------------------------------------------------------------------------- wall clock
def test_nothing_counts_before_start(fake_time) -> None:
    clock = BudgetClock(seconds=10, time_fn=fake_time)
    fake_time.advance(5)
    assert clock.elapsed_seconds == 0.0
    assert clock.fraction_used == 0.0


def test_elapsed_follows_the_time_source(fake_time) -> None:
    clock = BudgetClock(seconds=10, time_fn=fake_time).start()
    fake_time.advance(2.5)
    assert clock.elapsed == pytest.approx(2.5)
    assert clock.fraction_used == pytest.approx(0.25)
    assert clock.remaining == pytest.approx(7.5)
    assert not clock.exhausted
    fake_time.advance(7.5)
    assert clock.exhausted
    fake_time.advance(100)
    assert clock.fraction_used == 1.0
    assert clock.remaining == 0.0


def test_start_is_idempotent(fake_time) -> None:
    clock = BudgetClock(seconds=10, time_fn=fake_time).start()
    fake_time.advance(3)
    assert clock.start() is clock
    fake_time.advance(1)
    assert clock.elapsed_seconds == pytest.approx(4.0)


def test_paused_time_does_not_count(fake_time) -> None:
    clock = BudgetClock(seconds=100, time_fn=fake_time).start()
    fake_time.advance(2)
    with clock.paused() as same:
        assert same is clock
        fake_time.advance(50)
        assert clock.elapsed_seconds == pytest.approx(2.0)
    fake_time.advance(3)
    assert clock.elapsed_seconds == pytest.approx(5.0)


def test_nested_pauses_exclude_time_until_the_outermost_exits(fake_time) -> None:
    clock = BudgetClock(seconds=100, time_fn=fake_time).start()
    fake_time.advance(1)
    with clock.paused():
        fake_time.advance(10)
        with clock.paused():
            fake_time.advance(20)
        fake_time.advance(30)  # still inside the outer pause
        assert clock.elapsed_seconds == pytest.approx(1.0)
    fake_time.advance(4)
    assert clock.elapsed_seconds == pytest.approx(5.0)


def test_pause_survives_an_exception(fake_time) -> None:
    clock = BudgetClock(seconds=100, time_fn=fake_time).start()

    def fail_while_paused() -> None:
        with clock.paused():
            fake_time.advance(10)
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fail_while_paused()
    fake_time.advance(2)
    assert clock.elapsed_seconds == pytest.approx(2.0)


def test_start_inside_a_pause_counts_from_the_end_of_the_pause(fake_time) -> None:
    clock = BudgetClock(seconds=100, time_fn=fake_time)
    with clock.paused():
        clock.start()
        fake_time.advance(10)
    fake_time.advance(1)
    assert clock.elapsed_seconds == pytest.approx(1.0)


def test_clock_jumping_backwards_never_decreases_elapsed(fake_time) -> None:
    clock = BudgetClock(seconds=100, time_fn=fake_time).start()
    fake_time.advance(10)
    assert clock.elapsed_seconds == pytest.approx(10.0)
    fake_time.advance(-7)
    assert clock.elapsed_seconds == pytest.approx(10.0)
    fake_time.advance(-50)
    assert clock.elapsed_seconds == pytest.approx(10.0)
    fake_time.advance(60)  # back past the previous maximum: time counts again
    assert clock.elapsed_seconds == pytest.approx(13.0)


@pytest.mark.parametrize("junk", [math.nan, math.inf, -math.inf])
def test_non_finite_readings_never_decrease_elapsed(junk: float) -> None:
    source = Readings([0.0, 4.0, junk, junk, 6.0])
    clock = BudgetClock(seconds=100, time_fn=source).start()
    seen = [clock.elapsed_seconds for _ in range(4)]
    assert seen == pytest.approx([4.0, 4.0, 4.0, 6.0])
    assert all(math.isfinite(x) for x in seen)


@pytest.mark.parametrize("junk", [math.nan, math.inf])
def test_non_finite_first_reading_counts_nothing(junk: float) -> None:
    clock = BudgetClock(seconds=100, time_fn=Readings([junk, 0.0, 5.0])).start()
    elapsed = clock.elapsed_seconds
    assert 0.0 <= elapsed <= 5.0
    BudgetClock(seconds=100).load_state_dict(clock.state_dict())


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=1, max_size=30),
    st.floats(min_value=1e-3, max_value=1e6),
)
def test_fraction_used_stays_in_unit_interval(readings: list[float], seconds: float) -> None:
    clock = BudgetClock(seconds=seconds, time_fn=Readings(readings)).start()
    previous = 0.0
    for _ in readings:
        fraction = clock.fraction_used
        assert 0.0 <= fraction <= 1.0
        assert fraction >= previous  # never goes back
        assert clock.remaining >= 0.0
        previous = fraction


# ----------------------------------------------------------------------------- checkpoints
def test_seconds_state_round_trip_continues_and_skips_downtime(fake_time) -> None:
    clock = BudgetClock(minutes=1, time_fn=fake_time).start()
    fake_time.advance(12)
    state = _roundtrip(clock.state_dict())
    assert state["format_version"] == 1
    assert state["elapsed_seconds"] == pytest.approx(12.0)

    fake_time.advance(3600)  # downtime between save and resume
    resumed = BudgetClock(minutes=1, time_fn=fake_time)
    resumed.load_state_dict(state)
    assert resumed.started
    assert resumed.elapsed_seconds == pytest.approx(12.0)
    fake_time.advance(6)
    assert resumed.elapsed_seconds == pytest.approx(18.0)
    assert resumed.fraction_used == pytest.approx(18.0 / 60.0)


def test_resume_in_a_new_process_with_a_smaller_time_origin(fake_time) -> None:
    clock = BudgetClock(seconds=100, time_fn=fake_time).start()
    fake_time.advance(40)
    state = _roundtrip(clock.state_dict())
    new_process_time = Readings([1.0, 1.0, 11.0])  # monotonic time restarts near zero
    resumed = BudgetClock(seconds=100, time_fn=new_process_time)
    resumed.load_state_dict(state)
    assert resumed.elapsed_seconds == pytest.approx(40.0)
    assert resumed.elapsed_seconds == pytest.approx(50.0)


def test_steps_state_round_trip_continues(fake_time) -> None:
    clock = BudgetClock(steps=10, time_fn=fake_time).start().tick(4)
    state = _roundtrip(clock.state_dict())
    resumed = BudgetClock(steps=10, time_fn=fake_time)
    resumed.load_state_dict(state)
    assert resumed.steps == 4
    resumed.tick(2)
    assert resumed.fraction_used == pytest.approx(0.6)
    assert resumed.remaining == pytest.approx(4.0)


def test_loading_into_the_same_clock_drops_the_time_since_the_save(fake_time) -> None:
    clock = BudgetClock(seconds=100, time_fn=fake_time).start()
    fake_time.advance(5)
    state = clock.state_dict()
    fake_time.advance(30)
    clock.load_state_dict(state)
    assert clock.elapsed_seconds == pytest.approx(5.0)


def test_unstarted_state_stays_unstarted(fake_time) -> None:
    state = _roundtrip(BudgetClock(seconds=10, time_fn=fake_time).state_dict())
    resumed = BudgetClock(seconds=10, time_fn=fake_time)
    resumed.load_state_dict(state)
    fake_time.advance(5)
    assert not resumed.started
    assert resumed.elapsed_seconds == 0.0


def _valid_state() -> dict:
    return BudgetClock(seconds=10).start().state_dict()


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda s: [1, 2, 3], "Not a BudgetClock state"),
        (lambda s: {**s, "format_version": 2}, "Not a BudgetClock state of format_version 1"),
        (lambda s: {k: v for k, v in s.items() if k != "format_version"}, "format_version"),
        (lambda s: {k: v for k, v in s.items() if k != "steps"}, r"missing keys \['steps'\]"),
        (
            lambda s: {k: v for k, v in s.items() if k not in ("kind", "total")},
            r"missing keys \['kind', 'total'\]",
        ),
        (lambda s: {**s, "kind": "steps"}, "is a 'steps' budget but this clock counts 'seconds'"),
        (lambda s: {**s, "elapsed_seconds": -1.0}, "invalid elapsed_seconds"),
        (lambda s: {**s, "elapsed_seconds": math.nan}, "invalid elapsed_seconds"),
        (lambda s: {**s, "elapsed_seconds": math.inf}, "invalid elapsed_seconds"),
        (lambda s: {**s, "steps": -2}, "invalid steps="),
        (lambda s: {**s, "steps": 2.5}, "invalid steps="),
        (lambda s: {**s, "total": 0.0}, "invalid total"),
        (lambda s: {**s, "total": math.nan}, "invalid total"),
        (lambda s: {**s, "total": "10"}, "invalid total"),
    ],
)
def test_corrupt_or_mismatched_state_raises(mutate, match: str) -> None:
    clock = BudgetClock(seconds=10)
    with pytest.raises(CheckpointError, match=match):
        clock.load_state_dict(mutate(_valid_state()))


def test_checkpoint_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="Not a BudgetClock state"):
        BudgetClock(seconds=10).load_state_dict({})


# ----------------------------------------------------------------------------- energy
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
@pytest.mark.parametrize("measure_energy", [True, False])
def test_energy_is_none_without_a_gpu(fake_time, measure_energy: bool) -> None:
    clock = BudgetClock(seconds=10, time_fn=fake_time, measure_energy=measure_energy)
    assert clock.energy_joules is None
    clock.start()
    fake_time.advance(1)
    assert clock.energy_joules is None
    state = _roundtrip(clock.state_dict())
    assert state["energy_joules"] is None
    resumed = BudgetClock(seconds=10, time_fn=fake_time, measure_energy=measure_energy)
    resumed.load_state_dict(state)
    assert resumed.energy_joules is None


def test_repr_names_budget_and_fraction(fake_time) -> None:
    clock = BudgetClock(seconds=10, time_fn=fake_time).start()
    fake_time.advance(5)
    assert repr(clock) == "BudgetClock(10 s, used 5 s, fraction_used=0.500)"
