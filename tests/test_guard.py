"""Tests of the edge-of-stability guard: the half-space projection, the clamp, the thresholds.

The projection is checked against its defining properties (hypothesis) and against a slow,
obvious oracle: a brute-force nearest-point search over random feasible points and over the
segment between the input and its projection.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from graff.errors import GraffConfigError
from graff.guard import (
    clamp_lr,
    factor_caps,
    guard_constant,
    log_lr_bound,
    max_stable_lr,
    project_to_halfspace,
    stability_threshold,
)

# ----------------------------------------------------------------------------- strategies
MODERATE = st.floats(min_value=-10.0, max_value=10.0, allow_nan=False, allow_infinity=False)
DTYPES = st.sampled_from([torch.float32, torch.float64])
PROPERTY_SETTINGS = settings(max_examples=60, deadline=None)


@st.composite
def problems(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Random ``(w, b, h, bound)`` with dims 1..16, moderate finite values, float32 or float64."""
    d = draw(st.integers(min_value=1, max_value=16))
    dtype = draw(DTYPES)
    w = torch.tensor(draw(st.lists(MODERATE, min_size=d, max_size=d)), dtype=dtype)
    h = torch.tensor(draw(st.lists(MODERATE, min_size=d, max_size=d)), dtype=dtype)
    b = torch.tensor(draw(MODERATE), dtype=dtype)
    bound = draw(st.floats(min_value=-50.0, max_value=50.0))
    return w, b, h, bound


def _value(w: torch.Tensor, b: torch.Tensor, h: torch.Tensor) -> float:
    """``w·h + b`` in float64 (the constraint's left-hand side)."""
    return float(w.double() @ h.double() + b.double().reshape(()))


def _tol(w: torch.Tensor, h: torch.Tensor, b: torch.Tensor) -> float:
    """Rounding tolerance on ``w·h + b`` for the dtype of ``w`` and the magnitudes involved."""
    eps = torch.finfo(w.dtype).eps
    scale = float(w.double().abs() @ h.double().abs()) + abs(float(b)) + 1.0
    return 64.0 * eps * scale


