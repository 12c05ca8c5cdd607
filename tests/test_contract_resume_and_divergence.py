"""Drop-in contract: resume under torch's SequentialLR, divergence without λ̂, warnings that help.

1. ``SequentialLR([warm-up, graff scheduler])``: a checkpoint taken before the milestone (the
   graff scheduler not started, ``last_epoch == -1``) or after it resumes to the uninterrupted
   LR trajectory, for the three graff schedulers and torch's CosineAnnealingLR as the control.
2. Without ``model=``/``loss_fn=`` (no λ̂), a loss that explodes is cut every step it keeps
   growing, and a healthy run is left alone.
3. graff's warnings name arguments that exist, point at the user's line, and can be filtered
   by category (:class:`graff.errors.GraffWarning`).
"""

from __future__ import annotations

import inspect
import io
import math
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

import graff
from graff.errors import CheckpointError

MILESTONE = 6
STEPS = 20


class _LossModel(nn.Module):
    """A tiny regression model whose forward returns ``{"loss": ...}`` (as HF models do)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": (self.net(x) - y).pow(2).mean()}


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(8, 4, generator=g)
    return x, x.sum(1, keepdim=True).sin()


SECOND: dict[str, Callable[[torch.optim.Optimizer, nn.Module], Any]] = {
    "GraffScheduler": lambda opt, model: graff.GraffScheduler(
        opt,
        budget=graff.BudgetClock(steps=STEPS),
        model=model,
        config=graff.GraffConfig(plan_every=2, probe_every=2),
    ),
    "ReactorScheduler": lambda opt, model: graff.ReactorScheduler(
        opt,
        budget=graff.BudgetClock(steps=STEPS),
        model=model,
        seed=0,
        config=graff.ReactorConfig(decision_interval=3),
    ),
    "BudgetScheduler": lambda opt, model: graff.BudgetScheduler(
        opt, budget=graff.BudgetClock(steps=STEPS)
    ),
    "CosineAnnealingLR": lambda opt, model: CosineAnnealingLR(opt, T_max=STEPS),
}


def _build(name: str) -> tuple[nn.Module, torch.optim.Optimizer, SequentialLR]:
    torch.manual_seed(0)
    model = _LossModel()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    warm = LinearLR(opt, start_factor=0.1, total_iters=MILESTONE)
    second = SECOND[name](opt, model)
    return model, opt, SequentialLR(opt, [warm, second], milestones=[MILESTONE])


def _steps(model, opt, seq, start: int, stop: int) -> list[float]:
    lrs = []
    for i in range(start, stop):
        loss = model(*_batch(i))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        seq.step()
        lrs.append(opt.param_groups[0]["lr"])
    return lrs


def _round_trip(obj: Any) -> Any:
    """Through bytes with ``weights_only=True``, as Trainer's checkpoints are."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.fixture
def _quiet_torch():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*", category=UserWarning)
        warnings.filterwarnings("ignore", category=graff.errors.GraffWarning)
        warnings.filterwarnings("ignore", message=".*entropy probe.*")
        yield


@pytest.mark.usefixtures("one_torch_thread", "_quiet_torch")
@pytest.mark.parametrize("name", sorted(SECOND))
@pytest.mark.parametrize("save_at", [MILESTONE - 2, MILESTONE, MILESTONE + 3])
def test_sequential_lr_resume_before_and_after_the_milestone_is_exact(
    name: str, save_at: int
) -> None:
    model, opt, seq = _build(name)
    straight = _steps(model, opt, seq, 0, STEPS)
    straight_params = [p.detach().clone() for p in model.parameters()]

    model, opt, seq = _build(name)
    head = _steps(model, opt, seq, 0, save_at)
    saved = _round_trip(
        {"model": model.state_dict(), "opt": opt.state_dict(), "sched": seq.state_dict()}
    )
    model, opt, seq = _build(name)  # a fresh process: new model, optimizer and schedulers
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    seq.load_state_dict(saved["sched"])
    tail = _steps(model, opt, seq, save_at, STEPS)
    assert head + tail == straight
    for p, q in zip(model.parameters(), straight_params, strict=True):
        assert torch.equal(p.detach(), q)


