"""CurvatureProbe: λ̂ against closed forms and dense Hessians, per-step statistics by hand."""

from __future__ import annotations

import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

from graff.blocks import Block
from graff.errors import CheckpointError, GraffConfigError, GraffTypeError, ProbeError
from graff.probes.curvature import CurvatureProbe, CurvatureStats

# --------------------------------------------------------------------------- helpers


def spectrum_matrix(d: int, lam_max: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric A = Q diag(λ) Qᵀ, random orthogonal Q, λ uniform in [1, λ_max], top = λ_max."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    eigs = 1.0 + (lam_max - 1.0) * torch.rand(d, generator=g, dtype=torch.float64)
    eigs[0] = lam_max
    return q @ torch.diag(eigs) @ q.T, eigs


def quadratic(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x @ a @ x


def make_mlp(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A 4-12-2 tanh MLP (86 parameters) and a fixed regression batch of 64 samples."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 12), nn.Tanh(), nn.Linear(12, 2)).double()
    x = torch.randn(64, 4, dtype=torch.float64)
    y = torch.sin(x[:, :2] * 2.0)
    return model, x, y


def mlp_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((model(x) - y) ** 2).mean()


def dense_hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f(flat: torch.Tensor) -> torch.Tensor:
        chunks = flat.split([s.numel() for s in shapes])
        params = {n: c.reshape(s) for n, c, s in zip(names, chunks, shapes, strict=True)}
        return ((functional_call(model, params, (x,)) - y) ** 2).mean()

    return torch.autograd.functional.hessian(f, flat0)


def lower_median(t: torch.Tensor) -> float:
    """The lower of the two middle values (an odd count: the middle one), from a sort."""
    values = sorted(t.reshape(-1).tolist())
    return values[(len(values) - 1) // 2]


def dense_preconditioner(opt: torch.optim.Optimizer, floor: float = 0.01) -> torch.Tensor | None:
    """P from the optimizer state, written out from the torch docs (the test's own oracle),
    each tensor's entries raised to at least ``floor`` times its median."""
    group = opt.param_groups[0]
    eps = group.get("eps", 0.0)
    out = []
    for p in group["params"]:
        s = opt.state[p]
        if isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)):
            bc2 = 1.0 - group["betas"][1] ** float(s["step"])
            out.append(torch.sqrt(s["exp_avg_sq"] / bc2) + eps)
        elif isinstance(opt, torch.optim.RMSprop):
            v = s["square_avg"] - (s["grad_avg"] ** 2 if group["centered"] else 0.0)
            out.append(torch.sqrt(v) + eps)
        elif isinstance(opt, torch.optim.Adagrad):
            out.append(torch.sqrt(s["sum"]) + eps)
        else:
            return None
    out = [t.clamp_min(floor * lower_median(t)) for t in out]
    return torch.cat([t.reshape(-1) for t in out]).double()


OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05),
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-3),
    "rmsprop_centered": lambda ps: torch.optim.RMSprop(ps, lr=1e-3, centered=True),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=1e-2),
}


def train(model, opt, x, y, steps: int) -> list[dict[str, torch.Tensor]]:
    """Run ``steps`` optimizer steps; return θ before each step and g at each step."""
    log = []
    for _ in range(steps):
        opt.zero_grad()
        mlp_loss(model, x, y).backward()
        log.append(
            {
                "theta": [p.detach().clone() for p in model.parameters()],
                "grad": [p.grad.detach().clone() for p in model.parameters()],
            }
        )
        opt.step()
    return log


# --------------------------------------------------------------------------- λ̂ accuracy


