"""Tests of the budget priors against the closed forms in graff.priors' module docstring."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from graff.errors import GraffConfigError, GraffTypeError
from graff.priors import PRIOR_NAMES, BudgetPrior, make_prior

GRID = [i / 40 for i in range(41)]  # 0, 0.025, ..., 1


def closed_form(name: str, u: float, warmup: float, final: float, decay: float, start: float):
    """The formulas of the docstring, written out independently of the implementation."""
    if u < warmup:
        return start + (1.0 - start) * u / warmup
    after = (u - warmup) / (1.0 - warmup)
    shapes = {
        "linear": 1.0 - after,
        "cosine": (1.0 + math.cos(math.pi * after)) / 2.0,
        "wsd": min(1.0, (1.0 - u) / decay),
        "constant": 1.0,
    }
    return final + (1.0 - final) * shapes[name]


CONFIGS = [
    {"warmup": 0.0, "final": 0.0, "decay": 0.2, "warmup_start": 0.1},
    {"warmup": 0.05, "final": 0.0, "decay": 0.2, "warmup_start": 0.1},
    {"warmup": 0.1, "final": 0.1, "decay": 0.5, "warmup_start": 0.5},
    {"warmup": 0.25, "final": 0.02, "decay": 0.75, "warmup_start": 1.0},
]


# ----------------------------------------------------------------------------- closed forms
@pytest.mark.parametrize("name", PRIOR_NAMES)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "w{warmup}-f{final}-d{decay}".format(**c))
def test_prior_matches_closed_form_on_a_grid(name: str, config: dict) -> None:
    prior = BudgetPrior(name, **config)
    for u in GRID:
        expected = closed_form(
            name, u, config["warmup"], config["final"], config["decay"], config["warmup_start"]
        )
        assert prior(u) == pytest.approx(expected, abs=1e-12), u


@pytest.mark.parametrize(
    ("name", "u", "expected"),
    [
        # warmup 0.1, final 0: after warm-up u' = (u - 0.1) / 0.9.
        ("linear", 0.55, 0.5),  # u' = 0.5
        ("linear", 1.0, 0.0),
        ("cosine", 0.55, 0.5),  # cos(pi/2) = 0
        ("cosine", 0.325, (1 + math.cos(math.pi / 4)) / 2),  # u' = 0.25
        ("wsd", 0.5, 1.0),  # stable phase (decay 0.2 starts at 0.8)
        ("wsd", 0.9, 0.5),  # halfway through the decay
        ("constant", 0.9, 1.0),
        ("linear", 0.05, 0.1 + 0.9 * 0.5),  # halfway through the warm-up
    ],
)
def test_hand_computed_values(name: str, u: float, expected: float) -> None:
    prior = BudgetPrior(name, warmup=0.1, final=0.0, decay=0.2, warmup_start=0.1)
    assert prior(u) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("final", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("name", ["linear", "cosine", "wsd"])
def test_decaying_priors_end_at_final(name: str, final: float) -> None:
    assert BudgetPrior(name, final=final)(1.0) == pytest.approx(final)


def test_constant_prior_is_one_after_warmup() -> None:
    prior = BudgetPrior("constant", warmup=0.2, final=0.0)
    assert all(prior(u) == 1.0 for u in GRID if u >= 0.2)


# ----------------------------------------------------------------------------- warm-up
@pytest.mark.parametrize("name", PRIOR_NAMES)
@pytest.mark.parametrize(("warmup", "start"), [(0.1, 0.1), (0.2, 0.5), (0.5, 0.01)])
def test_warmup_is_a_linear_ramp_from_start_to_one(name: str, warmup: float, start: float) -> None:
    prior = BudgetPrior(name, warmup=warmup, warmup_start=start, decay=1.0 - warmup)
    assert prior(0.0) == pytest.approx(start)
    for k in range(1, 10):
        u = warmup * k / 10
        assert prior(u) == pytest.approx(start + (1 - start) * k / 10)
    assert prior(warmup * (1 - 1e-12)) == pytest.approx(1.0, abs=1e-9)
    assert prior(warmup) == pytest.approx(1.0)  # continuous at the end of the warm-up


def test_no_warmup_starts_at_one() -> None:
    for name in PRIOR_NAMES:
        assert BudgetPrior(name, warmup=0.0)(0.0) == 1.0


def test_wsd_is_continuous_when_decay_overlaps_warmup() -> None:
    prior = BudgetPrior("wsd", warmup=0.3, decay=0.8, final=0.0)
    assert prior(0.3) == pytest.approx(prior(0.3 - 1e-9), abs=1e-6)


# ----------------------------------------------------------------------------- range, monotone
valid_priors = st.builds(
    BudgetPrior,
    name=st.sampled_from(PRIOR_NAMES),
    warmup=st.floats(min_value=0.0, max_value=0.99),
    final=st.floats(min_value=0.0, max_value=1.0),
    decay=st.floats(min_value=1e-3, max_value=1.0),
    warmup_start=st.floats(min_value=1e-3, max_value=1.0),
)


@settings(max_examples=300, deadline=None)
@given(valid_priors, st.floats(allow_nan=True, allow_infinity=True))
def test_prior_is_in_unit_interval_for_any_input(prior: BudgetPrior, u: float) -> None:
    value = prior(u)
    assert math.isfinite(value)
    assert 0.0 <= value <= 1.0


@pytest.mark.parametrize("name", PRIOR_NAMES)
def test_out_of_range_inputs_are_clamped(name: str) -> None:
    prior = BudgetPrior(name, warmup=0.1)
    assert prior(math.nan) == prior(0.0)
    assert prior(-5.0) == prior(-math.inf) == prior(0.0)
    assert prior(7.0) == prior(math.inf) == prior(1.0)


@settings(max_examples=150, deadline=None)
@given(
    valid_priors.filter(lambda p: p.name != "constant"),
    st.lists(st.floats(min_value=0.0, max_value=1.0), min_size=2, max_size=20),
)
def test_decaying_priors_do_not_increase_after_warmup(prior: BudgetPrior, us: list[float]) -> None:
    after = sorted(u for u in us if u >= prior.warmup)
    values = [prior(u) for u in after]
    for earlier, later in itertools.pairwise(values):
        assert later <= earlier + 1e-12


@settings(max_examples=100, deadline=None)
@given(valid_priors, st.lists(st.floats(min_value=0.0, max_value=1.0), min_size=2, max_size=20))
def test_warmup_does_not_decrease(prior: BudgetPrior, us: list[float]) -> None:
    during = sorted(u for u in us if u < prior.warmup)
    values = [prior(u) for u in during]
    for earlier, later in itertools.pairwise(values):
        assert later >= earlier - 1e-12


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"name": "step"}, GraffConfigError, "prior must be one of"),
        ({"name": "Linear"}, GraffConfigError, "prior must be one of"),
        ({"warmup": 1.0}, GraffConfigError, r"warmup must lie in \[0.0, 1.0\)"),
        ({"warmup": -0.1}, GraffConfigError, r"warmup must lie in \[0.0, 1.0\)"),
        ({"warmup": math.nan}, GraffConfigError, "warmup must be finite"),
        ({"final": -0.01}, GraffConfigError, r"final must lie in \[0.0, 1.0\]"),
        ({"final": 1.5}, GraffConfigError, r"final must lie in \[0.0, 1.0\]"),
        ({"final": math.inf}, GraffConfigError, "final must be finite"),
        ({"decay": 0.0}, GraffConfigError, r"decay must lie in \(0.0, 1.0\]"),
        ({"decay": 1.01}, GraffConfigError, r"decay must lie in \(0.0, 1.0\]"),
        ({"warmup_start": 0.0}, GraffConfigError, r"warmup_start must lie in \(0.0, 1.0\]"),
        ({"warmup_start": 2.0}, GraffConfigError, r"warmup_start must lie in \(0.0, 1.0\]"),
        ({"warmup": True}, GraffTypeError, "warmup must be a real number"),
        ({"final": "0.1"}, GraffTypeError, "final must be a real number"),
    ],
)
def test_invalid_arguments_raise(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        BudgetPrior(**kwargs)


def test_prior_is_frozen() -> None:
    prior = BudgetPrior()
    with pytest.raises(dataclasses.FrozenInstanceError):
        prior.warmup = 0.5  # type: ignore[misc]


def test_make_prior() -> None:
    prior = BudgetPrior("cosine")
    assert make_prior(prior) is prior
    assert make_prior(None) is None
    assert make_prior("wsd", decay=0.3) == BudgetPrior("wsd", decay=0.3)
    with pytest.raises(GraffConfigError, match="prior must be one of"):
        make_prior("exponential")
