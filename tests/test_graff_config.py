"""GraffConfig (validation, cross-field rules, the arguments GraffScheduler refuses), the state
tree (each component round-trips its own state; an old-format state is a CheckpointError), the
non-finite-loss count surviving a resume, and the planner-off ablation (``planner=False``)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import graff
from graff.errors import CheckpointError, GraffConfigError, GraffTypeError
from graff.planner.features import EntropyTrend, ExplosionWatch, LossTracker, StatsWindow
from graff.planner.net import PlannerNet
from graff.planner.online import OnlinePlanner
from graff.planner.peak_search import PeakSearch
from graff.planner.refresh import RefreshAllowance


# ------------------------------------------------------------------ config
def test_defaults_are_the_documented_ones() -> None:
    cfg = graff.GraffConfig()
    assert (cfg.plan_every, cfg.probe_interval, cfg.learn_every) == (10, 10, 1)
    assert cfg.planner
    assert cfg.online
    assert cfg.peak_search
    assert not cfg.block_multipliers
    assert cfg.keep_raised_peak
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.plan_every = 3  # type: ignore[misc]


@settings(max_examples=80, deadline=None)
@given(plan=st.integers(1, 50), probe=st.one_of(st.none(), st.integers(1, 50)))
def test_probe_every_never_exceeds_plan_every(plan: int, probe: int | None) -> None:
    if probe is not None and probe > plan:
        with pytest.raises(GraffConfigError, match="probe_every"):
            graff.GraffConfig(plan_every=plan, probe_every=probe)
    else:
        cfg = graff.GraffConfig(plan_every=plan, probe_every=probe)
        assert 1 <= cfg.probe_interval <= cfg.plan_every


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"planner_lr": 0.0}, GraffConfigError, "planner_lr"),
        ({"plan_every": 0}, GraffConfigError, "plan_every"),
        ({"learn_every": 1.5}, GraffTypeError, "learn_every"),
        ({"search_fraction": 0.0}, GraffConfigError, "search_fraction"),
        ({"peak_max": 0.5}, GraffConfigError, "peak_max"),
        ({"backoff": 1.0}, GraffConfigError, "backoff"),
        ({"search_headroom": 0.5}, GraffConfigError, "search_headroom"),
        ({"refresh_allowance": 1.5}, GraffConfigError, "refresh_allowance"),
        ({"multiplier_max": 20.0}, GraffConfigError, "multiplier_max"),
        ({"residual_max": math.nan}, GraffConfigError, "residual_max"),
        ({"guard_c": -1.0}, GraffConfigError, "guard_c"),
        ({"curvature_every": 0}, GraffConfigError, "curvature_every"),
        ({"curvature_every": "often"}, GraffTypeError, "curvature_every"),
        ({"online": 1}, GraffTypeError, "online"),
        ({"keep_raised_peak": "yes"}, GraffTypeError, "keep_raised_peak"),
        ({"planner": False, "block_multipliers": True}, GraffConfigError, "block_multipliers"),
    ],
)
def test_bad_values_name_the_field(kwargs: dict, error: type, name: str) -> None:
    with pytest.raises(error, match=name):
        graff.GraffConfig(**kwargs)


@settings(max_examples=60, deadline=None)
@given(
    fraction=st.floats(-1.0, 2.0, allow_nan=False),
    peak=st.floats(0.0, 2e4, allow_nan=False),
    residual=st.floats(0.0, 200.0, allow_nan=False),
)
def test_ranges_are_checked(fraction: float, peak: float, residual: float) -> None:
    valid = 0.0 < fraction <= 1.0 and 1.0 <= peak <= 1e4 and 1.0 <= residual <= 100.0
    make = lambda: graff.GraffConfig(  # noqa: E731
        search_fraction=fraction, peak_max=peak, residual_max=residual
    )
    if valid:
        assert make().peak_max == peak
    else:
        with pytest.raises(GraffConfigError):
            make()


def _opt() -> torch.optim.Optimizer:
    return torch.optim.SGD([nn.Parameter(torch.zeros(3))], lr=0.1)


def test_a_config_field_passed_to_the_scheduler_names_graff_config() -> None:
    with pytest.raises(GraffTypeError, match=r"config=graff\.GraffConfig\(plan_every=5\)"):
        graff.GraffScheduler(_opt(), 10, plan_every=5)
    graff.GraffScheduler(_opt(), 10, config=graff.GraffConfig(plan_every=5))  # what it says


def test_warmup_is_never_silently_ignored() -> None:
    with pytest.raises(GraffTypeError, match="BudgetPrior"):
        graff.GraffScheduler(_opt(), 10, prior=graff.BudgetPrior("wsd"), warmup=0.2)
    with pytest.raises(GraffTypeError, match="warmup"):
        graff.GraffScheduler(_opt(), 10, warmup=0.2)


def test_unknown_arguments_and_config_types_are_clear_errors() -> None:
    with pytest.raises(GraffTypeError, match="plan_evrey"):
        graff.GraffScheduler(_opt(), 10, plan_evrey=5)
    with pytest.raises(GraffTypeError, match="GraffConfig"):
        graff.GraffScheduler(_opt(), 10, config={"plan_every": 5})


def test_user_facing_arguments_are_few() -> None:
    import inspect

    params = inspect.signature(graff.GraffScheduler).parameters
    named = [p for p in params if p not in ("self", "optimizer", "budget", "unknown")]
    assert len(named) <= 13, named


# -------------------------------------------------------------- state tree
def _quadratic(seed: int = 0):
    torch.manual_seed(seed)
    theta = nn.Parameter(torch.randn(6))
    return theta, torch.optim.Adam([theta], lr=0.05)


def _run(sched, theta, opt, steps: int, losses=None) -> list[float]:
    lrs = []
    for i in range(steps):
        loss = (theta - 1.0).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        given_loss = loss if losses is None else losses(i, loss)
        sched.step(given_loss)
        lrs.append(sched.get_last_lr()[0])
    return lrs


def _trained_scheduler() -> graff.GraffScheduler:
    theta, opt = _quadratic()
    sched = graff.GraffScheduler(
        opt, graff.BudgetClock(steps=40), config=graff.GraffConfig(plan_every=2)
    )
    _run(sched, theta, opt, 15)
    return sched


def test_every_component_round_trips_its_own_state() -> None:
    sched = _trained_scheduler()
    parts = sched._parts()
    assert set(parts) == {"planner", "window", "peak_search", "entropies", "curvature"}
    state = sched.state_dict()["extra"]
    _, opt = _quadratic(1)
    other = graff.GraffScheduler(
        opt, graff.BudgetClock(steps=40), config=graff.GraffConfig(plan_every=2)
    )
    for name, part in other._parts().items():
        part.load_state_dict(state[name])
        assert _equal(part.state_dict(), state[name]), name


def test_the_small_components_round_trip() -> None:
    window = StatsWindow(3)
    window._sums += 1.0
    window.count = 2
    search = PeakSearch(enabled=True, search_fraction=0.5, peak_max=10.0, backoff=3.0)
    for i in range(12):
        search.observe(3.0 - 0.1 * i)
        search.update(i / 100, 0.0, unstable=i == 9, log_ceiling=1.0, at_best=i % 2 == 0)
    search.nonfinite_seen = 2
    net = PlannerNet()
    runtime = OnlinePlanner(
        net, torch.eye(3), lr=1e-3, plan_every=2, learn_every=1, online=True,
        block_multipliers=False, multiplier_max=2.0, residual_max=1.25,
    )  # fmt: skip
    runtime.plan(torch.randn(3, net.num_features), None)
    for make, part in [
        (lambda: StatsWindow(3), window),
        (lambda: PeakSearch(enabled=True, search_fraction=0.5, peak_max=10.0, backoff=3.0), search),
        (LossTracker, search.losses),
        (ExplosionWatch, search.explosion),
        (lambda: RefreshAllowance(0.1), search.allowance),
        (EntropyTrend, EntropyTrend()),
        (
            lambda: OnlinePlanner(
                PlannerNet(), torch.eye(3), lr=1e-3, plan_every=2, learn_every=1, online=True,
                block_multipliers=False, multiplier_max=2.0, residual_max=1.25,
            ),
            runtime,
        ),
    ]:  # fmt: skip
        twin = make()
        twin.load_state_dict(part.state_dict())
        assert _equal(twin.state_dict(), part.state_dict()), type(part).__name__


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b))


def test_a_state_of_the_old_format_is_a_checkpoint_error() -> None:
    sched = _trained_scheduler()
    state = sched.state_dict()
    old = dict(state, extra={k: v for k, v in state["extra"].items() if k != "version"})
    old["extra"]["calibrator"] = old["extra"].pop("peak_search")
    before = sched.state_dict()
    with pytest.raises(CheckpointError, match="version"):
        sched.load_state_dict(old)
    assert _equal(sched.state_dict()["extra"], before["extra"])  # nothing changed


def test_a_component_that_rejects_its_state_leaves_the_scheduler_unchanged() -> None:
    sched = _trained_scheduler()
    state = sched.state_dict()
    state["extra"]["peak_search"]["allowance"]["spent"] = -1.0
    before = sched.state_dict()
    with pytest.raises(CheckpointError, match="refresh-allowance"):
        sched.load_state_dict(state)
    assert _equal(sched.state_dict()["extra"], before["extra"])


def test_a_resume_keeps_the_non_finite_losses_already_answered() -> None:
    # A non-finite loss at step 3; then, after the back-off's cool-down, loss-less steps (a
    # model without a captured loss). The uninterrupted run backs off once for it; a run
    # resumed at step 30 must not back off again at its first loss-less step.
    def losses(i, loss):
        return torch.tensor(float("nan")) if i == 3 else loss

    def run(resume: bool) -> tuple[list[float], int]:
        theta, opt = _quadratic()
        cfg = graff.GraffConfig(search_fraction=0.5)
        sched = graff.GraffScheduler(opt, graff.BudgetClock(steps=60), warm_start=None, config=cfg)
        lrs = _run(sched, theta, opt, 30, losses)
        if resume:
            saved = sched.state_dict()
            theta2, opt2 = _quadratic()
            theta2.data.copy_(theta.data)
            opt2.load_state_dict(opt.state_dict())
            sched = graff.GraffScheduler(
                opt2, graff.BudgetClock(steps=60), warm_start=None, config=cfg
            )
            sched.load_state_dict(saved)
            theta, opt = theta2, opt2
        lrs += _run(sched, theta, opt, 12, lambda i, loss: None)
        return lrs, sched.peak_search.backoffs

    straight, backoffs = run(False)
    resumed, backoffs_resumed = run(True)
    assert backoffs == 1
    assert backoffs_resumed == backoffs
    assert resumed == straight


# --------------------------------------------------------- planner-off ablation
def test_planner_off_never_runs_the_planner_and_equals_a_zero_silent_planner(monkeypatch) -> None:
    def lrs_of(config: graff.GraffConfig, forbid: bool) -> tuple[list[float], list]:
        theta, opt = _quadratic()
        sched = graff.GraffScheduler(
            opt, graff.BudgetClock(steps=40), warm_start=None, config=config
        )
        weights = [p.detach().clone() for p in sched.planner.parameters()]
        if forbid:

            def no_forward(*args, **kwargs):
                raise AssertionError("the planner ran")

            monkeypatch.setattr(sched.planner, "forward", no_forward)
        lrs = _run(sched, theta, opt, 40)
        for before, after in zip(weights, sched.planner.parameters(), strict=True):
            assert torch.equal(before, after)
        return lrs, [sched.runtime.plans, sched.runtime.updates, sched.entropy_probe]

    off, counts = lrs_of(graff.GraffConfig(planner=False), forbid=True)
    assert counts == [0, 0, None]
    zero, counts = lrs_of(graff.GraffConfig(planner=True, online=False), forbid=False)
    assert counts[0] > 0  # the control: this one does run a (silent) planner
    assert off == zero
    searched = [lr for lr in off if lr > off[0] * 1.5]
    assert searched  # the peak search still raised the LR


def test_a_planner_file_without_the_planner_is_refused_with_the_fix(tmp_path) -> None:
    """``warm_start=path`` loads a planner; with ``planner=False`` it would be ignored."""
    model = nn.Linear(3, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    path = graff.save_planner(PlannerNet(), tmp_path / "p.safetensors")
    off = graff.GraffConfig(planner=False)
    with pytest.raises(GraffConfigError, match=r"planner=False"):
        graff.GraffScheduler(opt, graff.BudgetClock(steps=5), warm_start=path, config=off)
    graff.GraffScheduler(opt, graff.BudgetClock(steps=5), warm_start=path).remove()
    for warm_start in ("default", None):  # the default and "no file" are fine without a planner
        graff.GraffScheduler(
            opt, graff.BudgetClock(steps=5), warm_start=warm_start, config=off
        ).remove()


def test_planner_off_puts_no_entropy_hook_on_a_lora_model(tiny_lora_qwen3) -> None:
    """Planner-off hooks the model only to capture the loss and λ̂'s inputs: the entropy lens
    feeds the planner alone, and it adds its hook only with the planner."""
    model = tiny_lora_qwen3
    params = [p for p in model.parameters() if p.requires_grad]

    def hooks() -> int:
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    before = hooks()
    default = graff.GraffScheduler(
        torch.optim.AdamW(params, lr=1e-3), 10, model=model, config=graff.GraffConfig(planner=False)
    )
    assert default.entropy_probe is None
    default_hooks = hooks() - before
    default.remove()
    planner = graff.GraffScheduler(
        torch.optim.AdamW(params, lr=1e-3), 10, model=model, config=graff.GraffConfig(planner=True)
    )
    assert planner.entropy_probe is not None
    assert hooks() - before > default_hooks
    planner.remove()
    assert hooks() == before