@pytest.mark.parametrize("lam_max", [10.0, 100.0, 1000.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_power_iteration_brackets_lambda_max_on_quadratics(lam_max: float, seed: int) -> None:
    a, eigs = spectrum_matrix(40, lam_max, seed)
    x = nn.Parameter(torch.randn(40, dtype=torch.float64))
    opt = torch.optim.SGD([x], lr=0.1 / lam_max)
    probe = CurvatureProbe(opt, loss_fn=lambda: quadratic(a, x), every=1, start_step=0)
    raw = probe.estimate_lambda_max()
    true = float(eigs.max())
    assert raw == probe.lambda_max
    assert 0.9 * true <= raw <= true * (1 + 1e-5)  # a Rayleigh quotient never exceeds λ_max
    assert 0.9 * true <= probe.lambda_max_safe <= 1.25 * true
    assert probe.lambda_max_safe == pytest.approx(1.15 * raw)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_lambda_matches_dense_hessian_on_mlp(name: str) -> None:
    model, x, y = make_mlp()
    opt = OPTIMIZERS[name](model.parameters())
    probe = CurvatureProbe(opt, loss_fn=lambda: mlp_loss(model, x, y), every=1000, start_step=0)
    train(model, opt, x, y, 3)
    h = dense_hessian(model, x, y)
    p = dense_preconditioner(opt)
    m = h if p is None else h / torch.outer(p.sqrt(), p.sqrt())
    eigs = torch.linalg.eigvalsh(m)
    assert eigs.max() > -eigs.min(), "test premise: the top eigenvalue dominates in magnitude"
    assert probe.n_estimates == 1  # the first estimate (20 iterations) ran by itself after step 1
    lam = probe.estimate_lambda_max()  # a warm-started refresh: 3 iterations
    assert lam == pytest.approx(float(eigs.max()), rel=0.10)


# --------------------------------------------------------------------------- the floor of P
def test_preconditioner_floor_closed_form(monkeypatch) -> None:
    from graff.probes import preconditioner

    diag = torch.tensor([4.0, 1.0, 9.0, 1e-12])  # lower median 1
    assert preconditioner.floored(diag, 0.01).tolist() == pytest.approx([4.0, 1.0, 9.0, 0.01])
    assert preconditioner.floored(diag, 0.0) is diag
    assert preconditioner.floored(torch.zeros(3), 0.5).tolist() == [0.0, 0.0, 0.0]  # median 0
    monkeypatch.setattr(preconditioner, "MEDIAN_SAMPLE", 4)
    big = torch.arange(1.0, 11.0)  # stride ceil(10 / 4) = 3: entries 1, 4, 7, 10, median 4
    assert preconditioner.floored(big, 0.5)[:3].tolist() == [2.0, 2.0, 3.0]


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.floats(1e-12, 1e6), min_size=1, max_size=50),
    floor=st.floats(0.0, 0.99),
)
def test_the_floor_only_raises_entries_below_it(values: list[float], floor: float) -> None:
    """For any positive P: floored ≥ P, ≥ δ · median, entries already above the floor kept
    exactly, the median unchanged (δ < 1: the raised entries stay at or below it), so flooring
    twice changes nothing more."""
    from graff.probes.preconditioner import floored

    p = torch.tensor(values, dtype=torch.float64)
    out = floored(p, floor)
    level = floor * lower_median(p)
    assert bool((out >= p).all())
    assert bool((out >= level).all())
    assert torch.equal(out[p >= level], p[p >= level])
    assert lower_median(out) == lower_median(p)
    assert torch.equal(floored(out, floor), out)


def _adam_with_a_silent_coordinate(floor: float) -> tuple[CurvatureProbe, torch.Tensor]:
    """One Adam step on ``Σ a_i x_i²`` from a point whose last coordinate is 0: its gradient
    and second moment stay exactly 0, so its P is ``eps`` alone."""
    a = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)
    x = nn.Parameter(torch.tensor([1.0, -1.0, 0.5, 2.0, 0.0], dtype=torch.float64))
    opt = torch.optim.Adam([x], lr=1e-3)
    probe = CurvatureProbe(
        opt, loss_fn=lambda: (a * x * x).sum(), every=10**6, start_step=10**6,
        preconditioner_floor=floor,
    )  # fmt: skip
    opt.zero_grad()
    (a * x * x).sum().backward()
    opt.step()
    p = opt.state[x]["exp_avg_sq"].sqrt() + opt.param_groups[0]["eps"]  # bias correction 1 - β2
    p = p / math.sqrt(1.0 - 0.999)
    return probe, p


