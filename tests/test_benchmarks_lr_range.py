"""The LR range test (benchmarks/lr_range.py): torch-lr-finder's rule, and its steps spent."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from benchmarks import lr_range, runner
from benchmarks.suites import build_task


def test_suggestion_is_the_steepest_descent_after_the_trims() -> None:
    lrs = list(np.logspace(-7, 1, 100))
    # flat, a descent steepest at index 60, then a rise; a steeper drop inside the trimmed head
    losses = [3.0 - 2.0 / (1.0 + math.exp(-(i - 60) / 3.0)) for i in range(100)]
    losses[1] = -50.0  # would win without skip_start = 10
    lr, rule = lr_range.suggest_lr(lrs, losses, 100)
    assert rule == "steepest"
    trimmed = losses[10:95]
    expected = lrs[10 + int(np.gradient(np.asarray(trimmed)).argmin())]
    assert lr == expected
    assert lrs[58] <= lr <= lrs[62]


def test_trims_scale_with_a_shorter_test_and_fall_back_when_too_short() -> None:
    lrs = list(np.logspace(-7, 1, 20))
    losses = [float(20 - i) for i in range(20)]
    losses[0] = -50.0  # trimmed: round(10 * 20 / 100) = 2 points at the start
    lr, rule = lr_range.suggest_lr(lrs, losses, 20)
    assert rule == "steepest"
    assert lrs[2] <= lr <= lrs[18]
    lr, rule = lr_range.suggest_lr(lrs[:3], [3.0, 2.0, 2.5], 100)  # 10 + 5 trimmed: nothing left
    assert (rule, lr) == ("min_loss/10", pytest.approx(lrs[1] / 10))


def test_range_test_leaves_the_model_alone_and_stops_at_divergence() -> None:
    """On a quadratic with curvature L, SGD diverges above 2/L: the test stops, and picks below."""
    torch.manual_seed(0)
    curvature = 50.0
    model = nn.Linear(8, 1, bias=False)
    before = model.weight.detach().clone()

    def loss_of(m: nn.Module) -> torch.Tensor:
        return 0.5 * curvature * (m.weight**2).sum() + 1.0

    result = lr_range.range_test(
        model, lambda params, lr: torch.optim.SGD(params, lr=lr), loss_of, 100
    )
    assert torch.equal(model.weight, before)
    assert result.steps < 100  # diverged before reaching lr = 10
    assert result.lr < 2.0 / curvature
    assert result.lrs == sorted(result.lrs)
    assert result.lrs[0] == pytest.approx(lr_range.START_LR)


def test_range_steps_are_about_100_and_at_most_a_quarter_of_the_budget() -> None:
    assert lr_range.range_steps(2000) == 100
    assert lr_range.range_steps(120) == 30
    assert lr_range.range_steps(40) == 10


def test_lr_range_wsd_spends_exactly_the_step_budget(monkeypatch) -> None:
    task = build_task("digits_mlp@80", {})
    task.setup()
    monkeypatch.setitem(runner._TASKS, task.name, task)
    seen = {}
    original = lr_range.make_setup

    def spy(model, steps, loss_of, **kwargs):
        setup, found = original(model, steps, loss_of, **kwargs)
        seen["wsd_steps"] = setup.scheduler.lr_lambdas[0]  # WSD's factor over its own steps
        seen["found"] = found
        return setup, found

    monkeypatch.setattr(lr_range, "make_setup", spy)
    result = runner.run_one(
        {"task": task.name, "scheduler": "lr_range_wsd", "lr_mult": 1, "seed": 0}
    )
    assert result["status"] == "ok", result.get("traceback")
    found = seen["found"]
    assert result["range_test"]["steps"] == found.steps == lr_range.range_steps(80)
    assert result["steps"] == 80
    assert result["train_curve"][-1][0] == 80 - 1  # range steps + WSD steps = the budget
    assert result["lr"] == found.lr
    assert result["lr_taken"] is False
    left = 80 - found.steps
    assert seen["wsd_steps"](left) == pytest.approx(0.0)  # WSD decays to 0 at the budget's end
    assert seen["wsd_steps"](left // 2) == pytest.approx(1.0)
