"""Contract: a parameter group added mid-run (``optimizer.add_param_group``) is scheduled.

Gradual unfreezing adds parameter groups to a running optimizer: Lightning's
``BackboneFinetuning`` callback does it at a chosen epoch, with the new group's LR taken from the
current LR of the first group. torch's chainable schedulers (``CosineAnnealingLR`` here, the
control) take the new group in from its LR as added and move it by the same factor as the others,
so the ratio of the groups' LRs stays what it was when the group came in. graff's schedulers used
to crash at the next ``step()`` (``KeyError: 'initial_lr'``); now they do what the control does:
the new group's initial LR is its LR as added over the factor in force, so the next step
continues from it, and the group keeps its ratio to the others. A group added with its own
``initial_lr`` keeps that one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

import graff

STEPS, ADD_AT, NEW_LR = 24, 6, 5e-4


def _model() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh()), torch.nn.Linear(8, 1)


SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer], Any]] = {
    "cosine (control)": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=2 * STEPS),
    "budget": lambda o: graff.BudgetScheduler(o, budget=graff.BudgetClock(steps=STEPS)),
    "graff": lambda o: graff.GraffScheduler(o, budget=graff.BudgetClock(steps=STEPS)),
    "reactor": lambda o: graff.ReactorScheduler(o, budget=graff.BudgetClock(steps=STEPS), seed=0),
}


def _train(make: Callable[[torch.optim.Optimizer], Any], group: dict[str, Any]) -> dict:
    body, head = _model()
    opt = torch.optim.AdamW(body.parameters(), lr=1e-3)
    sched = make(opt)
    gen = torch.Generator().manual_seed(1)
    lrs, states = [], []
    for step in range(STEPS):
        x = torch.randn(16, 6, generator=gen)
        loss = head(body(x)).pow(2).mean()
        loss.backward()
        opt.step()
        if isinstance(sched, torch.optim.lr_scheduler.CosineAnnealingLR):
            sched.step()
        else:
            sched.step(loss)
        opt.zero_grad(set_to_none=True)
        if step == ADD_AT:
            opt.add_param_group({"params": head.parameters(), **group})
        lrs.append([float(g["lr"]) for g in opt.param_groups])
        if step == ADD_AT + 3:
            states.append((sched.state_dict(), opt.state_dict()))
    return {"lrs": lrs, "sched": sched, "opt": opt, "states": states, "model": (body, head)}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_an_added_group_continues_from_its_lr_and_keeps_its_ratio(name: str) -> None:
    run = _train(SCHEDULERS[name], {"lr": NEW_LR})
    lrs = run["lrs"]
    at_add = lrs[ADD_AT]
    assert at_add[1] == NEW_LR  # as added: the scheduler has not stepped since
    ratio = NEW_LR / at_add[0]
    for old, new in lrs[ADD_AT + 1 :]:
        assert 0 < new < float("inf")
        assert new / old == pytest.approx(ratio, rel=1e-9)
    assert len(run["sched"].get_last_lr()) == 2
    assert len({round(old, 12) for old, _ in lrs[ADD_AT:]}) >= 3  # the schedule kept moving


@pytest.mark.parametrize("name", ["budget", "graff", "reactor"])
def test_an_added_group_with_its_own_initial_lr_keeps_it(name: str) -> None:
    run = _train(SCHEDULERS[name], {"lr": NEW_LR, "initial_lr": 2e-3})
    group, first = run["opt"].param_groups[1], run["opt"].param_groups[0]
    assert group["initial_lr"] == 2e-3
    # groups keep the ratio of their initial LRs (away from the clamps)
    assert group["lr"] / first["lr"] == pytest.approx(2e-3 / first["initial_lr"], rel=1e-9)


@pytest.mark.parametrize("name", ["budget", "graff", "reactor"])
def test_a_state_saved_after_the_group_came_in_resumes_exactly(name: str) -> None:
    run = _train(SCHEDULERS[name], {"lr": NEW_LR})
    sched_state, opt_state = run["states"][0]
    # as a resumed gradual-unfreezing run does: the scheduler is built on the optimizer of the
    # start of training, the group is added again, then both states load
    body, head = _model()
    opt = torch.optim.AdamW(body.parameters(), lr=1e-3)
    sched = SCHEDULERS[name](opt)
    opt.add_param_group({"params": head.parameters(), "lr": NEW_LR})
    opt.load_state_dict(opt_state)  # brings initial_lr and the LRs of both groups
    sched.load_state_dict(sched_state)
    assert [float(g["lr"]) for g in opt.param_groups] == run["lrs"][ADD_AT + 3]
    assert sched.state_dict()["last_lr"] == sched_state["last_lr"]


@pytest.mark.parametrize("kind", ["graff", "reactor"])
def test_an_added_group_under_the_guard_is_capped_with_the_others(kind: str) -> None:
    # with λ̂ (loss_fn=), the guard's per-group caps cover the added group too
    body, head = _model()
    probe_x = torch.randn(16, 6, generator=torch.Generator().manual_seed(2))

    def probe_loss() -> torch.Tensor:
        return head(body(probe_x)).pow(2).mean()

    opt = torch.optim.SGD(body.parameters(), lr=0.05, momentum=0.9)
    budget = graff.BudgetClock(steps=STEPS)
    if kind == "graff":
        sched: Any = graff.GraffScheduler(opt, budget=budget, loss_fn=probe_loss)
    else:
        sched = graff.ReactorScheduler(opt, budget=budget, loss_fn=probe_loss, guard=True, seed=0)
    gen = torch.Generator().manual_seed(1)
    for step in range(STEPS):
        loss = head(body(torch.randn(16, 6, generator=gen))).pow(2).mean()
        loss.backward()
        opt.step()
        sched.step(loss)
        opt.zero_grad(set_to_none=True)
        if step == 2:
            opt.add_param_group({"params": head.parameters(), "lr": 0.5})
    lam = (sched.curvature if kind == "graff" else sched.curvature_probe).lambda_max
    assert lam is not None
    assert opt.param_groups[1]["lr"] > opt.param_groups[0]["lr"]  # the ratio as added
    for group in opt.param_groups:  # η·λ̂ ≤ 2(1 + β) for heavy-ball SGD
        assert 0 < group["lr"] * lam <= 2.0 * (1 + 0.9) * 1.001


def test_an_added_group_without_a_valid_lr_is_a_clear_error() -> None:
    body, head = _model()
    opt = torch.optim.AdamW(body.parameters(), lr=1e-3)
    sched = graff.GraffScheduler(opt, budget=graff.BudgetClock(steps=STEPS))
    opt.add_param_group({"params": head.parameters(), "lr": float("nan")})
    with pytest.raises(graff.errors.GraffConfigError, match=r"param_groups\[1\]"):
        sched.step(1.0)


def test_parameters_frozen_mid_run_leave_graff_running_with_lambda() -> None:
    # freezing part of the model mid-run (requires_grad_(False), the group left as it was) used
    # to crash the next λ̂ estimate inside the optimizer's step hook
    body, head = _model()
    probe_x = torch.randn(16, 6, generator=torch.Generator().manual_seed(2))

    def probe_loss() -> torch.Tensor:
        return head(body(probe_x)).pow(2).mean()

    opt = torch.optim.AdamW([*body.parameters(), *head.parameters()], lr=1e-3)
    sched = graff.GraffScheduler(opt, budget=graff.BudgetClock(steps=STEPS), loss_fn=probe_loss)
    gen = torch.Generator().manual_seed(1)
    for step in range(STEPS):
        if step == 3:
            body.requires_grad_(False)
        loss = head(body(torch.randn(16, 6, generator=gen))).pow(2).mean()
        loss.backward()
        opt.step()
        sched.step(loss)
        opt.zero_grad(set_to_none=True)
    assert sched.curvature.hvp
    assert sched.curvature.lambda_max is not None
    assert 0 < opt.param_groups[0]["lr"] < float("inf")