def test_the_floor_bounds_lambda_where_a_second_moment_is_still_zero() -> None:
    """Closed form on a diagonal quadratic: λ(P̃⁻¹H) = max_i 2a_i / P̃_i. Unfloored, the silent
    coordinate's P = eps puts λ̂ near 10/eps; floored at 1 % of the median, 100 × that of the
    tensor's median one at most."""
    raw, p = _adam_with_a_silent_coordinate(0.0)
    assert raw.estimate_lambda_max() > 1e8
    probe, p = _adam_with_a_silent_coordinate(0.01)
    h = 2.0 * torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)
    floored = p.clamp_min(0.01 * lower_median(p))
    expected = float((h / floored).max())
    assert probe.estimate_lambda_max() == pytest.approx(expected, rel=1e-3)
    assert expected < 1e-3 * 10.0 / 1e-8


@pytest.mark.parametrize("name", ["adam", "rmsprop", "adagrad"])
def test_the_floor_changes_nothing_where_every_coordinate_moves(name: str) -> None:
    """A quadratic whose every coordinate has a gradient (every P within 100× of the median:
    the premise, checked) gets the same estimate, to the last bit, with and without the floor;
    an MLP with silent units (some P below the floor) does not."""
    a, _ = spectrum_matrix(12, 50.0, 0)
    estimates = []
    for floor in (0.0, 0.01):
        x = nn.Parameter(torch.linspace(0.5, 2.0, 12, dtype=torch.float64))
        opt = OPTIMIZERS[name]([x])
        probe = CurvatureProbe(
            opt, loss_fn=lambda x=x: quadratic(a, x), every=1000, start_step=0,
            preconditioner_floor=floor,
        )  # fmt: skip
        for _ in range(3):
            opt.zero_grad()
            quadratic(a, x).backward()
            opt.step()
        estimates.append(probe.lambda_max)
    p = dense_preconditioner(opt, floor=0.0)
    assert torch.equal(p, dense_preconditioner(opt, floor=0.01)), "premise: none below the floor"
    assert estimates[0] is not None
    assert estimates[0] == estimates[1]
    model, xs, ys = make_mlp()
    opt = OPTIMIZERS[name](model.parameters())
    train(model, opt, xs, ys, 3)
    assert not torch.equal(dense_preconditioner(opt, floor=0.0), dense_preconditioner(opt))


def test_preconditioner_floor_is_validated() -> None:
    x = nn.Parameter(torch.ones(2))
    opt = torch.optim.Adam([x])
    probe = CurvatureProbe(opt, loss_fn=lambda: (x * x).sum(), preconditioner_floor=0.0)
    assert probe.preconditioner_floor == 0.0
    assert CurvatureProbe(opt, loss_fn=lambda: (x * x).sum()).preconditioner_floor == 0.01
    for bad, err in ((1.0, GraffConfigError), (-0.1, GraffConfigError), ("x", GraffTypeError)):
        with pytest.raises(err, match="preconditioner_floor"):
            CurvatureProbe(opt, loss_fn=lambda: (x * x).sum(), preconditioner_floor=bad)


def test_graff_config_sets_its_probes_floor() -> None:
    import graff

    x = nn.Parameter(torch.ones(3))
    opt = torch.optim.Adam([x], lr=1e-3)
    default = graff.GraffScheduler(opt, 10, loss_fn=lambda: (x * x).sum(), warm_start=None)
    assert default.curvature.preconditioner_floor == graff.GraffConfig().preconditioner_floor
    assert graff.GraffConfig().preconditioner_floor == 0.01
    off = graff.GraffScheduler(
        torch.optim.Adam([x], lr=1e-3), 10, loss_fn=lambda: (x * x).sum(), warm_start=None,
        config=graff.GraffConfig(preconditioner_floor=0.0),
    )  # fmt: skip
    assert off.curvature.preconditioner_floor == 0.0
    with pytest.raises(GraffConfigError, match="preconditioner_floor"):
        graff.GraffConfig(preconditioner_floor=1.0)


def test_auto_mode_refreshes_at_the_interval() -> None:
    a, _ = spectrum_matrix(10, 50.0, 0)
    x = nn.Parameter(torch.ones(10, dtype=torch.float64))
    opt = torch.optim.SGD([x], lr=0.01)
    probe = CurvatureProbe(opt, loss_fn=lambda: quadratic(a, x), every=2, start_step=0)
    for _ in range(6):
        opt.zero_grad()
        quadratic(a, x).backward()
        opt.step()
    assert probe.n_estimates == 3  # after steps 1, 3 and 5
    auto = CurvatureProbe(
        torch.optim.SGD([x], lr=0.01), loss_fn=lambda: quadratic(a, x), min_every=7
    )
    for _ in range(4):
        auto.optimizer.zero_grad()
        quadratic(a, x).backward()
        auto.optimizer.step()
    assert isinstance(auto.interval, int)
    assert auto.interval >= 7
    assert auto.overhead_seconds > 0.0