@pytest.mark.usefixtures("_quiet_torch")
@pytest.mark.parametrize("name", ["GraffScheduler", "ReactorScheduler", "BudgetScheduler"])
def test_graff_scheduler_under_sequential_lr_starts_at_the_milestone(name: str) -> None:
    """Before the milestone the warm-up alone sets the LR and the graff scheduler counts no
    step; at the milestone it starts from its own initial LR, like a torch scheduler."""
    model, opt, seq = _build(name)
    second = seq._schedulers[1]
    initial_lr = second.get_last_lr()[0]  # graff's first LR, written at construction
    lrs = _steps(model, opt, seq, 0, MILESTONE - 1)
    assert lrs == pytest.approx([1e-2 * (0.1 + 0.9 * (i + 1) / MILESTONE) for i in range(5)])
    assert second.last_epoch == -1
    assert second.budget.steps == 0
    state = second.state_dict()
    assert state["last_epoch"] == -1
    lrs = _steps(model, opt, seq, MILESTONE - 1, MILESTONE)  # the milestone step
    assert lrs == [initial_lr]
    assert second.last_epoch == 0
    assert second.budget.steps == 0
    _steps(model, opt, seq, MILESTONE, MILESTONE + 4)
    assert second.last_epoch == 4
    assert second.budget.steps == 4


class _SequentialLR22(SequentialLR):
    """SequentialLR as torch 2.2 had it: the milestone calls ``scheduler.step(0)`` (an epoch)."""

    def step(self) -> None:  # type: ignore[override]
        self.last_epoch += 1
        idx = sum(m <= self.last_epoch for m in self._milestones)
        scheduler = self._schedulers[idx]
        if idx > 0 and self._milestones[idx - 1] == self.last_epoch:
            scheduler.step(0)
        else:
            scheduler.step()
        self._last_lr = scheduler.get_last_lr()


@pytest.mark.usefixtures("_quiet_torch")
def test_the_epoch_that_old_sequential_lr_passes_is_not_read_as_a_loss() -> None:
    """torch < 2.4's SequentialLR calls ``scheduler.step(0)`` at the milestone: an epoch. graff's
    ``step(loss)`` must not record a loss of 0 (it would look like a perfect step and make
    every later loss look like a divergence); it starts the schedule, as torch 2.13 does."""
    runs = []
    for cls in (SequentialLR, _SequentialLR22):
        torch.manual_seed(0)
        model = _LossModel()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        warm = LinearLR(opt, start_factor=0.1, total_iters=MILESTONE)
        sched = graff.GraffScheduler(opt, budget=graff.BudgetClock(steps=STEPS), model=model)
        seq = cls(opt, [warm, sched], milestones=[MILESTONE])
        lrs = _steps(model, opt, seq, 0, STEPS)
        runs.append(
            (lrs, sched.peak_search.losses.count, sched.peak_search.losses.best, sched.last_epoch)
        )
    assert runs[1] == runs[0]
    assert runs[0][1] == STEPS - MILESTONE  # one loss per graff step, none from the epoch


def test_a_real_loss_of_zero_is_still_a_loss() -> None:
    p = nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=0.1)
    sched = graff.GraffScheduler(opt, budget=graff.BudgetClock(steps=10))
    for _ in range(6):
        opt.zero_grad()
        p.sum().backward()
        opt.step()
        sched.step(0)
    assert sched.peak_search.losses.count == 6


@pytest.mark.parametrize("name", ["GraffScheduler", "ReactorScheduler", "BudgetScheduler"])
@pytest.mark.parametrize(
    "last_epoch", [-2, -1.0, 1.5, True, 2**70, "-1", None], ids=lambda v: repr(v)
)
def test_not_started_is_accepted_but_bad_counters_are_still_rejected(
    name: str, last_epoch: Any
) -> None:
    seq = _build(name)[2]
    state = seq._schedulers[1].state_dict()
    assert state["last_epoch"] == -1
    fresh = _build(name)[2]._schedulers[1]
    fresh.load_state_dict(state)  # "not started yet" loads
    assert fresh.last_epoch == -1
    bad = dict(state, last_epoch=last_epoch)
    with pytest.raises(CheckpointError, match="last_epoch"):
        fresh.load_state_dict(bad)
    started = dict(state, step_count=3)  # -1 only ever comes with no step taken
    with pytest.raises(CheckpointError, match="last_epoch"):
        fresh.load_state_dict(started)


# ------------------------------------------------------------ 2. divergence without λ̂
LAMBDAS = torch.linspace(1.0, 100.0, 20)  # f(x) = ½ Σ λ_i x_i², λ_max = 100

DIVERGING: dict[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]] = {
    "SGD": lambda p: torch.optim.SGD(p, lr=0.05),  # η·λ_max = 5 > 2
    "SGD-momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),  # > 2(1 + β)
    "Adam": lambda p: torch.optim.Adam(p, lr=100.0),
    "AdamW": lambda p: torch.optim.AdamW(p, lr=100.0),
}