def _distance(w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> float:
    dw = w1.double() - w2.double()
    db = float(b1.double().reshape(())) - float(b2.double().reshape(()))
    return math.sqrt(float(dw @ dw) + db * db)


# ----------------------------------------------------------------------------- projection
@PROPERTY_SETTINGS
@given(problems())
def test_projection_is_feasible(problem: tuple) -> None:
    w, b, h, bound = problem
    w2, b2 = project_to_halfspace(w, b, h, bound)
    assert _value(w2, b2, h) <= bound + _tol(w2, h, b2)


@PROPERTY_SETTINGS
@given(problems())
def test_projection_leaves_feasible_points_unchanged(problem: tuple) -> None:
    w, b, h, _ = problem
    bound = _value(w, b, h) + 1.0  # strictly feasible, whatever w, b, h are
    w2, b2 = project_to_halfspace(w, b, h, bound)
    assert torch.equal(w2, w)
    assert torch.equal(b2, b)


@PROPERTY_SETTINGS
@given(problems())
def test_projection_is_idempotent(problem: tuple) -> None:
    w, b, h, bound = problem
    w1, b1 = project_to_halfspace(w, b, h, bound)
    w2, b2 = project_to_halfspace(w1, b1, h, bound)
    tol = _tol(w1, h, b1)
    assert _distance(w1, b1, w2, b2) <= tol


@PROPERTY_SETTINGS
@given(problems(), st.integers(min_value=0, max_value=2**31 - 1))
def test_no_random_feasible_point_is_closer(problem: tuple, seed: int) -> None:
    w, b, h, bound = problem
    w2, b2 = project_to_halfspace(w, b, h, bound)
    best = _distance(w, b, w2, b2)
    tol = _tol(w2, h, b2) + 1e-9 * (1.0 + best)
    # Random candidates near (w, b), pushed into the half-space along the normal (h, 1).
    g = torch.Generator().manual_seed(seed)
    d = w.numel()
    cand_w = w.double() + torch.randn(512, d, generator=g, dtype=torch.float64) * (best + 1.0)
    cand_b = float(b) + torch.randn(512, generator=g, dtype=torch.float64) * (best + 1.0)
    excess = (cand_w @ h.double() + cand_b - bound).clamp_min(0.0)
    shift = excess / (float(h.double() @ h.double()) + 1.0)
    cand_w = cand_w - shift[:, None] * h.double()
    cand_b = cand_b - shift
    feasible = cand_w @ h.double() + cand_b <= bound
    dist = torch.sqrt(((cand_w - w.double()) ** 2).sum(1) + (cand_b - float(b)) ** 2)
    assert bool(feasible.any())
    assert float(dist[feasible].min()) >= best - tol


@PROPERTY_SETTINGS
@given(problems())
def test_projection_matches_brute_force_nearest_point(problem: tuple) -> None:
    """Oracle: minimise ‖x − x0‖ over the half-space by a dense search along the normal.

    The nearest point of a half-space lies on the ray ``x0 − t·n`` (``n = (h, 1)``, t ≥ 0); the
    oracle scans t on a fine grid, keeps the first feasible t, and so never uses the formula.
    """
    w, b, h, bound = problem
    w2, b2 = project_to_halfspace(w, b, h, bound)
    x0 = torch.cat([w.double(), b.double().reshape(1)])
    n = torch.cat([h.double(), torch.ones(1, dtype=torch.float64)])
    violation = float(x0 @ n) - bound
    if violation <= 0.0:
        assert _distance(w, b, w2, b2) == 0.0
        return
    t_max = violation + 1.0  # ‖n‖² ≥ 1, so t = violation is always feasible
    ts = torch.linspace(0.0, t_max, 200_001, dtype=torch.float64)
    feasible = (x0 @ n) - ts * float(n @ n) <= bound
    t_star = float(ts[feasible][0])
    oracle = x0 - t_star * n
    got = torch.cat([w2.double(), b2.double().reshape(1)])
    grid = t_max / 200_000 * math.sqrt(float(n @ n))
    assert float((got - oracle).norm()) <= grid + _tol(w2, h, b2) * 4


@PROPERTY_SETTINGS
@given(problems())
def test_projection_preserves_shape_and_dtype(problem: tuple) -> None:
    w, b, h, bound = problem
    w2, b2 = project_to_halfspace(w, b, h, bound)
    assert (w2.shape, w2.dtype, w2.device) == (w.shape, w.dtype, w.device)
    assert (b2.shape, b2.dtype, b2.device) == (b.shape, b.dtype, b.device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_projection_keeps_one_element_bias_shape(dtype: torch.dtype) -> None:
    w, b, h = torch.ones(3, dtype=dtype), torch.ones(1, dtype=dtype), torch.ones(3, dtype=dtype)
    w2, b2 = project_to_halfspace(w, b, h, bound=0.0)
    assert b2.shape == (1,)
    assert b2.dtype == dtype
    # violation 4, ‖(h, 1)‖² = 4: step 1 along (1, 1, 1, 1).
    assert torch.allclose(w2, torch.zeros(3, dtype=dtype))
    assert torch.allclose(b2, torch.zeros(1, dtype=dtype))


@PROPERTY_SETTINGS
@given(problems())
def test_projection_does_not_mutate_inputs(problem: tuple) -> None:
    w, b, h, bound = problem
    copies = (w.clone(), b.clone(), h.clone())
    w2, b2 = project_to_halfspace(w, b, h, bound)
    assert torch.equal(w, copies[0])
    assert torch.equal(b, copies[1])
    assert torch.equal(h, copies[2])
    w2.add_(1.0)  # the outputs are new tensors: writing to them leaves the inputs alone
    b2.add_(1.0)
    assert torch.equal(w, copies[0])
    assert torch.equal(b, copies[1])


@pytest.mark.parametrize("bound", [math.nan, -math.inf])
def test_unprojectable_bound_returns_unchanged_copies(bound: float) -> None:
    w, b, h = torch.tensor([1.0, 2.0]), torch.tensor(3.0), torch.tensor([1.0, 1.0])
    w2, b2 = project_to_halfspace(w, b, h, bound)
    assert torch.equal(w2, w)
    assert torch.equal(b2, b)
    assert w2.data_ptr() != w.data_ptr()
    assert b2.data_ptr() != b.data_ptr()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_h_returns_unchanged_copies(bad: float) -> None:
    w, b = torch.tensor([1.0, 2.0]), torch.tensor(3.0)
    h = torch.tensor([1.0, bad])
    w2, b2 = project_to_halfspace(w, b, h, bound=-100.0)
    assert torch.equal(w2, w)
    assert torch.equal(b2, b)
    assert w2.data_ptr() != w.data_ptr()


def test_infinite_bound_is_no_constraint() -> None:
    w, b, h = torch.tensor([1e3, 1e3]), torch.tensor(1e3), torch.tensor([1e3, 1e3])
    w2, b2 = project_to_halfspace(w, b, h, math.inf)
    assert torch.equal(w2, w)
    assert torch.equal(b2, b)


def test_tensor_bound_is_accepted() -> None:
    w, b, h = torch.tensor([2.0]), torch.tensor(0.0), torch.tensor([1.0])
    w2, b2 = project_to_halfspace(w, b, h, torch.tensor(0.0))
    # violation 2, ‖(h, 1)‖² = 2: step 1.
    assert torch.allclose(w2, torch.tensor([1.0]))
    assert torch.allclose(b2, torch.tensor(-1.0))


@pytest.mark.parametrize(
    ("w", "b", "h", "match"),
    [
        (torch.zeros(2, 2), torch.tensor(0.0), torch.zeros(2, 2), "w and h must be 1-d"),
        (torch.zeros(3), torch.tensor(0.0), torch.zeros(2), "w and h must be 1-d"),
        (torch.zeros(2), torch.zeros(2), torch.zeros(2), "b must hold one number"),
    ],
)
def test_projection_rejects_bad_shapes(
    w: torch.Tensor, b: torch.Tensor, h: torch.Tensor, match: str
) -> None:
    with pytest.raises(GraffConfigError, match=match):
        project_to_halfspace(w, b, h, 0.0)


# ----------------------------------------------------------------------------- clamp
ANY_FLOAT = st.floats(allow_nan=True, allow_infinity=True)
LR_BOUNDS = st.tuples(
    st.floats(min_value=1e-12, max_value=1.0), st.floats(min_value=1.0, max_value=1e3)
)


@settings(max_examples=200, deadline=None)
@given(ANY_FLOAT, LR_BOUNDS)
def test_clamp_lr_is_finite_and_inside_bounds(lr: float, bounds: tuple[float, float]) -> None:
    lr_min, lr_max = bounds
    out = clamp_lr(lr, lr_min, lr_max)
    assert math.isfinite(out)
    assert lr_min <= out <= lr_max


@settings(max_examples=100, deadline=None)
@given(st.floats(min_value=1e-6, max_value=1.0))
def test_clamp_lr_keeps_values_inside_bounds(lr: float) -> None:
    assert clamp_lr(lr, 1e-6, 1.0) == lr


@pytest.mark.parametrize(
    ("lr", "expected"),
    [(math.nan, 1e-6), (-math.inf, 1e-6), (math.inf, 1.0), (-5.0, 1e-6), (0.0, 1e-6), (7.0, 1.0)],
)
def test_clamp_lr_special_values(lr: float, expected: float) -> None:
    assert clamp_lr(lr, 1e-6, 1.0) == expected


@pytest.mark.parametrize(
    ("lr_min", "lr_max"),
    [(0.0, 1.0), (-1.0, 1.0), (1.0, 0.5), (1e-6, math.inf), (math.nan, 1.0), (1e-6, math.nan)],
)
def test_clamp_lr_rejects_bad_bounds(lr_min: float, lr_max: float) -> None:
    with pytest.raises(GraffConfigError, match="need 0 < lr_min <= lr_max < inf"):
        clamp_lr(0.1, lr_min, lr_max)


# ----------------------------------------------------------------------------- max_stable_lr
@pytest.mark.parametrize("lambda_hat", [0.0, -1.0, -math.inf, math.nan])
def test_max_stable_lr_without_curvature_is_unbounded(lambda_hat: float) -> None:
    assert max_stable_lr(lambda_hat, 1.9) == math.inf


def test_max_stable_lr_with_infinite_curvature_is_zero() -> None:
    assert max_stable_lr(math.inf, 1.9) == 0.0


@settings(max_examples=100, deadline=None)
@given(st.floats(min_value=1e-6, max_value=1e6), st.floats(min_value=0.1, max_value=40.0))
def test_max_stable_lr_is_c_over_lambda(lambda_hat: float, c: float) -> None:
    assert max_stable_lr(lambda_hat, c) == pytest.approx(c / lambda_hat, rel=1e-12)


@pytest.mark.parametrize("lambda_hat", [0.0, -3.0, math.nan, math.inf, 1e-30, 1e30])
def test_guarded_lr_is_finite_and_positive_for_any_lambda(lambda_hat: float) -> None:
    lr = clamp_lr(max_stable_lr(lambda_hat, 1.9), 1e-7, 1.0)
    assert math.isfinite(lr)
    assert lr > 0.0


@pytest.mark.parametrize("c", [0.0, -1.9, math.nan])
def test_max_stable_lr_rejects_bad_c(c: float) -> None:
    with pytest.raises(GraffConfigError, match="c"):
        max_stable_lr(10.0, c)


@pytest.mark.parametrize(
    ("lambda_hat", "offset", "expected"),
    [
        (10.0, 0.0, math.log(1.9 / 10.0)),
        (10.0, 0.5, math.log(1.9 / 10.0) - 0.5),
        (0.0, 0.0, math.inf),
        (math.nan, 3.0, math.inf),
        (math.inf, 0.0, -math.inf),
    ],
)
def test_log_lr_bound(lambda_hat: float, offset: float, expected: float) -> None:
    assert log_lr_bound(lambda_hat, 1.9, offset) == pytest.approx(expected)


# ----------------------------------------------------------------------------- factor caps
@settings(max_examples=60, deadline=None)
@given(
    lambda_hat=st.floats(min_value=1e-6, max_value=1e6),
    groups=st.lists(
        st.tuples(
            st.floats(min_value=0.1, max_value=40.0), st.floats(min_value=1e-6, max_value=1.0)
        ),
        min_size=1,
        max_size=4,
    ),
)
def test_factor_caps_keep_every_group_at_the_guard(lambda_hat: float, groups: list) -> None:
    """The capped LR of each group, cap × initial LR, sits on its own bound η·λ̂ = c_g."""
    constants, initial = [c for c, _ in groups], [lr for _, lr in groups]
    caps = factor_caps(lambda_hat, constants, initial)
    for cap, c, lr0 in zip(caps, constants, initial, strict=True):
        assert cap * lr0 * lambda_hat == pytest.approx(c, rel=1e-12)


@pytest.mark.parametrize(
    ("lambda_hat", "expected"),
    [(0.0, math.inf), (-1.0, math.inf), (math.nan, math.inf), (math.inf, 0.0)],
)
def test_factor_caps_without_usable_curvature(lambda_hat: float, expected: float) -> None:
    assert factor_caps(lambda_hat, [1.9, 36.1], [0.1, 1e-3]) == [expected, expected]


def test_factor_caps_need_one_constant_per_group() -> None:
    with pytest.raises(GraffConfigError, match="one guard constant per group"):
        factor_caps(1.0, [1.9], [0.1, 0.2])


# ----------------------------------------------------------------------------- thresholds
def _param() -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.zeros(2))


BETA = 0.9
THRESHOLD_CASES = [
    ("sgd", lambda: torch.optim.SGD([_param()], lr=0.1), 2.0),
    (
        "heavy_ball",
        lambda: torch.optim.SGD([_param()], lr=0.1, momentum=BETA),
        2.0 + 2.0 * BETA,
    ),
    (
        "nesterov",
        lambda: torch.optim.SGD([_param()], lr=0.1, momentum=BETA, nesterov=True),
        (2.0 + 2.0 * BETA) / (1.0 + 2.0 * BETA),
    ),
    (
        "adam",
        lambda: torch.optim.Adam([_param()], betas=(BETA, 0.999)),
        (2.0 + 2.0 * BETA) / (1.0 - BETA),
    ),
    (
        "adamw",
        lambda: torch.optim.AdamW([_param()], betas=(BETA, 0.98)),
        (2.0 + 2.0 * BETA) / (1.0 - BETA),
    ),
    ("adam_b05", lambda: torch.optim.Adam([_param()], betas=(0.5, 0.999)), (2.0 + 1.0) / 0.5),
    ("nadam", lambda: torch.optim.NAdam([_param()], betas=(0.8, 0.999)), (2.0 + 1.6) / 0.2),
    ("rmsprop", lambda: torch.optim.RMSprop([_param()], lr=0.01), 2.0),
    (
        "rmsprop_momentum",
        lambda: torch.optim.RMSprop([_param()], lr=0.01, momentum=0.5),
        2.0 + 2.0 * 0.5,
    ),
    ("adagrad", lambda: torch.optim.Adagrad([_param()], lr=0.01), 2.0),
]


@pytest.mark.parametrize(
    ("make", "expected"),
    [(make, expected) for _, make, expected in THRESHOLD_CASES],
    ids=[name for name, _, _ in THRESHOLD_CASES],
)
def test_stability_threshold_closed_form(make, expected: float) -> None:
    assert stability_threshold(make()) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    ("make", "expected"),
    [(make, expected) for _, make, expected in THRESHOLD_CASES],
    ids=[name for name, _, _ in THRESHOLD_CASES],
)
@pytest.mark.parametrize("fraction", [0.95, 0.5, 1.0])
def test_guard_constant_is_fraction_of_threshold(make, expected: float, fraction: float) -> None:
    assert guard_constant(make(), fraction=fraction) == pytest.approx(fraction * expected)


