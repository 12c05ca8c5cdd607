"""Scheduler variants under test: how each one builds its optimizer and scheduler.

Every variant trains with AdamW (weight decay 0.01) except schedule-free AdamW, which is its own
optimizer. ``make(spec, params, lr, steps, ...)`` returns a :class:`Setup` with the optimizer, the
scheduler (or ``None``) and the train/eval switches schedule-free needs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from graff.clock import BudgetClock
from graff.priors import BudgetPrior

WEIGHT_DECAY = 0.01
WARMUP = 0.05  # warm-up fraction for every scheduler that has one (GRAFF's prior default too)

GRAFF_VARIANTS: dict[str, dict[str, Any]] = {
    "graff": {},  # defaults: the shipped planner (warm_start="default"), WSD prior
    "graff_fresh": {"warm_start": None},  # an untrained planner instead of the shipped one
    "graff_linear_prior": {"prior": "linear"},
    "graff_no_edges": {"edges": False},
    "graff_no_budget_feature": {"budget_feature": False},
    "graff_frozen": {"online": False},
    "graff_no_prior": {"prior": None},
    "graff_no_calibrate": {"calibrate": False},
    # GRAFF's own budget prior alone: zero decoder, no search, no learning, no guard
    "prior_only": {"online": False, "calibrate": False, "guard": False, "warm_start": None},
}
BASELINES = ("fixed", "cosine", "linear", "wsd", "schedule_free")
LEARNED = ("graff", "prior_only", "reactor")
ABLATIONS = tuple(k for k in GRAFF_VARIANTS if k not in ("graff", "prior_only"))


@dataclass
class Setup:
    optimizer: torch.optim.Optimizer
    scheduler: Any = None
    train_mode: Callable[[], None] = field(default=lambda: None)
    eval_mode: Callable[[], None] = field(default=lambda: None)
    steps_with_loss: bool = False  # scheduler.step(loss) (graff/reactor) vs scheduler.step()


def _prior_lambda(prior: BudgetPrior, steps: int) -> Callable[[int], float]:
    return lambda step: prior(min(step / steps, 1.0))


def make(
    name: str,
    model: nn.Module,
    lr: float,
    steps: int,
    *,
    seed: int,
    loss_fn: Callable[[], torch.Tensor] | None = None,
    clock: BudgetClock | None = None,
    graff_kwargs: dict[str, Any] | None = None,
) -> Setup:
    """Build optimizer + scheduler for variant ``name`` at base LR ``lr`` over ``steps`` steps.

    With ``clock`` (a wall-clock budget), cosine/linear/WSD follow ``clock.fraction_used`` and
    GRAFF/REACTOR plan against it; without, everything plans against a ``steps`` step budget.
    Fixed LR and schedule-free (step warm-up estimate) ignore the clock. ``graff_kwargs`` are
    extra keyword arguments for every GRAFF variant (``--graff-kwargs`` of ``benchmarks run``);
    a variant's own switches win (``prior_only`` and ``graff_fresh`` keep ``warm_start=None``,
    ``graff_frozen`` keeps ``online=False``, ...), so each stays the ablation it names.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "schedule_free":
        import schedulefree

        opt = schedulefree.AdamWScheduleFree(
            params, lr=lr, weight_decay=WEIGHT_DECAY, warmup_steps=int(WARMUP * steps)
        )
        return Setup(opt, None, opt.train, opt.eval)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=WEIGHT_DECAY)
    if name == "fixed":
        return Setup(opt)
    if name in ("cosine", "linear", "wsd"):
        prior = BudgetPrior(name, warmup=WARMUP, final=0.0, decay=0.2)
        if clock is not None:
            timed = clock
            return Setup(
                opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda _: prior(timed.fraction_used))
            )
        return Setup(opt, torch.optim.lr_scheduler.LambdaLR(opt, _prior_lambda(prior, steps)))
    if clock is None:
        clock = BudgetClock(steps=steps, measure_energy=False)
    if name == "reactor":
        from graff.reactor import ReactorScheduler

        return Setup(
            opt, ReactorScheduler(opt, clock, model=model, seed=seed), steps_with_loss=True
        )
    if name in GRAFF_VARIANTS:
        from graff.graff_scheduler import GraffScheduler

        kwargs = {**(graff_kwargs or {}), **GRAFF_VARIANTS[name]}  # the variant's switches win
        sched = GraffScheduler(opt, clock, model=model, loss_fn=loss_fn, seed=seed, **kwargs)
        return Setup(opt, sched, steps_with_loss=True)
    raise KeyError(f"unknown scheduler {name!r}")


def current_lr(setup: Setup) -> float:
    """The LR the optimizer will use for its next step (first parameter group)."""
    group = setup.optimizer.param_groups[0]
    if "scheduled_lr" in group:  # schedule-free exposes its warm-up-scaled LR here
        return float(group["scheduled_lr"])
    return float(group["lr"])