def _quadratic_run(
    make_opt: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
    seed: int,
    steps: int = 400,
    **kwargs: Any,
) -> tuple[list[float], list[float], graff.GraffScheduler, nn.Parameter, list[int], list[int]]:
    x = nn.Parameter(torch.randn(20, generator=torch.Generator().manual_seed(seed)))
    opt = make_opt([x])
    sched = graff.GraffScheduler(opt, budget=graff.BudgetClock(steps=steps), **kwargs)
    losses, lrs, cuts, answers = [], [], [], []
    for _ in range(steps):
        opt.zero_grad()
        loss = 0.5 * (LAMBDAS * x * x).sum()
        loss.backward()
        opt.step()
        sched.step(loss.detach())
        losses.append(float(loss.detach()))
        lrs.append(opt.param_groups[0]["lr"])
        cuts.append(sched.peak_search.cuts)  # rule 4: an exploding step
        answers.append(sched.peak_search.cuts + sched.peak_search.backoffs)  # rules 3 and 4
    losses.append(float(0.5 * (LAMBDAS * x.detach() ** 2).sum()))
    return losses, lrs, sched, x, cuts, answers


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", sorted(DIVERGING))
def test_an_exploding_loss_without_lambda_is_cut_at_once_and_the_run_recovers(
    name: str, seed: int
) -> None:
    """No model=, no loss_fn=: no λ̂, only the loss. The explosion (the loss growing ×16 per
    step under SGD) is answered every step it lasts, not once per cool-down; the run ends
    below 10 % of its starting loss with finite parameters. (Adam's bounded steps make its
    loss climb polynomially, not explode: the slower loss back-off brings it down.)

    Under momentum the loss back-off (rule 3) may answer the first rise before it explodes
    (SGD-momentum, seed 1: a back-off at step 8, when the loss reached 3× its start); the
    warm-up then raises the LR again, and the explosion that follows is cut on the step it
    shows (loss 72× the start at step 18, cut at 19)."""
    losses, _, sched, x, cuts, answers = _quadratic_run(DIVERGING[name], seed)
    assert sched.curvature.lambda_max is None
    start = losses[0]
    assert all(math.isfinite(v) for v in losses)
    assert bool(torch.isfinite(x).all())
    assert losses[-1] < 0.1 * start
    assert max(losses) < 1e5 * start
    if name.startswith("SGD"):  # a geometric explosion, answered within a few steps
        first_high = next(t for t, v in enumerate(losses) if v > 10 * start)
        assert answers.index(1) <= first_high + 3  # by a back-off or a cut
        exploded = [t for t, v in enumerate(losses) if v > 50 * start]
        if exploded:  # and an explosion, where one comes, is cut on the step it shows
            first_cut = cuts.index(1)
            assert first_cut <= exploded[0] + 1
    if name == "SGD":  # no momentum to ring down: the excursion is over within a few steps
        first_cut = cuts.index(1)
        assert cuts[first_cut + 1] == 2  # cut again on the next step: it was still growing
        assert sum(v > 10 * start for v in losses) <= 12