def test_guard_constant_defaults_match_the_seed() -> None:
    sgd = torch.optim.SGD([_param()], lr=0.1)
    adam = torch.optim.AdamW([_param()], betas=(0.9, 0.999))
    assert guard_constant(sgd) == pytest.approx(0.95 * 2.0)  # the seed's c = 1.9
    assert guard_constant(adam) == pytest.approx(0.95 * 38.0)  # 36.1
    assert stability_threshold(adam) == pytest.approx(38.0)


def test_stability_threshold_reads_the_requested_group() -> None:
    opt = torch.optim.SGD([{"params": [_param()]}, {"params": [_param()], "momentum": 0.5}], lr=0.1)
    assert stability_threshold(opt, 0) == pytest.approx(2.0)
    assert stability_threshold(opt, 1) == pytest.approx(3.0)


class _MysteryOptimizer(torch.optim.Optimizer):
    def __init__(self, params) -> None:
        super().__init__(params, {"lr": 0.1})

    def step(self, closure=None) -> None:
        return None


def test_unknown_optimizer_warns_and_uses_two() -> None:
    opt = _MysteryOptimizer([_param()])
    with pytest.warns(
        UserWarning, match="does not know the stability threshold of _MysteryOptimizer"
    ):
        assert stability_threshold(opt) == 2.0


