"""GraffScheduler: contract, guard, calibration, learning, robustness, resume, warm start."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import make_tiny_lora, make_tiny_qwen3
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import graff
from graff.errors import CheckpointError, GraffConfigError
from graff.guard import guard_constant
from graff.planner.net import PlannerNet
from graff.schedulers.graff import GraffScheduler

OPTIMIZERS = {
    "SGD": lambda p: torch.optim.SGD(p, lr=0.05),
    "SGD-momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "Adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "AdamW": lambda p: torch.optim.AdamW(p, lr=1e-2),
    "RMSprop": lambda p: torch.optim.RMSprop(p, lr=1e-3),
    "Adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-2),
}


def _regression(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 8, generator=g)
    y = x @ torch.randn(8, 1, generator=g) + 0.1 * torch.randn(64, 1, generator=g)
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1)), x, y


def _train(
    sched: GraffScheduler, model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int
) -> list[float]:
    lrs = []
    opt = sched.optimizer
    for i in range(steps):
        idx = torch.arange(i * 8, i * 8 + 8) % x.shape[0]
        loss = (model(x[idx]) - y[idx]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step(loss)
        lrs.append(sched.get_last_lr()[0])
    return lrs


# ------------------------------------------------------------------ contract
def test_is_a_torch_lr_scheduler_and_writes_prior_shaped_lrs() -> None:
    model, x, y = _regression()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = GraffScheduler(opt, budget=graff.BudgetClock(steps=40))
    assert isinstance(sched, torch.optim.lr_scheduler.LRScheduler)
    first = sched.get_last_lr()[0]
    assert first == pytest.approx(1e-2 * sched.prior(0.0))  # warm-up start of the prior
    lrs = _train(sched, model, x, y, 40)
    assert sched.budget.exhausted
    assert sched.last_epoch == 40
    assert all(math.isfinite(lr) and lr > 0 for lr in lrs)
    assert lrs[-1] < max(lrs) / 5  # the budget prior anneals by the deadline


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_any_optimizer_groups_keep_their_ratios(name: str) -> None:
    model, x, y = _regression()
    first, second = list(model[0].parameters()), list(model[2].parameters())
    opt = OPTIMIZERS[name]([{"params": first}, {"params": second}])
    opt.param_groups[1]["lr"] *= 0.25
    sched = GraffScheduler(opt, budget=graff.BudgetClock(steps=30))
    for _ in range(3):
        _train(sched, model, x, y, 10)
        lr0, lr1 = sched.get_last_lr()
        assert lr1 / lr0 == pytest.approx(0.25, rel=1e-6)


def test_budget_accepts_seconds_and_rejects_junk() -> None:
    model, *_ = _regression()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert GraffScheduler(opt, budget=60).budget.total == 60.0
    with pytest.raises(TypeError, match="optimizer"):
        GraffScheduler("AdamW", budget=60)
    with pytest.raises(TypeError, match="budget"):
        GraffScheduler(opt, budget="an hour")
    with pytest.raises(ValueError, match="planner_lr"):
        GraffScheduler(opt, budget=60, config=graff.GraffConfig(planner_lr=-1.0))
    with pytest.raises(ValueError, match="prior"):
        GraffScheduler(opt, budget=60, prior="exponential")
    with pytest.raises(ValueError, match="multiplier_max"):
        GraffScheduler(opt, budget=60, config=graff.GraffConfig(multiplier_max=0.5))
    zero = torch.optim.SGD(model.parameters(), lr=0.0)
    with pytest.raises(ValueError, match="lr"):
        GraffScheduler(zero, budget=60)


def test_step_without_optimizer_step_is_not_counted() -> None:
    model, x, y = _regression()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = GraffScheduler(opt, budget=graff.BudgetClock(steps=10))
    _train(sched, model, x, y, 2)
    before = (sched.budget.steps, sched.get_last_lr(), sched.runtime.updates)
    sched.step(torch.tensor(1.0))  # as when GradScaler skipped optimizer.step()
    assert sched.skipped_steps == 1
    assert (sched.budget.steps, sched.get_last_lr(), sched.runtime.updates) == before


# -------------------------------------------------------------------- guard
def test_guard_keeps_sgd_stable_on_a_quadratic_where_the_user_lr_diverges() -> None:
    """Closed form: λ_max = 50, the user's LR 5/λ_max diverges; GRAFF's guard keeps η·λ ≤ 1.9."""
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(20, 20))
    eig = torch.linspace(1.0, 50.0, 20)
    a = q @ torch.diag(eig) @ q.T
    theta = nn.Parameter(torch.randn(20))

    def loss_fn() -> torch.Tensor:
        return 0.5 * theta @ a @ theta

    opt = torch.optim.SGD([theta], lr=5.0 / 50.0)
    sched = GraffScheduler(
        opt,
        budget=graff.BudgetClock(steps=200),
        loss_fn=loss_fn,
        prior=graff.BudgetPrior("constant", warmup=0.0),
        config=graff.GraffConfig(curvature_every=5, peak_search=False, block_multipliers=False),
    )
    losses = []
    for _ in range(200):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step(loss)
        losses.append(float(loss.detach()))
        lam = float(eig.max())
        assert (
            sched.get_last_lr()[0] * lam <= guard_constant(opt) * 1.0 + 1e-9
            or sched.last_epoch == 0
        )
    assert sched.guard_activations > 0
    assert losses[-1] < 1e-3 * losses[0]


def test_guard_projection_makes_the_decoder_feasible() -> None:
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(10, 10))
    a = q @ torch.diag(torch.linspace(1.0, 100.0, 10)) @ q.T
    theta = nn.Parameter(torch.randn(10))
    opt = torch.optim.SGD([theta], lr=0.01)
    sched = GraffScheduler(
        opt,
        budget=graff.BudgetClock(steps=30),
        loss_fn=lambda: 0.5 * theta @ a @ theta,
        prior=graff.BudgetPrior("constant", warmup=0.0),
        config=graff.GraffConfig(
            planner=True, curvature_every=1, peak_search=False, block_multipliers=False
        ),
    )
    with torch.no_grad():
        sched.planner.lr_b.fill_(3.0)  # a decoder that asks for e^3 = 20x the LR
    for _ in range(5):
        loss = 0.5 * theta @ a @ theta
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step(loss)
    plan = sched.last_plan
    assert sched.runtime.projections > 0
    h_bar = sched.runtime.h.mean(0)
    decoded = float((sched.planner.lr_w @ h_bar + sched.planner.lr_b).detach())
    # after projection the decoder's own output respects the bound for the state it was projected at
    assert plan.guard_bound is not None
    assert (
        math.log(plan.prior) + plan.log_peak + min(decoded, math.log(2.0)) <= plan.guard_bound + 0.5
    )


# -------------------------------------------------------------- calibration
def test_peak_search_raises_a_too_small_lr_and_stops() -> None:
    model, x, y = _regression()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)  # 100x too small for this problem
    sched = GraffScheduler(
        opt, budget=graff.BudgetClock(steps=200), config=graff.GraffConfig(online=False)
    )
    _train(sched, model, x, y, 60)
    assert sched.peak_search.log_peak > math.log(3.0)
    assert not sched.peak_search.searching


def test_peak_search_backs_off_when_the_loss_blows_up() -> None:
    cal = graff.planner.peak_search.PeakSearch(
        enabled=True, search_fraction=0.5, peak_max=10.0, backoff=3.0
    )
    for i in range(1, 6):
        cal.update(i / 100, 0.0, unstable=False)
    assert cal.log_peak > 0
    assert cal.update(0.06, math.log(0.5), unstable=True)
    assert cal.log_peak == 0.0  # a raise that ended in instability returns to the best level
    assert not cal.searching
    for i in range(7, 26):  # the cool-down: 20 steps without a second back-off
        assert not cal.update(i / 100, 0.0, unstable=True)
    assert cal.update(0.26, math.log(0.5), unstable=True)  # still unstable at the user's LR
    assert cal.log_peak == pytest.approx(math.log(0.5) - math.log(3.0))


def test_calibrate_false_is_the_prior_alone() -> None:
    model, x, y = _regression()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sched = GraffScheduler(
        opt,
        budget=graff.BudgetClock(steps=50),
        guard=False,
        warm_start=None,
        config=graff.GraffConfig(online=False, peak_search=False, block_multipliers=False),
    )
    lrs = _train(sched, model, x, y, 50)
    expected = [0.05 * max(sched.prior(k / 50), 1e-3) for k in range(1, 51)]
    assert lrs == pytest.approx(expected, rel=1e-9)


# ----------------------------------------------------------------- learning
def test_online_update_through_the_kept_graph_equals_re_running_the_encoder() -> None:
    # The online update backpropagates through the planning forward pass it keeps; re-running
    # the encoder (what a resumed run does, and what happens after an edit of the weights) must
    # give bit-identical planner weights and LRs.
    runs = []
    for forget in (False, True):
        model, x, y = _regression()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        sched = GraffScheduler(
            opt,
            budget=graff.BudgetClock(steps=40),
            seed=1,
            config=graff.GraffConfig(planner=True, plan_every=3, probe_every=1),
        )
        if forget:
            original = sched.runtime._learn

            def learn(stats, _original=original, _sched=sched):
                _sched.runtime._pending_graph = None  # force the re-run
                return _original(stats)

            sched.runtime._learn = learn
        lrs = _train(sched, model, x, y, 40)
        runs.append((lrs, [p.detach().clone() for p in sched.planner.parameters()], sched))
    (lrs_kept, w_kept, kept), (lrs_rerun, w_rerun, _) = runs
    assert kept.runtime.updates >= 10
    assert lrs_kept == lrs_rerun
    assert all(torch.equal(a, b) for a, b in zip(w_kept, w_rerun, strict=True))


def test_deep_copying_does_not_fail_on_or_disturb_the_kept_graph() -> None:
    # An autograd graph cannot be deep-copied: copies (and pickles) drop the kept planning graph
    # instead of raising, and copying leaves the original's run unchanged. (Checkpoints use
    # state_dict(), which never held the graph.)
    runs = []
    for copy_it in (False, True):
        model, x, y = _regression()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        sched = GraffScheduler(
            opt,
            budget=graff.BudgetClock(steps=30),
            config=graff.GraffConfig(planner=True, plan_every=2, probe_every=1),
        )
        _train(sched, model, x, y, 5)
        assert sched.runtime._pending_graph is not None
        if copy_it:
            twin = copy.deepcopy(sched)
            assert twin.runtime._pending_graph is None
            assert sched.runtime._pending_graph is not None
        runs.append(_train(sched, model, x, y, 6))
    assert runs[0] == runs[1]


def test_an_edit_of_the_encoder_weights_drops_the_kept_graph() -> None:
    model, x, y = _regression()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = GraffScheduler(
        opt,
        budget=graff.BudgetClock(steps=20),
        config=graff.GraffConfig(planner=True, plan_every=2, probe_every=1),
    )
    _train(sched, model, x, y, 5)
    assert sched.runtime._pending_graph is not None
    with torch.no_grad():
        sched.planner.encode.weight.mul_(0.5)  # e.g. a user loading other weights in place
    _train(sched, model, x, y, 5)  # no "modified by an inplace operation" error from autograd
    assert sched.runtime.updates > 0
    assert all(torch.isfinite(p).all() for p in sched.planner.parameters())


def test_online_learning_updates_the_planner_and_frozen_does_not() -> None:
    model, x, y = _regression()
    for online in (True, False):
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        sched = GraffScheduler(
            opt,
            budget=graff.BudgetClock(steps=30),
            config=graff.GraffConfig(planner=True, online=online),
        )
        before = [p.detach().clone() for p in sched.planner.parameters()]
        _train(sched, model, x, y, 30)
        changed = any(
            not torch.equal(a, b) for a, b in zip(before, sched.planner.parameters(), strict=True)
        )
        assert changed is online
        assert (sched.runtime.updates > 0) is online


def test_block_multipliers_rescale_the_applied_update() -> None:
    model, x, y = _regression()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sched = GraffScheduler(
        opt,
        budget=graff.BudgetClock(steps=20),
        guard=False,
        config=graff.GraffConfig(planner=True, peak_search=False, block_multipliers=True),
    )
    _train(sched, model, x, y, 3)
    sched.runtime.multipliers = torch.full((len(sched.blocks),), 2.0)
    snapshot = [p.detach().clone() for p in model.parameters()]
    loss = (model(x[:8]) - y[:8]).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    lr = opt.param_groups[0]["lr"]
    opt.step()
    sched.step(loss)
    for p, p0, g in zip(model.parameters(), snapshot, grads, strict=True):
        torch.testing.assert_close(p.detach(), p0 - 2.0 * lr * g)


# --------------------------------------------------------------- robustness
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_losses_never_reach_the_planner(bad: float) -> None:
    model, x, y = _regression()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = GraffScheduler(opt, budget=graff.BudgetClock(steps=40))
    _train(sched, model, x, y, 10)
    for _ in range(5):
        loss = (model(x[:8]) - y[:8]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step(torch.tensor(bad))
    assert sched.nonfinite_losses == 5
    assert all(torch.isfinite(p).all() for p in sched.planner.parameters())
    assert torch.isfinite(sched.runtime.h).all()
    assert all(math.isfinite(lr) and lr > 0 for lr in sched.get_last_lr())


def test_nan_gradients_do_not_poison_the_planner() -> None:
    model, x, y = _regression()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sched = GraffScheduler(opt, budget=graff.BudgetClock(steps=20))
    _train(sched, model, x, y, 5)
    for p in model.parameters():
        p.grad = torch.full_like(p, math.nan)
    with torch.no_grad():
        saved = [p.clone() for p in model.parameters()]
    opt.step()  # the user's optimizer takes a NaN step: params become NaN
    sched.step(torch.tensor(1.0))
    with torch.no_grad():
        for p, s in zip(model.parameters(), saved, strict=True):
            p.copy_(s)
    _train(sched, model, x, y, 5)
    assert all(torch.isfinite(p).all() for p in sched.planner.parameters())
    assert all(math.isfinite(lr) and lr > 0 for lr in sched.get_last_lr())


# -------------------------------------------------------------------- state
def _lora_run(steps: int, *, resume_at: int | None = None, tmp_path=None) -> list[float]:
    model = make_tiny_lora(make_tiny_qwen3(seed=0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    sched = GraffScheduler(
        opt,
        budget=graff.BudgetClock(steps=steps),
        model=model,
        config=graff.GraffConfig(curvature_every=4),
    )
    g = torch.Generator().manual_seed(3)
    batches = [torch.randint(0, 96, (2, 12), generator=g) for _ in range(steps)]
    lrs = []
    for i, ids in enumerate(batches):
        if resume_at is not None and i == resume_at:
            path = tmp_path / "ckpt.pt"
            torch.save(
                {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()},
                path,
            )
            state = torch.load(path, weights_only=True)
            model = make_tiny_lora(make_tiny_qwen3(seed=0))
            model.load_state_dict(state["model"])
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
            opt.load_state_dict(state["opt"])
            sched = GraffScheduler(
                opt,
                budget=graff.BudgetClock(steps=steps),
                model=model,
                config=graff.GraffConfig(curvature_every=4, planner_lr=5e-3),
            )
            sched.load_state_dict(state["sched"])
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        sched.step()  # loss captured from the model's forward
        opt.zero_grad()
        lrs.append(sched.get_last_lr()[0])
    return lrs


def test_resume_reproduces_the_uninterrupted_lr_trajectory(tmp_path) -> None:
    straight = _lora_run(16)
    resumed = _lora_run(16, resume_at=8, tmp_path=tmp_path)
    assert resumed == pytest.approx(straight, rel=1e-6)


def test_lora_end_to_end_uses_blocks_edges_and_probes(tiny_lora_qwen3, token_batch) -> None:
    model = tiny_lora_qwen3
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    sched = GraffScheduler(
        opt,
        budget=graff.BudgetClock(steps=12),
        model=model,
        config=graff.GraffConfig(planner=True, curvature_every=2),
    )
    assert len(sched.blocks) == 12
    assert sched.edge_index.shape[1] > 0
    for _ in range(12):
        loss = model(**token_batch).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    assert sched.entropy_probe is not None
    assert sched.entropy_probe.calls == 12  # every forward observed
    # calls 0, k, 2k, ... are decoded; each decoded pass is averaged once
    assert sched.entropies.tracker.count == math.ceil(12 / sched.config.probe_interval)
    assert sched.curvature.start_step == 10  # AdamW: no estimate before the preconditioner settles
    assert sched.curvature.lambda_max is not None
    assert sched.peak_search.losses.count == 12
    sched.remove()
    assert not model._forward_hooks


def test_load_rejects_mismatched_states() -> None:
    model, x, y = _regression()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = GraffScheduler(opt, budget=graff.BudgetClock(steps=10))
    _train(sched, model, x, y, 3)
    state = sched.state_dict()
    other = GraffScheduler(
        torch.optim.Adam(
            [{"params": model[0].parameters()}, {"params": model[2].parameters()}], lr=1e-2
        ),
        budget=graff.BudgetClock(steps=10),
    )
    with pytest.raises(CheckpointError, match="parameter groups"):
        other.load_state_dict(state)
    bad = dict(state, format_version=99)
    with pytest.raises(CheckpointError, match="format_version"):
        sched.load_state_dict(bad)
    bad = dict(state, scheduler="ReactorScheduler")
    with pytest.raises(CheckpointError, match="ReactorScheduler"):
        sched.load_state_dict(bad)
    lr_before = sched.get_last_lr()
    broken = dict(state, extra=dict(state["extra"], num_blocks=99))
    with pytest.raises(CheckpointError, match="blocks"):
        sched.load_state_dict(broken)
    assert sched.get_last_lr() == lr_before  # nothing half-loaded


# --------------------------------------------------------------- warm start
def test_warm_start_transfers_to_a_model_with_other_blocks(tmp_path) -> None:
    model, x, y = _regression()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = GraffScheduler(opt, budget=graff.BudgetClock(steps=20))
    _train(sched, model, x, y, 20)
    path = sched.save_planner(tmp_path / "planner.safetensors")
    lora = make_tiny_lora(make_tiny_qwen3())
    opt2 = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-3)
    warm = GraffScheduler(
        opt2,
        budget=graff.BudgetClock(steps=5),
        model=lora,
        warm_start=path,
        config=graff.GraffConfig(planner=True),
    )
    for a, b in zip(sched.planner.parameters(), warm.planner.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    assert warm.runtime.h.shape == (12, sched.planner.hidden)


ON = graff.GraffConfig(planner=True)  # a planner file is read only with the planner on


def test_warm_start_rejects_files_that_are_not_planners(tmp_path) -> None:
    model, *_ = _regression()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"definitely not a planner")
    with pytest.raises(CheckpointError, match="not a graff planner"):
        GraffScheduler(opt, budget=10, warm_start=junk, config=ON)
    with pytest.raises(CheckpointError, match="does not exist"):
        GraffScheduler(opt, budget=10, warm_start=tmp_path / "missing.safetensors", config=ON)
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(3)}, str(other), metadata={"format": "something-else"})
    with pytest.raises(CheckpointError, match="not a graff planner"):
        GraffScheduler(opt, budget=10, warm_start=other, config=ON)


def test_planner_is_independent_of_the_number_of_blocks() -> None:
    net = PlannerNet()
    for n in (1, 5, 40):
        h = net(torch.randn(n, net.num_features), net.initial_state(n), torch.eye(n))
        r, logits = net.decode(h)
        assert h.shape == (n, net.hidden)
        assert r.shape == ()
        assert logits.shape == (n,)


def test_no_edges_ablation_ignores_the_graph() -> None:
    torch.manual_seed(0)
    net = PlannerNet(edges=False)
    x, h = torch.randn(4, net.num_features), torch.randn(4, net.hidden)
    a = torch.ones(4, 4) / 4
    torch.testing.assert_close(net(x, h, a), net(x, h, torch.zeros(4, 4)))
    with pytest.raises(GraffConfigError):
        GraffScheduler(
            torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1),
            budget=10,
            config=graff.GraffConfig(backoff=0.5),
        )


def test_model_without_loss_output_degrades_to_the_secant_guard(
    tiny_lora_qwen3, token_batch
) -> None:
    model = tiny_lora_qwen3
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    sched = GraffScheduler(opt, budget=graff.BudgetClock(steps=14), model=model)
    ids = token_batch["input_ids"]

    def train() -> None:
        for _ in range(14):
            logits = model(input_ids=ids).logits  # the user computes the loss outside the model
            loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
            loss.backward()
            opt.step()
            sched.step(loss)
            opt.zero_grad()

    with pytest.warns(RuntimeWarning, match=r"holds no loss"):
        train()
    assert not sched.curvature.hvp
    assert sched.curvature.lambda_max is None
    assert all(math.isfinite(lr) and lr > 0 for lr in sched.get_last_lr())


@settings(max_examples=25, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.floats(allow_nan=True, allow_infinity=True),
            st.sampled_from([0.0, -1.0, 1e308, -1e308, 1e-308]),
        ),
        min_size=1,
        max_size=30,
    )
)
def test_hostile_loss_streams_keep_the_lr_finite_and_clamped(losses: list[float]) -> None:
    theta = nn.Parameter(torch.ones(4))
    opt = torch.optim.Adam([theta], lr=1e-2)
    sched = GraffScheduler(
        opt, budget=graff.BudgetClock(steps=20), config=graff.GraffConfig(plan_every=2)
    )
    for value in losses:
        opt.zero_grad()
        (theta**2).sum().backward()
        opt.step()
        sched.step(value)
        lr = sched.get_last_lr()[0]
        assert math.isfinite(lr)
        assert 1e-2 * sched.lr_min_factor <= lr <= 1e-2 * sched.lr_max_factor
    assert all(torch.isfinite(p).all() for p in sched.planner.parameters())
    assert torch.isfinite(sched.runtime.h).all()


class _DictLossModel(nn.Module):
    """A regression model whose forward returns ``{"loss": ...}`` (HF style)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": ((self.lin(x) - y) ** 2).mean()}