def test_every_exploding_step_halves_the_lr_and_slow_noise_does_not() -> None:
    """The rule itself: each step whose loss explodes halves the LR (first returning a raised
    peak to its best level), regardless of the 20-step cool-down; the steps after it, once
    the loss falls, cut nothing more."""
    losses, lrs, sched, _, _, _ = _quadratic_run(DIVERGING["SGD"], 0, steps=60, prior=None)
    assert sched.peak_search.cuts >= 2
    fired = [
        t
        for t in range(1, len(lrs))
        if lrs[t] <= 0.5 * lrs[t - 1] * (1 + 1e-9)  # prior=None: only a cut lowers the LR
    ]
    assert len(fired) >= sched.peak_search.cuts
    run = [t for t in range(fired[0], fired[-1] + 1)]
    assert fired == run  # consecutive steps: a cut on every step of the explosion
    assert all(losses[t] > losses[t - 1] for t in fired)  # only while the loss grows
    assert all(losses[t + 1] < losses[t] for t in range(fired[-1] + 2, len(losses) - 1))


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("name", ["SGD", "SGD-momentum", "Adam", "AdamW"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_healthy_noisy_runs_are_never_cut(name: str, seed: int) -> None:
    """Minibatch noise, heavy-tailed targets (Student-t, 3 degrees of freedom: outlier batches
    several times the mean loss) and a loss that converges to ~0: no explosion is detected."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(512, 8, generator=g)
    noise = torch.distributions.StudentT(3.0).sample((512, 1))
    ys = xs @ torch.randn(8, 1, generator=g) + 0.3 * noise
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    lr = {"SGD": 0.01, "SGD-momentum": 0.005, "Adam": 1e-2, "AdamW": 1e-2}[name]
    opt = DIVERGING[name](list(model.parameters()))
    for group in opt.param_groups:
        group["lr"] = lr
    sched = graff.GraffScheduler(opt, budget=graff.BudgetClock(steps=200))
    for _ in range(200):
        idx = torch.randint(0, 512, (8,), generator=g)
        loss = (model(xs[idx]) - ys[idx]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step(loss)
    assert sched.peak_search.cuts == 0
    _, _, quad, _, _, _ = _quadratic_run(lambda p: torch.optim.Adam(p, lr=0.1), seed, steps=200)
    assert quad.peak_search.cuts == 0  # Adam's bounces around a minimum near 0


# ----------------------------------------------------------------- 3. warnings that help
def _named_arguments(message: str) -> set[str]:
    """The ``name=`` arguments a message tells the user to pass (``category=`` is filtering)."""
    return set(re.findall(r"\b([a-z_]+)=", message)) - {"category"}


def test_entropy_warning_names_an_argument_graff_scheduler_takes_and_points_at_the_caller() -> None:
    model = nn.Sequential(nn.Linear(4, 4))  # no decoder layers: no entropy probe
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graff.GraffScheduler(
            opt,
            budget=graff.BudgetClock(steps=5),
            model=model,
            config=graff.GraffConfig(planner=True),
        )
    entropy = [w for w in caught if "entropy probe" in str(w.message)]
    assert len(entropy) == 1, [str(w.message) for w in caught]
    w = entropy[0]
    assert issubclass(w.category, graff.errors.GraffWarning)
    assert w.filename == __file__
    named = _named_arguments(str(w.message))
    assert named == {"config", "entropy"}  # config=graff.GraffConfig(entropy=False)
    assert "config" in inspect.signature(graff.GraffScheduler).parameters
    assert {"entropy", "planner"} <= graff.GraffConfig.field_names()
    for config in (graff.GraffConfig(entropy=False), graff.GraffConfig(planner=False)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            graff.GraffScheduler(opt, budget=graff.BudgetClock(steps=5), model=model, config=config)
        assert not [w for w in caught if "entropy probe" in str(w.message)]


def test_lambda_off_warning_points_at_the_users_step_and_says_fixed_batch() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 1)  # the user computes the loss outside the model: no .loss to re-run
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    sched = graff.GraffScheduler(opt, budget=graff.BudgetClock(steps=5), model=model)
    x = torch.randn(8, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step(loss)
    off = [w for w in caught if "λ̂ estimates off" in str(w.message)]
    assert len(off) == 1, [str(w.message) for w in caught]
    w, text = off[0], str(off[0].message)
    assert issubclass(w.category, graff.errors.ProbeWarning)
    assert issubclass(w.category, RuntimeWarning)  # as before GraffWarning existed
    assert w.filename == __file__  # the user's opt.step(), not torch's optimizer.py
    assert text.count("loss_fn=") == 1
    assert "fixed probe batch" in text
    assert "category=graff.errors.ProbeWarning" in text
    assert _named_arguments(text) <= set(inspect.signature(graff.GraffScheduler).parameters)
    assert not sched.curvature.hvp
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", category=graff.errors.GraffWarning)
        graff.guard.stability_threshold(torch.optim.Rprop(model.parameters()))
    assert not caught  # one category silences them all


def test_readme_and_docs_index_show_loss_fn_for_plain_models() -> None:
    root = Path(__file__).resolve().parents[1]
    for page in ("README.md", "docs/index.md"):
        text = (root / page).read_text(encoding="utf-8")
        assert "loss_fn=" in text, page
        assert "probe batch" in text, page


@pytest.mark.parametrize("kind", ["graff", "reactor", "budget"])
def test_resuming_with_another_budget_keeps_the_saved_one_and_says_so(kind: str) -> None:
    # as a torch scheduler's load_state_dict restores its T_max, a graff scheduler's restores
    # the budget it was saved with; a resume built with another budget now hears about it
    make = {
        "graff": graff.GraffScheduler,
        "reactor": graff.ReactorScheduler,
        "budget": graff.BudgetScheduler,
    }[kind]
    net = nn.Linear(4, 1)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    sched = make(opt, budget=graff.BudgetClock(steps=100))
    for _ in range(10):
        loss = net(torch.randn(8, 4)).pow(2).mean()
        loss.backward()
        opt.step()
        sched.step(loss)
        opt.zero_grad()
    state = sched.state_dict()
    same = make(torch.optim.AdamW(net.parameters(), lr=1e-3), budget=graff.BudgetClock(steps=100))
    with warnings.catch_warnings():
        warnings.simplefilter("error", graff.errors.GraffWarning)
        same.load_state_dict(state)  # the same budget: silent
    other = make(torch.optim.AdamW(net.parameters(), lr=1e-3), budget=graff.BudgetClock(steps=300))
    with pytest.warns(graff.errors.GraffWarning, match=r"budget \(100 steps\) replaces the 300"):
        other.load_state_dict(state)
    assert other.budget.total == 100
    assert other.budget.fraction_used == pytest.approx(0.1)