def test_guard_constant_for_unknown_optimizer_warns() -> None:
    opt = _MysteryOptimizer([_param()])
    with pytest.warns(UserWarning, match="Pass guard_c= to override"):
        assert guard_constant(opt) == pytest.approx(0.95 * 2.0)


@pytest.mark.parametrize("fraction", [0.0, -0.5, 1.5, math.nan, math.inf])
def test_guard_constant_rejects_bad_fraction(fraction: float) -> None:
    opt = torch.optim.SGD([_param()], lr=0.1)
    with pytest.raises(GraffConfigError, match=r"fraction must (lie in|be finite)"):
        guard_constant(opt, fraction=fraction)


def test_stability_threshold_rejects_bad_group_index() -> None:
    opt = torch.optim.SGD([_param()], lr=0.1)
    with pytest.raises(GraffConfigError, match="group_index"):
        stability_threshold(opt, group_index=3)


class _MyNAdam(torch.optim.NAdam):
    """A user subclass with its own name: matched by class, not by name."""


class Adam(_MysteryOptimizer):
    """A third-party class named like torch's Adam (matched by name), with Adam's hyperparameters."""

    def __init__(self, params) -> None:
        torch.optim.Optimizer.__init__(self, params, {"lr": 0.1, "betas": (0.9, 0.999)})