def _auto_interval_with_fake_clock(monkeypatch, step_cost: float | None) -> CurvatureProbe:
    """Run SGD 12 steps on a quadratic with a fake clock: each step 1 s, each Hessian-vector
    product 0.1 s, the hooks 0 s; ``step_cost`` seconds reported per step (None: no sharing).
    The probe prices refreshes in seconds (``cost_model="seconds"``: a wall-clock budget's)."""
    import graff.probes.curvature as curvature_module

    now = [0.0]
    monkeypatch.setattr(curvature_module.time, "perf_counter", lambda: now[0])
    a, _ = spectrum_matrix(6, 10.0, 0)
    x = nn.Parameter(torch.ones(6, dtype=torch.float64))
    opt = torch.optim.SGD([x], lr=0.01)
    probe = CurvatureProbe(
        opt,
        loss_fn=lambda: quadratic(a, x),
        start_step=0,
        share_step_costs=step_cost is not None,
        cost_model="seconds",
    )
    estimate = probe.estimator._estimate

    def timed(iters: int, publish: bool = True):
        now[0] += 0.1 * (iters + 1)
        return estimate(iters, publish)

    probe.estimator._estimate = timed
    for _ in range(12):
        opt.zero_grad()
        quadratic(a, x).backward()
        now[0] += 1.0
        opt.step()
        if step_cost is not None:
            probe.add_step_cost(step_cost)
    assert probe.n_estimates == 2  # the cold start after step 1, the first refresh after step 11
    return probe


@pytest.mark.parametrize(
    ("step_cost", "share"),
    [(None, 0.01), (0.0, 0.01), (0.004, 0.006), (0.02, 0.0025), (float("nan"), 0.01)],
)
def test_shared_overhead_target_leaves_the_estimates_what_step_costs_leave(
    monkeypatch, step_cost, share
) -> None:
    # a refresh (3 products + 1) costs 0.4 s of a 1 s step: interval = 0.4 / share
    probe = _auto_interval_with_fake_clock(monkeypatch, step_cost)
    assert probe._step_time == pytest.approx(1.0)
    if step_cost is not None and math.isfinite(step_cost):
        assert probe.step_cost_seconds == pytest.approx(step_cost)
    assert probe.estimator.estimate_share() == pytest.approx(share)
    assert abs(probe.interval - 0.4 / share) <= 1.0


def test_share_step_costs_must_be_a_bool() -> None:
    x = nn.Parameter(torch.ones(2))
    with pytest.raises(GraffTypeError, match="share_step_costs"):
        CurvatureProbe(torch.optim.SGD([x], lr=0.1), hvp=False, share_step_costs=1)


# --------------------------------------------------------------------------- per-step statistics