def test_the_forward_hook_keeps_no_loss_while_step_is_given_one() -> None:
    torch.manual_seed(0)
    model = _DictLossModel()
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sched = GraffScheduler(
        opt,
        budget=graff.BudgetClock(steps=20),
        model=model,
        guard=False,
        config=graff.GraffConfig(entropy=False),
    )

    def one(explicit: bool) -> None:
        out = model(x, y)
        out["loss"].backward()
        opt.step()
        opt.zero_grad()
        sched.step(out["loss"]) if explicit else sched.step()

    one(explicit=False)
    one(explicit=False)
    assert sched.peak_search.losses.count == 2  # captured from the forward pass
    one(explicit=True)  # from now on the hook keeps nothing ...
    model(x, y)
    assert sched._captured_sum is None
    one(explicit=True)
    assert sched.peak_search.losses.count == 4  # ... and the passed losses are used
    one(explicit=False)  # a switch back: this step's forward ran while the hook kept nothing
    assert sched.peak_search.losses.count == 4
    one(explicit=False)  # the hook captures again
    assert sched.peak_search.losses.count == 5
    one(explicit=True)
    sched.step(None)  # a skipped step (no optimizer step) with no loss turns capture back on
    model(x, y)
    assert sched._captured_sum is not None


@pytest.mark.parametrize("kind", ["seconds", "steps"])
def test_step_reports_its_own_time_to_the_shared_overhead_target(monkeypatch, kind) -> None:
    """Measured and reported under any budget; it sets the ``auto`` λ̂ interval's share only
    under a wall-clock budget (under a step budget no timing decides anything)."""
    import time

    from graff.probes.curvature import MIN_ESTIMATE_SHARE

    now = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    model, x, y = _regression()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    budget = (
        graff.BudgetClock(seconds=1000, time_fn=lambda: now[0])
        if kind == "seconds"
        else graff.BudgetClock(steps=30)
    )
    sched = GraffScheduler(opt, budget=budget, guard=False)
    plan = sched._plan

    def slow_plan(loss):  # the planner "takes" 3 ms of a 1 s step
        now[0] += 0.003
        return plan(loss)

    sched._plan = slow_plan
    for i in range(20):
        idx = torch.arange(i * 8, i * 8 + 8) % x.shape[0]
        loss = (model(x[idx]) - y[idx]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        now[0] += 1.0
        opt.step()
        sched.step(loss)
    probe = sched.curvature
    assert probe.share_step_costs
    assert probe.cost_model == kind
    assert probe.step_cost_seconds == pytest.approx(0.003)
    assert probe._step_time == pytest.approx(1.003)
    if kind == "seconds":
        assert probe.estimator.estimate_share() == pytest.approx(0.01 - 0.003 / 1.003)
    else:
        assert probe.estimator.estimate_share() == MIN_ESTIMATE_SHARE * 0.01
    # the user-facing account: 20 steps x 3 ms of per-step work, no λ̂ estimate (guard off)
    assert sched.overhead_seconds() == pytest.approx({"per_step": 0.06, "lambda_max": 0.0})


def test_overhead_seconds_splits_per_step_work_from_the_lambda_estimates() -> None:
    model, x, y = _regression()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    sched = GraffScheduler(
        opt, budget=graff.BudgetClock(steps=30), loss_fn=lambda: (model(x) - y).pow(2).mean()
    )
    _train(sched, model, x, y, 12)
    spent = sched.overhead_seconds()
    probe = sched.curvature
    assert probe.n_estimates >= 1
    assert spent["lambda_max"] > 0
    assert spent["per_step"] > 0
    assert spent["lambda_max"] == pytest.approx(probe.estimate_seconds)
    # the probe's own total is its hooks plus its estimates
    assert probe.overhead_seconds == pytest.approx(probe.hook_seconds + probe.estimate_seconds)


def _learn_every_run(learn_every: int, steps: int = 60, resume_at: int | None = None):
    """AdamW on the regression under a step budget; optionally a state_dict round trip."""
    model, x, y = _regression(seed=2)

    def build(m: nn.Module) -> GraffScheduler:
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        return GraffScheduler(
            opt,
            budget=graff.BudgetClock(steps=steps),
            guard=False,
            config=graff.GraffConfig(planner=True, learn_every=learn_every),
        )

    sched = build(model)
    lrs = []
    for i in range(steps):
        if i == resume_at:
            state = copy.deepcopy(
                {"model": model.state_dict(), "opt": sched.optimizer.state_dict()}
            )
            sched_state = copy.deepcopy(sched.state_dict())
            sched.remove()
            model, _, _ = _regression(seed=2)
            model.load_state_dict(state["model"])
            sched = build(model)
            sched.optimizer.load_state_dict(state["opt"])
            sched.load_state_dict(sched_state)
        lrs += _train_from(sched, model, x, y, i)
    return lrs, sched


def _train_from(sched: GraffScheduler, model, x, y, i: int) -> list[float]:
    idx = torch.arange(i * 8, i * 8 + 8) % x.shape[0]
    loss = (model(x[idx]) - y[idx]).pow(2).mean()
    sched.optimizer.zero_grad()
    loss.backward()
    sched.optimizer.step()
    sched.step(loss)
    return [sched.get_last_lr()[0]]


def test_learn_every_updates_the_planner_at_every_kth_plan_only() -> None:
    # 6 plans in 60 steps (steps 1, 11, ..., 51); plan k learns from window k-1 when k-1 is a
    # multiple of learn_every: plans 2-6 (the first has no feedback yet), 3 and 5, or 4
    for learn_every, updates in ((1, 5), (2, 2), (3, 1)):
        lrs, sched = _learn_every_run(learn_every)
        assert sched.runtime.updates + sched.runtime.skipped_updates == updates, learn_every
        assert sched.runtime.plans == 6
    assert all(math.isfinite(lr) and lr > 0 for lr in lrs)
    with pytest.raises(GraffConfigError, match="learn_every"):
        GraffScheduler(
            torch.optim.SGD(_regression()[0].parameters(), lr=0.1),
            10,
            config=graff.GraffConfig(planner=True, learn_every=0),
        )


@pytest.mark.parametrize("resume_at", [15, 25, 31])
def test_learn_every_resumes_on_the_same_trajectory(resume_at: int) -> None:
    straight, a = _learn_every_run(2)
    resumed, b = _learn_every_run(2, resume_at=resume_at)
    assert resumed == straight
    for pa, pb in zip(a.planner.parameters(), b.planner.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert a.runtime.plans == b.runtime.plans == 6