@pytest.mark.parametrize(
    ("make", "kind"),
    [
        (lambda: torch.optim.SGD([_param()], lr=0.1), "sgd"),
        (lambda: torch.optim.Adam([_param()]), "adam"),
        (lambda: torch.optim.AdamW([_param()]), "adam"),
        (lambda: torch.optim.NAdam([_param()]), "adam"),
        (lambda: torch.optim.RAdam([_param()]), "radam"),
        (lambda: torch.optim.Adamax([_param()]), "adamax"),
        (lambda: torch.optim.RMSprop([_param()]), "rmsprop"),
        (lambda: torch.optim.Adagrad([_param()]), "adagrad"),
        (lambda: _MyNAdam([_param()]), "adam"),
        (lambda: Adam([_param()]), "adam"),
        (lambda: _MysteryOptimizer([_param()]), None),
    ],
)
def test_one_optimizer_table_decides_threshold_and_preconditioner(make, kind) -> None:
    """The guard's threshold and the probe's preconditioner read the same classification."""
    from graff.guard import optimizer_kind
    from graff.probes.preconditioner import preconditioner_kind

    opt = make()
    assert optimizer_kind(opt) == kind
    assert preconditioner_kind(opt) == (None if kind in (None, "sgd") else kind)
    if kind in ("adam", "radam", "adamax"):  # the preconditioned sharpness, Adam's threshold
        assert stability_threshold(opt) == pytest.approx(38.0)