def test_hypergradient_and_secant_closed_form_sgd() -> None:
    a, _ = spectrum_matrix(5, 20.0, 3)
    x1 = nn.Parameter(torch.tensor([1.0, -0.5, 0.3], dtype=torch.float64))
    x2 = nn.Parameter(torch.tensor([0.7, 0.2], dtype=torch.float64))
    lr = 0.02
    opt = torch.optim.SGD([x1, x2], lr=lr)
    blocks = [Block("a", (x1,)), Block("b", (x2,))]
    probe = CurvatureProbe(opt, blocks=blocks, hvp=False)
    x0 = torch.cat([x1, x2]).detach().clone()
    for _ in range(2):
        opt.zero_grad()
        quadratic(a, torch.cat([x1, x2])).backward()
        opt.step()
    g0 = a @ x0
    delta = -lr * g0
    g1 = a @ (x0 + delta)
    ad = a @ delta
    parts = [slice(0, 3), slice(3, 5)]

    def per_block(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.stack([u[s] @ v[s] for s in parts]).float()

    last = probe.last
    assert isinstance(last, CurvatureStats)
    assert last.step == 0
    torch.testing.assert_close(last.hypergrad, per_block(g1, delta))
    torch.testing.assert_close(last.grad_dot_update, per_block(g0, delta))
    torch.testing.assert_close(last.update_sq_norm, per_block(delta, delta))
    torch.testing.assert_close(last.grad_sq_norm, per_block(g1, g1))
    torch.testing.assert_close(last.secant, per_block(ad, delta) / per_block(delta, delta))
    torch.testing.assert_close(last.secant_ratio, per_block(ad, delta) / -per_block(g0, delta))
    # Global: q = ΔᵀAΔ / (η‖g0‖²) = η · Rayleigh quotient of A along the update.
    rayleigh = float(delta @ ad / (delta @ delta))
    assert probe.tripwire == pytest.approx(lr * rayleigh, rel=1e-5)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_statistics_use_the_applied_update(name: str) -> None:
    model, x, y = make_mlp(1)
    opt = OPTIMIZERS[name](model.parameters())
    probe = CurvatureProbe(
        opt, model=model, loss_fn=lambda: mlp_loss(model, x, y), every=2, start_step=0
    )
    log = train(model, opt, x, y, 4)
    delta = [b - a for a, b in zip(log[2]["theta"], log[3]["theta"], strict=True)]
    hyper = sum(
        float(g.reshape(-1) @ d.reshape(-1)) for g, d in zip(log[3]["grad"], delta, strict=True)
    )
    gdu = sum(
        float(g.reshape(-1) @ d.reshape(-1)) for g, d in zip(log[2]["grad"], delta, strict=True)
    )
    assert probe.last.step == 2
    assert float(probe.last.hypergrad.sum()) == pytest.approx(hyper, rel=1e-4, abs=1e-9)
    assert float(probe.last.grad_dot_update.sum()) == pytest.approx(gdu, rel=1e-4, abs=1e-9)
    assert probe.lambda_max is not None
    assert math.isfinite(probe.lambda_max)


def test_probe_does_not_change_training() -> None:
    runs = []
    for with_probe in (False, True):
        model, x, y = make_mlp(2)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        if with_probe:
            CurvatureProbe(
                opt, loss_fn=lambda m=model, x=x, y=y: mlp_loss(m, x, y), every=1, start_step=0
            )
        train(model, opt, x, y, 5)
        runs.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)


def test_non_finite_gradient_sample_is_dropped() -> None:
    x = nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = torch.optim.SGD([x], lr=0.1)
    probe = CurvatureProbe(opt, hvp=False)
    for grad in ([1.0, 2.0, 3.0], [0.5, 1.0, 1.5], [math.nan, 1.0, 1.0], [math.inf, 0.0, 0.0]):
        x.grad = torch.tensor(grad, dtype=torch.float64)
        kept = probe.last
        opt.step()
    assert probe.dropped_samples == 2
    assert probe.last is kept
    assert probe.last.step == 0
    for value in vars(probe.last).values():
        if isinstance(value, torch.Tensor):
            assert torch.isfinite(value).all()
    assert math.isfinite(probe.tripwire)


def test_non_finite_hvp_keeps_previous_estimate() -> None:
    x = nn.Parameter(torch.ones(3, dtype=torch.float64))
    poison = {"on": False}

    def loss_fn() -> torch.Tensor:
        scale = math.nan if poison["on"] else 2.0
        return scale * (x**2).sum()

    probe = CurvatureProbe(torch.optim.SGD([x], lr=0.1), loss_fn=loss_fn, every=1, start_step=0)
    assert probe.estimate_lambda_max() == pytest.approx(4.0)
    poison["on"] = True
    assert probe.estimate_lambda_max() == pytest.approx(4.0)
    assert probe.dropped_estimates == 1
    assert probe.lambda_max == pytest.approx(4.0)


def test_params_without_grad_are_skipped() -> None:
    used = nn.Parameter(torch.ones(2))
    unused = nn.Parameter(torch.ones(4))
    opt = torch.optim.Adam([used, unused], lr=0.1)
    blocks = [Block("used", (used,)), Block("unused", (unused,))]
    probe = CurvatureProbe(
        opt, blocks=blocks, loss_fn=lambda: 3.0 * (used**2).sum(), every=1, start_step=0
    )
    for _ in range(3):
        opt.zero_grad()
        (3.0 * (used**2).sum()).backward()
        opt.step()
    assert unused.grad is None
    assert probe.last.update_sq_norm[1] == 0.0
    assert probe.last.secant[1] == 0.0
    assert probe.last.update_sq_norm[0] > 0.0
    assert math.isfinite(probe.lambda_max)
    assert probe.lambda_max > 0.0


