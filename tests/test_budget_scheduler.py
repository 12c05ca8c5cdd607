"""BudgetScheduler: standard shapes laid over a step or wall-clock budget."""

from __future__ import annotations

import pytest
import torch
from conftest import FakeTime
from torch import nn

import graff


def _opt(lr: float = 0.1) -> torch.optim.Optimizer:
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(3))
    return torch.optim.SGD([{"params": [a]}, {"params": [b], "lr": lr / 4}], lr=lr)


def _step(opt: torch.optim.Optimizer, sched: graff.BudgetScheduler) -> None:
    opt.step()
    sched.step()


@pytest.mark.parametrize("name", ["cosine", "linear", "wsd", "constant"])
def test_step_budget_follows_the_prior_in_closed_form(name: str) -> None:
    opt = _opt()
    sched = graff.BudgetScheduler(opt, graff.BudgetClock(steps=40), prior=name)
    prior = graff.BudgetPrior(name, warmup=0.05, final=0.0, decay=0.2)
    assert sched.get_last_lr()[0] == pytest.approx(0.1 * prior(0.0))
    for k in range(1, 41):
        _step(opt, sched)
        expected = max(prior(k / 40), 1e-6)
        assert sched.get_last_lr() == pytest.approx([0.1 * expected, 0.025 * expected], rel=1e-9)
    assert sched.budget.exhausted


def test_wall_clock_budget_anneals_by_the_deadline_whatever_the_throughput() -> None:
    time = FakeTime()
    opt = _opt()
    clock = graff.BudgetClock(seconds=100, time_fn=time, measure_energy=False)
    sched = graff.BudgetScheduler(opt, clock, prior="linear", warmup=0.0)
    for seconds in (10.0, 30.0, 35.0, 25.0):  # uneven step times
        time.advance(seconds)
        _step(opt, sched)
        assert sched.get_last_lr()[0] == pytest.approx(0.1 * max(1 - clock.fraction_used, 1e-6))
    assert clock.exhausted
    assert sched.get_last_lr()[0] == pytest.approx(0.1 * 1e-6)


def test_resume_continues_the_schedule(tmp_path) -> None:
    opt = _opt()
    sched = graff.BudgetScheduler(opt, graff.BudgetClock(steps=10), prior="cosine")
    for _ in range(4):
        _step(opt, sched)
    torch.save(sched.state_dict(), tmp_path / "s.pt")
    opt2 = _opt()
    resumed = graff.BudgetScheduler(opt2, graff.BudgetClock(steps=10), prior="cosine")
    resumed.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert resumed.get_last_lr() == sched.get_last_lr()
    _step(opt, sched)
    _step(opt2, resumed)
    assert resumed.get_last_lr() == sched.get_last_lr()


def test_bad_arguments_are_clear() -> None:
    with pytest.raises(ValueError, match="prior"):
        graff.BudgetScheduler(_opt(), 60, prior="exponential")
    with pytest.raises(ValueError, match="warmup"):
        graff.BudgetScheduler(_opt(), 60, warmup=1.5)
    with pytest.raises(TypeError, match="optimizer"):
        graff.BudgetScheduler("sgd", 60)
