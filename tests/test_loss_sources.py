"""Where a scheduler's loss comes from, and what it says when there is none.

GRAFF and REACTOR plan from the training loss: passed to ``step(loss)`` or captured from the
forward output of ``model=``. Hugging Face models return the loss as ``.loss``, or — with
``return_dict=False``, as in many older training scripts — as the first entry of a tuple when
labels are given. That tuple used to be invisible: no loss reached the planner (the peak search
ran without its back-off) and the λ̂ probe turned itself off with advice about labels the batch
already had. And a run whose scheduler never sees a loss said nothing at all.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from conftest import make_tiny_lora, make_tiny_qwen3

import graff

STEPS = 24


def _run(return_dict: bool) -> dict[str, Any]:
    model = make_tiny_lora(make_tiny_qwen3(seed=0))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    sched = graff.GraffScheduler(opt, model=model, budget=graff.BudgetClock(steps=STEPS))
    gen = torch.Generator().manual_seed(1)
    lrs = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", graff.errors.GraffWarning)
        for _ in range(STEPS):
            ids = torch.randint(0, 96, (2, 12), generator=gen)
            out = model(input_ids=ids, labels=ids, return_dict=return_dict)
            loss = out.loss if return_dict else out[0]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            lrs.append(opt.param_groups[0]["lr"])
    graff_warnings = [w for w in caught if issubclass(w.category, graff.errors.GraffWarning)]
    return {
        "lrs": lrs,
        "losses_seen": sched.peak_search.losses.count,
        "lambda_max": sched.curvature.lambda_max,
        "warnings": graff_warnings,
    }


def test_a_tuple_output_with_the_loss_first_is_read_as_the_loss() -> None:
    as_dict, as_tuple = _run(True), _run(False)
    assert as_dict["losses_seen"] == STEPS
    assert as_tuple["losses_seen"] == STEPS
    assert as_tuple["lambda_max"] is not None  # the probe batch's replay finds the loss too
    assert as_tuple["lambda_max"] == as_dict["lambda_max"]
    assert as_tuple["lrs"] == as_dict["lrs"]
    assert not as_tuple["warnings"]


class _LogitsOnly(torch.nn.Module):
    """A model whose forward returns ``(logits,)``: the loss is computed outside it."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.lin(x),)


def _train_without_loss(make: Any, steps: int) -> list[warnings.WarningMessage]:
    torch.manual_seed(0)
    model = _LogitsOnly()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = make(opt, model)
    gen = torch.Generator().manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", graff.errors.GraffWarning)
        for _ in range(steps):
            x, y = torch.randn(8, 4, generator=gen), torch.randint(0, 3, (8,), generator=gen)
            loss = torch.nn.functional.cross_entropy(model(x)[0], y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()  # the loss is never passed, and the model's output holds none
    return [w for w in caught if issubclass(w.category, graff.errors.GraffWarning)]


@pytest.mark.parametrize("kind", ["graff", "reactor"])
def test_a_planner_that_never_sees_a_loss_says_so_once(kind: str) -> None:
    cls = graff.GraffScheduler if kind == "graff" else graff.ReactorScheduler

    def make(opt: torch.optim.Optimizer, model: torch.nn.Module) -> Any:
        return cls(opt, budget=graff.BudgetClock(steps=50), model=model, guard=False)

    caught = _train_without_loss(make, 30)
    no_loss = [w for w in caught if "no training loss" in str(w.message)]
    assert len(no_loss) == 1
    message = str(no_loss[0].message)
    assert "step(loss)" in message
    assert "To silence" in message
    assert no_loss[0].filename == __file__  # points at the user's sched.step() line


def test_a_schedule_that_needs_no_loss_does_not_warn() -> None:
    def make(opt: torch.optim.Optimizer, model: torch.nn.Module) -> Any:
        return graff.BudgetScheduler(opt, budget=graff.BudgetClock(steps=50), model=model)

    caught = _train_without_loss(make, 30)
    assert not [w for w in caught if "no training loss" in str(w.message)]


class _PerReplicaLoss(torch.nn.Module):
    """Returns ``{"loss": ...}`` with one loss per replica, as ``nn.DataParallel`` gathers it."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        per_replica = torch.stack([self.lin(half).pow(2).mean() for half in x.chunk(2)])
        return {"loss": per_replica}


def test_a_loss_with_one_entry_per_replica_is_read_as_its_mean() -> None:
    torch.manual_seed(0)
    model = _PerReplicaLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sched = graff.GraffScheduler(opt, budget=graff.BudgetClock(steps=5), model=model, guard=False)
    x = torch.randn(8, 4)
    out = model(x)
    out["loss"].mean().backward()
    opt.step()
    sched.step()
    assert sched.peak_search.losses.count == 1
    assert sched.peak_search.losses.fast == pytest.approx(float(out["loss"].mean()), rel=1e-6)


def test_the_lambda_probe_replays_a_per_replica_loss_as_its_mean() -> None:
    torch.manual_seed(0)
    model = _PerReplicaLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    probe = graff.CurvatureProbe(opt, model=model)
    x = torch.randn(8, 4)
    model(x)["loss"].mean().backward()  # the captured probe batch
    opt.step()
    ref = graff.CurvatureProbe(opt, loss_fn=lambda: model(x)["loss"].mean())
    assert probe.estimate_lambda_max() == pytest.approx(ref.estimate_lambda_max(), rel=1e-6)