def test_model_runs_in_eval_mode_during_estimate_and_mode_is_restored() -> None:
    seen: list[bool] = []

    class Recorder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 1)
            self.drop = nn.Dropout(0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(self.training)
            return self.drop(self.lin(x)).pow(2).mean()

    model = Recorder().train()
    model.lin.eval()  # a mixed state must come back exactly
    x = torch.randn(8, 3)
    probe = CurvatureProbe(
        torch.optim.SGD(model.parameters(), lr=0.1), model=model, loss_fn=lambda: model(x)
    )
    probe.estimate_lambda_max()
    assert seen == [False]
    assert model.training
    assert not model.lin.training
    assert model.drop.training


# --------------------------------------------------------------------------- errors, lifecycle


def test_without_loss_source_lambda_stays_none() -> None:
    x = nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([x], lr=0.1)
    probe = CurvatureProbe(opt)
    for _ in range(3):
        x.grad = torch.ones(2)
        opt.step()
    assert probe.lambda_max is None
    assert probe.lambda_max_safe is None
    with pytest.raises(ProbeError, match="loss_fn="):
        probe.estimate_lambda_max()
    off = CurvatureProbe(opt, loss_fn=lambda: (x**2).sum(), hvp=False)
    with pytest.raises(ProbeError, match="hvp=False"):
        off.estimate_lambda_max()


def test_adam_without_state_has_no_estimate() -> None:
    x = nn.Parameter(torch.ones(2))
    probe = CurvatureProbe(
        torch.optim.Adam([x], lr=0.1), loss_fn=lambda: (x**2).sum(), start_step=0
    )
    with pytest.raises(ProbeError, match="no state yet"):
        probe.estimate_lambda_max()
    assert probe.lambda_max is None


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"every": 0}, GraffConfigError, "every"),
        ({"every": "sometimes"}, GraffConfigError, "every must be 'auto'"),
        ({"power_iters": 0}, GraffConfigError, "power_iters"),
        ({"initial_iters": 2.5}, GraffTypeError, "initial_iters"),
        ({"margin": 0.9}, GraffConfigError, "margin"),
        ({"margin": math.nan}, GraffConfigError, "margin"),
        ({"overhead_target": 0.0}, GraffConfigError, "overhead_target"),
        ({"min_every": -1}, GraffConfigError, "min_every"),
        ({"secant_window": 0}, GraffConfigError, "secant_window"),
        ({"seed": -3}, GraffConfigError, "seed"),
        ({"hvp": "yes"}, GraffTypeError, "hvp"),
        ({"preconditioned": 1}, GraffTypeError, "preconditioned"),
        ({"preconditioned": True}, GraffConfigError, "preconditioned=True"),
        ({"loss_fn": 3}, GraffTypeError, "loss_fn"),
        ({"model": "net"}, GraffTypeError, "model"),
        ({"blocks": [1, 2]}, GraffTypeError, "blocks"),
    ],
)
def test_bad_arguments_raise(kwargs: dict, error: type, match: str) -> None:
    x = nn.Parameter(torch.ones(2))
    with pytest.raises(error, match=match):
        CurvatureProbe(torch.optim.SGD([x], lr=0.1), **kwargs)


def test_optimizer_must_be_an_optimizer() -> None:
    with pytest.raises(GraffTypeError, match="optimizer"):
        CurvatureProbe([nn.Parameter(torch.ones(1))])


