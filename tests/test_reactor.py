"""ReactorScheduler: the REINFORCE update against hand-computed values, seeding, learning signal,
hostile losses, optimizers and groups, LoRA + entropy features, exact resume, bad arguments."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from graff import BudgetClock, ReactorConfig
from graff.errors import CheckpointError, GraffConfigError, GraffTypeError, ProbeError
from graff.schedulers.reactor import ReactorScheduler
from graff.schedulers.reactor_policy import (
    STATE_FEATURES,
    EmaBaseline,
    interval_reward,
    reinforce_loss,
)


def _dummy_opt(lrs=(0.1,), cls=torch.optim.SGD, **kw):
    params = [nn.Parameter(torch.zeros(2)) for _ in lrs]
    groups = [{"params": [p], "lr": lr} for p, lr in zip(params, lrs, strict=True)]
    return params, cls(groups, **kw)


def _run_stream(losses, *, seed=0, interval=2, lrs=(0.1,), **knobs):
    """Feed a fixed loss stream (independent of the LR); return the LRs after every step."""
    params, opt = _dummy_opt(lrs)
    config = ReactorConfig(decision_interval=interval, **knobs)
    sched = ReactorScheduler(opt, budget=BudgetClock(steps=len(losses)), seed=seed, config=config)
    out = []
    for loss in losses:
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
        sched.step(loss=loss)
        out.append(sched.get_last_lr())
    return sched, out


# ---------------------------------------------------------------- the policy-gradient update
def test_reinforce_loss_gradient_matches_formula():
    mean = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    log_std = torch.tensor(-0.4, dtype=torch.float64, requires_grad=True)
    u, adv, beta = 1.1, -0.7, 0.05
    reinforce_loss(mean, log_std, u, adv, beta).backward()
    var = math.exp(-0.8)
    assert mean.grad.item() == pytest.approx(-adv * (u - 0.3) / var, rel=1e-12)
    assert log_std.grad.item() == pytest.approx(-adv * ((u - 0.3) ** 2 / var - 1) - beta, rel=1e-12)


def test_reward_and_baseline_closed_forms():
    assert interval_reward(2.0, 1.5, 0.1, 100.0) == pytest.approx(0.5 / (2.0 * 0.1), rel=1e-6)
    assert interval_reward(-2.0, -2.5, 0.1, 100.0) == pytest.approx(0.5 / (2.0 * 0.1), rel=1e-6)
    assert interval_reward(2.0, 0.0, 1e-3, 10.0) == 10.0
    assert interval_reward(2.0, 1.0, 0.0, 10.0) is None
    b = EmaBaseline(0.9)
    assert b.value is None
    b.update(3.0)
    assert b.value == pytest.approx(3.0)
    b.update(1.0)
    assert b.value == pytest.approx((0.9 * 0.1 * 3.0 + 0.1 * 1.0) / (1 - 0.81))


def test_policy_update_on_fixed_trajectory_matches_hand_computation():
    """Decision 2 (step 6) makes the first update: A = r_2 − r_1 on the decision-1 draw."""
    losses = [4.0, 3.0, 3.0, 2.6, 2.0, 1.9, 1.5, 1.5]
    lr_c, beta, total, interval = 1e-2, 0.03, 40, 2
    params, opt = _dummy_opt()
    sched = ReactorScheduler(
        opt,
        budget=BudgetClock(steps=total),
        seed=3,
        config=ReactorConfig(decision_interval=interval, controller_lr=lr_c, entropy_bonus=beta),
    )
    for t in range(6):
        if t == 4:  # just before the update: snapshot the policy and the pending draw
            before = copy.deepcopy(sched.policy)
            state, u = sched._pending
        params[0].grad = torch.ones(2)
        opt.step()
        sched.step(loss=losses[t])
    means = [sum(losses[i : i + 2]) / 2 for i in (0, 2, 4)]
    du = interval / total
    r1 = (means[0] - means[1]) / (abs(means[0]) + 1e-8) / du
    r2 = (means[1] - means[2]) / (abs(means[1]) + 1e-8) / du
    adv = r2 - r1  # the bias-corrected EMA after one reward is that reward
    assert sched.updates == 1
    assert sched.last_decision.reward == pytest.approx(r2, rel=1e-9)
    assert sched.last_decision.advantage == pytest.approx(adv, rel=1e-9)
    with torch.no_grad():
        hidden = torch.tanh(before.hidden(state))
        mu = before.mean_head(hidden).item()
    sigma2 = math.exp(2 * before.log_std.item())
    d_mu = -adv * (u - mu) / sigma2
    d_log_std = -adv * ((u - mu) ** 2 / sigma2 - 1) - beta
    pol = sched.policy
    torch.testing.assert_close(pol.mean_head.bias.grad, torch.tensor([d_mu], dtype=torch.float64))
    torch.testing.assert_close(pol.mean_head.weight.grad, d_mu * hidden.reshape(1, -1))
    assert pol.log_std.grad.item() == pytest.approx(d_log_std, rel=1e-9)
    # The first Adam step moves each parameter by −lr · g / (|g| + eps).
    for name, p in pol.named_parameters():
        g, old = p.grad, dict(before.named_parameters())[name]
        torch.testing.assert_close(p.detach() - old.detach(), -lr_c * g / (g.abs() + 1e-8))
    assert torch.equal(pol.hidden.weight, before.hidden.weight)  # zero grad through w2 = 0


def test_reward_is_normalised_by_wall_clock_budget_used(fake_time):
    """Same losses, intervals that cost twice the time: the reward halves (Δu doubles)."""
    rewards = {}
    for dt in (1.0, 2.0):
        _, opt = _dummy_opt()
        clock = BudgetClock(seconds=1000, time_fn=fake_time)
        config = ReactorConfig(decision_interval=2, reward_clip=1e3)
        sched = ReactorScheduler(opt, budget=clock, seed=0, config=config)
        for loss in (2.0, 2.0, 1.5, 1.5):
            fake_time.advance(dt)
            opt.step()
            sched.step(loss=loss)
        rewards[dt] = sched.last_decision.reward
    assert rewards[1.0] == pytest.approx((2.0 - 1.5) / 2.0 / (2 * 1.0 / 1000), rel=1e-6)
    assert rewards[2.0] == pytest.approx(rewards[1.0] / 2, rel=1e-6)


# --------------------------------------------------------------------------- reproducibility
def test_same_seed_same_lrs_different_seed_different():
    losses = [2.0 / (1 + 0.05 * t) + 0.1 * math.sin(t) for t in range(80)]
    _, a = _run_stream(losses, seed=7, controller_lr=1e-2)
    _, b = _run_stream(losses, seed=7, controller_lr=1e-2)
    _, c = _run_stream(losses, seed=8, controller_lr=1e-2)
    assert a == b
    assert a != c
    assert len({round(x[0], 12) for x in a}) > 10  # the LR really moves


# ---------------------------------------------------------------------- learning signal
def _feedback_run(better: str, decisions: int = 400, seed: int = 0) -> list[float]:
    """Loss stream whose per-step relative drop is κ·f (``better="high"``) or κ/f (``"low"``),
    f the LR factor the scheduler wrote; returns the policy mean at each decision."""
    param = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    interval, kappa = 2, 1e-7
    sched = ReactorScheduler(
        opt,
        budget=BudgetClock(steps=interval * decisions),
        config=ReactorConfig(decision_interval=interval, controller_lr=1e-2, reward_clip=1e3),
        lr_min_factor=1e-6,
        lr_max_factor=1e6,
        seed=seed,
    )
    loss, means = 1.0, []
    for _ in range(interval * decisions):
        f = opt.param_groups[0]["lr"]
        loss *= 1.0 - kappa * (f if better == "high" else 1.0 / f)
        opt.step()
        sched.step(loss=loss)
        if sched._in_interval == 0:
            means.append(sched.last_decision.mean)
    return means


@pytest.mark.parametrize("better", ["high", "low"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_policy_mean_moves_toward_the_better_lr(better, seed):
    """μ starts at 0 in every state; over 300 decisions its average must take the right sign."""
    means = _feedback_run(better, decisions=300, seed=seed)
    average = sum(means) / len(means)
    sign = 1.0 if better == "high" else -1.0
    assert means[0] == 0.0
    assert sign * average > 0.1, f"mean action {average:.3f} where {better} LR is better"


# ------------------------------------------------------------------------ hostile losses
_HOSTILE = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -1e308, 0.0, -3.0, 1e-300]),
)


@settings(max_examples=40, deadline=None)
@given(losses=st.lists(_HOSTILE, min_size=1, max_size=40), seed=st.integers(0, 2**32))
def test_lr_finite_and_clamped_under_hostile_losses(losses, seed):
    sched, lrs = _run_stream(losses, seed=seed, lrs=(0.1, 0.01), controller_lr=0.5)
    for lr_a, lr_b in lrs:
        assert math.isfinite(lr_a)
        assert 0.1 * 1e-3 * (1 - 1e-9) <= lr_a <= 0.1 * 100 * (1 + 1e-9)
        assert lr_a / lr_b == pytest.approx(10.0, rel=1e-9)
    assert all(bool(torch.isfinite(p).all()) for p in sched.policy.parameters())
    assert sched.baseline.value is None or math.isfinite(sched.baseline.value)


def test_nan_losses_never_reach_the_policy():
    sched, lrs = _run_stream([math.nan] * 20, controller_lr=0.5)
    assert sched.nonfinite_losses == 20
    assert sched.updates == 0
    assert sched.skipped_updates == sched.decisions - 1 == 9
    assert all(lr == [0.1] or math.isfinite(lr[0]) for lr in lrs)


# ------------------------------------------------------------------ optimizers and groups
_OPTIMIZERS = [
    (torch.optim.SGD, {"momentum": 0.9}),
    (torch.optim.Adam, {}),
    (torch.optim.AdamW, {"weight_decay": 0.01}),
    (torch.optim.RMSprop, {}),
    (torch.optim.Adagrad, {}),
]


@pytest.mark.parametrize(("cls", "kw"), _OPTIMIZERS, ids=lambda x: getattr(x, "__name__", ""))
def test_any_optimizer_groups_keep_ratios(cls, kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = cls(
        [
            {"params": model[0].parameters(), "lr": 0.01},
            {"params": model[2].parameters(), "lr": 0.002},
        ],
        **kw,
    )
    sched = ReactorScheduler(
        opt,
        budget=BudgetClock(steps=40),
        seed=1,
        config=ReactorConfig(decision_interval=3, controller_lr=0.1),
    )
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    for _ in range(30):
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step(loss=loss)
        lr_a, lr_b = sched.get_last_lr()
        assert [g["lr"] for g in opt.param_groups] == [lr_a, lr_b]
        assert lr_a / lr_b == pytest.approx(5.0, rel=1e-9)
    assert sched.updates > 0
    state = sched.last_decision.state
    assert state[STATE_FEATURES.index("log_grad_norm")] != 0.0
    assert state[STATE_FEATURES.index("secant_ratio")] != 0.0


def test_is_an_lr_scheduler():
    _, opt = _dummy_opt()
    sched = ReactorScheduler(opt, budget=BudgetClock(steps=10), seed=0)
    assert isinstance(sched, torch.optim.lr_scheduler.LRScheduler)
    assert sched.get_last_lr() == [0.1]


def test_guard_caps_lr_at_max_stable_lr():
    h = torch.tensor([100.0, 1.0, 1.0])
    p = nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.1)

    def loss_fn():
        return 0.5 * (h * p * p).sum()

    sched = ReactorScheduler(
        opt,
        budget=BudgetClock(steps=50),
        loss_fn=loss_fn,
        guard=True,
        seed=0,
        config=ReactorConfig(decision_interval=2),
    )
    for _ in range(25):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
        sched.step(loss=loss)
    lam = sched.curvature_probe.lambda_max_safe
    assert lam is not None
    assert lam == pytest.approx(1.15 * 100.0, rel=0.05)
    assert sched.get_last_lr()[0] <= 0.95 * 2.0 / lam * (1 + 1e-9)
    assert math.isfinite(loss_fn().item())


# ------------------------------------------------------------------------- LoRA + entropy
def test_tiny_lora_qwen3_with_model_has_entropy_features(tiny_lora_qwen3, token_batch):
    model = tiny_lora_qwen3
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    sched = ReactorScheduler(
        opt,
        budget=BudgetClock(steps=20),
        model=model,
        seed=0,
        config=ReactorConfig(decision_interval=2),
    )
    assert sched.entropy_probe is not None
    for _ in range(6):
        out = model(**token_batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()  # loss captured from the forward
    state = dict(zip(STATE_FEATURES, sched.last_decision.state.tolist(), strict=True))
    assert 0.0 < state["entropy_mean"] <= 1.0
    assert state["entropy_std"] > 0.0
    assert state["loss_level"] != 0.0
    assert sched.updates == 1
    assert math.isfinite(sched.get_last_lr()[0])
    sched.remove()
    assert not sched.entropy_probe.active


# --------------------------------------------------------------------------------- resume
def _regression_setup(model_seed: int, sched_seed: int, controller_lr: float, guard: bool = False):
    torch.manual_seed(model_seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    xs = torch.randn(32, 4, generator=torch.Generator().manual_seed(9))

    def probe_loss():  # the guard's λ̂ batch
        return nn.functional.mse_loss(model(xs), torch.sin(xs.sum(1, keepdim=True)))

    sched = ReactorScheduler(
        opt,
        budget=BudgetClock(steps=60),
        config=ReactorConfig(decision_interval=5, controller_lr=controller_lr),
        seed=sched_seed,
        guard=guard,
        loss_fn=probe_loss if guard else None,
    )
    return model, opt, sched


def _train(model, opt, sched, steps):
    lrs = []
    for t in steps:
        g = torch.Generator().manual_seed(t)
        x = torch.randn(16, 4, generator=g)
        loss = nn.functional.mse_loss(model(x), torch.sin(x.sum(1, keepdim=True)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step(loss=loss)
        lrs.append(sched.get_last_lr()[0])
    return lrs


@pytest.mark.parametrize("save_at", [20, 23])
def test_resume_replays_the_exact_lr_trajectory(save_at):
    ref = _train(*_regression_setup(0, 5, 0.05), range(40))
    model, opt, sched = _regression_setup(0, 5, 0.05)
    first = _train(model, opt, sched, range(save_at))
    buf = io.BytesIO()
    torch.save(
        {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buf
    )
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2, opt2, sched2 = _regression_setup(1, 999, 0.5)  # other init, seed and controller_lr
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    assert sched2.get_last_lr()[0] == first[-1]
    rest = _train(model2, opt2, sched2, range(save_at, 40))
    assert first + rest == ref
    assert sched2.updates > sched.updates > 0
    assert len(set(ref)) > 5


def test_resume_with_the_guard_replays_the_exact_lr_trajectory():
    ref = _train(*_regression_setup(0, 5, 0.05, guard=True), range(40))
    model, opt, sched = _regression_setup(0, 5, 0.05, guard=True)
    first = _train(model, opt, sched, range(23))
    assert sched.curvature_probe.n_estimates >= 1  # the guard's λ̂ is part of the saved state
    buf = io.BytesIO()
    torch.save(
        {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buf
    )
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2, opt2, sched2 = _regression_setup(1, 999, 0.5, guard=True)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    assert first + _train(model2, opt2, sched2, range(23, 40)) == ref


def test_bad_checkpoint_changes_nothing():
    model, opt, sched = _regression_setup(0, 5, 0.05)
    _train(model, opt, sched, range(12))
    state = sched.state_dict()
    model2, opt2, other = _regression_setup(0, 6, 0.05)
    _train(model2, opt2, other, range(7))
    before = copy.deepcopy(other.state_dict())
    bad = copy.deepcopy(state)
    bad["extra"]["policy"]["hidden.weight"] = torch.zeros(3, 3, dtype=torch.float64)
    with pytest.raises(CheckpointError, match="policy that does not fit"):
        other.load_state_dict(bad)
    bad = copy.deepcopy(state)
    bad["extra"]["log_factor"] = math.nan
    with pytest.raises(CheckpointError, match=r"invalid entries.*log_factor"):
        other.load_state_dict(bad)
    after = other.state_dict()
    assert after["extra"]["seed"] == before["extra"]["seed"] == 6
    for k, v in before["extra"]["policy"].items():
        assert torch.equal(v, after["extra"]["policy"][k])


def test_checking_a_state_leaves_no_trace_on_the_scheduler():
    """Validation builds its test copies and drops them: no scratch attribute for the base to clean."""
    model, opt, sched = _regression_setup(0, 5, 0.05, guard=True)
    _train(model, opt, sched, range(12))
    state = sched.state_dict()
    _, _, other = _regression_setup(0, 6, 0.05, guard=True)
    before = dict(vars(other))
    other._check_extra_state(state["extra"])
    assert dict(vars(other)) == before
    other.load_state_dict(state)
    assert set(vars(other)) == set(before)


# ------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"controller_lr": 0.0}, GraffConfigError, "controller_lr must be > 0"),
        ({"controller_lr": math.nan}, GraffConfigError, "controller_lr must be finite"),
        ({"baseline_decay": 1.0}, GraffConfigError, r"baseline_decay must lie in \[0.0, 1.0\)"),
        ({"entropy_bonus": -0.1}, GraffConfigError, "entropy_bonus must be >= 0"),
        ({"decision_interval": 0}, GraffConfigError, "decision_interval must be a positive"),
        ({"decision_interval": 2.5}, GraffTypeError, "decision_interval must be a positive"),
        ({"max_log_step": 0.0}, GraffConfigError, "max_log_step must lie in"),
        ({"init_std": 5.0}, GraffConfigError, "init_std must lie in"),
        ({"reward_clip": -1.0}, GraffConfigError, "reward_clip must be > 0"),
        ({"hidden_size": 0}, GraffConfigError, "hidden_size must be a positive"),
        ({"seed": -1}, GraffConfigError, "seed must be a non-negative integer"),
        ({"seed": "0"}, GraffTypeError, "seed must be a non-negative integer"),
        ({"guard": "yes"}, GraffTypeError, "guard must be a bool"),
        ({"guard": True}, GraffConfigError, "guard=True needs"),
        ({"guard_c": 0.0}, GraffConfigError, "guard_c must be > 0"),
        (
            {"token_aware": True},
            GraffConfigError,
            r"ReactorConfig\(token_aware=True\) needs model=",
        ),
        ({"token_aware": 1}, GraffTypeError, "token_aware must be a bool or None"),
        ({"prior": "bogus"}, GraffConfigError, "prior must be one of"),
        ({"curvature_probe": "probe"}, GraffTypeError, "curvature_probe must be a CurvatureProbe"),
        ({"entropy_probe": 1}, GraffTypeError, "entropy_probe must be an EntropyProbe"),
        ({"loss_fn": 3}, GraffTypeError, "loss_fn must be a callable"),
        ({"lr_max_factor": 0.5}, GraffConfigError, "lr_min_factor <= 1 <= lr_max_factor"),
        ({"budget": "1h"}, GraffTypeError, r"budget must be a graff\.BudgetClock"),
    ],
)
def test_bad_arguments_raise(kwargs, error, match):
    """Scheduler arguments fail in the constructor, ReactorConfig fields in ReactorConfig."""
    _, opt = _dummy_opt()
    knobs = {k: v for k, v in kwargs.items() if k in ReactorConfig.__dataclass_fields__}
    kwargs = {"budget": BudgetClock(steps=10), **{k: kwargs[k] for k in kwargs.keys() - knobs}}
    with pytest.raises(error, match=match):
        ReactorScheduler(opt, **kwargs, config=ReactorConfig(**knobs))


@pytest.mark.parametrize("field", sorted(ReactorConfig.__dataclass_fields__))
def test_a_config_field_passed_to_the_scheduler_names_reactor_config(field):
    _, opt = _dummy_opt()
    value = getattr(ReactorConfig(), field)
    with pytest.raises(GraffTypeError, match=rf"{field}=.*graff\.ReactorConfig\({field}="):
        ReactorScheduler(opt, budget=BudgetClock(steps=10), **{field: value})


def test_unknown_argument_and_config_of_the_wrong_type_raise():
    _, opt = _dummy_opt()
    with pytest.raises(GraffTypeError, match="unexpected keyword argument 'warmup'"):
        ReactorScheduler(opt, budget=BudgetClock(steps=10), warmup=0.1)
    with pytest.raises(GraffTypeError, match=r"config must be a graff\.ReactorConfig"):
        ReactorScheduler(opt, budget=BudgetClock(steps=10), config={"decision_interval": 2})
    assert not opt._optimizer_step_pre_hooks  # nothing was registered


def test_config_is_frozen_and_normalised():
    config = ReactorConfig(init_std=1, decision_interval=4.0)
    assert (type(config.init_std), type(config.decision_interval)) == (float, int)
    with pytest.raises(AttributeError):
        config.controller_lr = 1.0


def test_bad_optimizer_and_non_lm_token_aware():
    with pytest.raises(GraffTypeError, match=r"optimizer must be a torch\.optim\.Optimizer"):
        ReactorScheduler("sgd", budget=10)
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ProbeError, match="found no decoder layers"):
        ReactorScheduler(opt, budget=10, model=model, config=ReactorConfig(token_aware=True))
    # a failed constructor leaves no hooks behind
    assert not opt._optimizer_step_pre_hooks
    assert not opt._optimizer_step_post_hooks