def test_state_dict_round_trip_gives_the_same_next_estimate() -> None:
    def run(seed: int, every: int, steps: int):
        model, x, y = make_mlp(4)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        probe = CurvatureProbe(
            opt, loss_fn=lambda: mlp_loss(model, x, y), every=every, seed=seed, start_step=0
        )
        train(model, opt, x, y, steps)
        return model, opt, probe

    _, _, probe_a = run(seed=0, every=2, steps=4)
    buf = io.BytesIO()
    torch.save(probe_a.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    _, _, probe_b = run(seed=9, every=5, steps=4)  # same weights and optimizer state
    probe_b.load_state_dict(state)
    assert probe_b.lambda_max == probe_a.lambda_max
    assert probe_b.interval == probe_a.interval
    assert probe_b.estimate_lambda_max() == probe_a.estimate_lambda_max()
    with pytest.raises(CheckpointError, match="format_version"):
        probe_b.load_state_dict({**state, "format_version": 99})
    flat_v1 = {k: v for k, v in state.items() if k != "estimator"} | state["estimator"]
    with pytest.raises(CheckpointError, match="format_version 2, got 1"):  # before the split
        probe_b.load_state_dict({**flat_v1, "format_version": 1})
    with pytest.raises(CheckpointError, match="eigenvector"):
        probe_b.load_state_dict(
            {**state, "estimator": {**state["estimator"], "eigenvector": torch.zeros(3)}}
        )


def test_tiny_qwen3_lora_capture_path(tiny_lora_qwen3, token_batch) -> None:
    model = tiny_lora_qwen3.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    probe = CurvatureProbe(opt, model=model, every=2, initial_iters=8, start_step=0)
    assert len(probe.blocks) == 12  # 2 layers × 6 LoRA-adapted projections
    other = {k: v.roll(1, dims=1) for k, v in token_batch.items()}
    for batch in (token_batch, other, other):
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
    assert probe.lambda_max is not None
    assert math.isfinite(probe.lambda_max)
    assert probe.lambda_max > 0.0
    assert model.training
    assert all(m.training for m in model.modules())
    torch.testing.assert_close(
        probe.state_dict()["estimator"]["probe_inputs"]["kwargs"]["input_ids"],
        token_batch["input_ids"],
    )
    buf = io.BytesIO()
    torch.save(probe.state_dict(), buf)
    buf.seek(0)
    restored = CurvatureProbe(opt, model=model, every=2, initial_iters=8, start_step=0)
    restored.load_state_dict(torch.load(buf, weights_only=True))
    assert restored.estimate_lambda_max() == probe.estimate_lambda_max()
    restored.remove()
    probe.remove()
    assert not model._forward_pre_hooks
    assert not opt._optimizer_step_pre_hooks
    assert not opt._optimizer_step_post_hooks


def test_model_without_loss_output_is_reported(tiny_lora_qwen3, token_batch) -> None:
    model = tiny_lora_qwen3
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    probe = CurvatureProbe(opt, model=model, every=1, start_step=0)
    with pytest.raises(ProbeError, match="no probe batch"):
        probe.estimate_lambda_max()
    model(input_ids=token_batch["input_ids"]).logits.sum().backward()
    with pytest.raises(ProbeError, match=r"holds no loss"):
        probe.estimate_lambda_max()


def test_dominant_negative_eigenvalue_is_shifted_past() -> None:
    g = torch.Generator().manual_seed(5)
    q, _ = torch.linalg.qr(torch.randn(20, 20, generator=g, dtype=torch.float64))
    eigs = 5.0 * torch.rand(20, generator=g, dtype=torch.float64)
    eigs[0], eigs[1] = 10.0, -30.0  # |λ_min| > λ_max: plain power iteration finds −30
    a = q @ torch.diag(eigs) @ q.T
    x = nn.Parameter(torch.randn(20, dtype=torch.float64))
    probe = CurvatureProbe(torch.optim.SGD([x], lr=0.01), loss_fn=lambda: quadratic(a, x))
    lam = probe.estimate_lambda_max()
    assert 0.9 * 10.0 <= lam <= 10.0 * (1 + 1e-5)


def test_no_scheduled_estimate_before_start_step_for_preconditioned_optimizers() -> None:
    p = nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = torch.optim.Adam([p], lr=0.01)
    probe = CurvatureProbe(opt, loss_fn=lambda: 3.0 * p[0] ** 2 + p[1] ** 2, every=1)
    assert probe.start_step == 10
    for step in range(1, 12):
        opt.zero_grad()
        (3.0 * p[0] ** 2 + p[1] ** 2).backward()
        opt.step()
        assert (probe.lambda_max is None) == (step < 10)
    assert CurvatureProbe(torch.optim.SGD([p], lr=0.1), loss_fn=lambda: p.sum()).start_step == 0
    with pytest.raises(ValueError, match="start_step"):
        CurvatureProbe(opt, loss_fn=lambda: p.sum(), start_step=-1)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_equal_and_opposite_top_eigenvalues_do_not_stall_the_estimate(seed: int) -> None:
    """Eigenvalues +10 and −10: plain power iteration swings between the two eigenvectors and its
    Rayleigh quotient stays wherever the start vector's mix puts it (anything in [−10, 10])."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    eigs = 3.0 * torch.rand(12, generator=g, dtype=torch.float64)
    eigs[0], eigs[1] = 10.0, -10.0
    a = q @ torch.diag(eigs) @ q.T
    x = nn.Parameter(torch.randn(12, dtype=torch.float64))
    probe = CurvatureProbe(
        torch.optim.SGD([x], lr=0.01), loss_fn=lambda: quadratic(a, x), seed=seed
    )
    lam = probe.estimate_lambda_max()
    assert 0.9 * 10.0 <= lam <= 10.0 * (1 + 1e-5)


def test_scaled_update_statistics_describe_the_update_really_applied() -> None:
    """After scale_last_update(s) every statistic of that step refers to s·Δθ (closed form, SGD
    on a quadratic): ⟨g_{t+1}, sΔθ⟩, ⟨g_t, sΔθ⟩, ‖sΔθ‖² and the secant along sΔθ."""
    a, _ = spectrum_matrix(5, 20.0, 3)
    x1 = nn.Parameter(torch.tensor([1.0, -0.5, 0.3], dtype=torch.float64))
    x2 = nn.Parameter(torch.tensor([0.7, 0.2], dtype=torch.float64))
    lr, scales = 0.02, torch.tensor([2.0, 0.5])
    opt = torch.optim.SGD([x1, x2], lr=lr)
    probe = CurvatureProbe(opt, blocks=[Block("a", (x1,)), Block("b", (x2,))], hvp=False)
    x0 = torch.cat([x1, x2]).detach().clone()
    for step in range(2):
        opt.zero_grad()
        quadratic(a, torch.cat([x1, x2])).backward()
        opt.step()
        if step == 0:
            probe.scale_last_update(scales)
    g0 = a @ x0
    delta = -lr * g0 * torch.tensor([2.0] * 3 + [0.5] * 2, dtype=torch.float64)
    torch.testing.assert_close(torch.cat([x1, x2]).detach(), x0 + delta - lr * (a @ (x0 + delta)))
    g1 = a @ (x0 + delta)
    parts = [slice(0, 3), slice(3, 5)]

    def per_block(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.stack([u[s] @ v[s] for s in parts]).float()

    last = probe.last
    torch.testing.assert_close(last.hypergrad, per_block(g1, delta))
    torch.testing.assert_close(last.grad_dot_update, per_block(g0, delta))
    torch.testing.assert_close(last.update_sq_norm, per_block(delta, delta))
    torch.testing.assert_close(last.secant, per_block(a @ delta, delta) / per_block(delta, delta))


def test_parameters_frozen_after_the_probe_was_built_get_a_zero_product() -> None:
    # ½ x1ᵀ diag(1, 2, 3) x1 + ½ x2ᵀ diag(10, 20, 30) x2: λ_max 30 with both, 3 once x2 is
    # frozen (requires_grad=False mid-run). autograd.grad over a frozen tensor used to raise.
    x1 = nn.Parameter(torch.ones(3, dtype=torch.float64))
    x2 = nn.Parameter(torch.ones(3, dtype=torch.float64))
    a = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    b = torch.diag(torch.tensor([10.0, 20.0, 30.0], dtype=torch.float64))

    def loss() -> torch.Tensor:
        return quadratic(a, x1) + quadratic(b, x2)

    probe = CurvatureProbe(torch.optim.SGD([x1, x2], lr=0.01), loss_fn=loss)
    assert probe.estimate_lambda_max() == pytest.approx(30.0, rel=1e-6)
    x2.requires_grad_(False)
    assert probe.estimate_lambda_max(10) == pytest.approx(3.0, rel=1e-6)
    x1.requires_grad_(False)  # nothing trainable left: the probe says so (λ̂ off, in a run)
    with pytest.raises(ProbeError, match="grad graph"):
        probe.estimate_lambda_max(3)
