"""Scheduler variants under test: how each one builds its optimizer and scheduler.

Every variant trains with the task's optimizer — AdamW (weight decay 0.01) by default, SGD with
momentum 0.9 for a task that declares ``optimizer = "sgd"`` — except the variants that are their
own optimizers: schedule-free (AdamW or SGD flavour) and the tuning-free anchors (``ANCHORS``:
Prodigy, D-Adaptation, DoG, schedule-free at its own default LR, and the LR range test + WSD of
``benchmarks.lr_range``). Anchors take no LR from the user: ``make`` ignores ``lr`` for them.
``make(name, model, lr, steps, ...)`` returns a :class:`Setup` with the optimizer, the scheduler
(or ``None``), the train/eval switches schedule-free needs, and the hooks DoG's iterate averager
needs (``after_step``, ``eval_model``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from graff import BudgetClock, BudgetPrior, GraffScheduler, ReactorScheduler

WEIGHT_DECAY = 0.01
WARMUP = 0.05  # warm-up fraction for every scheduler that has one (GRAFF's prior default too)

GRAFF_VARIANTS: dict[str, dict[str, Any]] = {
    "graff": {},  # defaults: the shipped planner (warm_start="default"), WSD prior
    "graff_fresh": {"warm_start": None},  # an untrained planner instead of the shipped one
    "graff_linear_prior": {"prior": "linear"},
    "graff_no_edges": {"edges": False},
    "graff_no_budget_feature": {"budget_feature": False},
    "graff_no_entropy": {"entropy": False},  # no entropy lens: its features stay 0
    "graff_frozen": {"online": False},
    "graff_no_prior": {"prior": None},
    "graff_no_calibrate": {"peak_search": False},
    # the prior, the peak search and the guard alone: no planner forward, no online update
    "graff_planner_off": {"planner": False},
    # GRAFF's own budget prior alone: zero decoder, no search, no learning, no guard
    "prior_only": {"online": False, "peak_search": False, "guard": False, "warm_start": None},
    # wall-clock suites only (under a step budget it is "graff"): own time capped at 2 % of B
    "graff_time_share": {"time_share": 0.02},
}
#: Variants that differ from "graff" only under a wall-clock budget.
CLOCK_ONLY = ("graff_time_share",)
BASELINES = ("fixed", "cosine", "linear", "wsd", "schedule_free")
# Tuning-free anchors, each at its authors' recommended settings; none takes the user's LR.
ANCHORS = ("prodigy", "dadapt", "dog", "schedule_free_default", "lr_range_wsd")
OPTIMIZERS = ("adamw", "sgd")
SGD_MOMENTUM = 0.9
# The extra a missing anchor package comes from (``pip install -e ".[bench]"``).
BENCH_EXTRA = 'pip install -e ".[bench]"'


class MissingAnchorPackage(ImportError):
    """An anchor's optimizer package is not installed; the runner records the run as skipped."""


LEARNED = ("graff", "prior_only", "reactor")
ABLATIONS = tuple(k for k in GRAFF_VARIANTS if k not in ("graff", "prior_only", *CLOCK_ONLY))


@dataclass
class Setup:
    optimizer: torch.optim.Optimizer
    scheduler: Any = None
    train_mode: Callable[[], None] = field(default=lambda: None)
    eval_mode: Callable[[], None] = field(default=lambda: None)
    steps_with_loss: bool = False  # scheduler.step(loss) (graff/reactor) vs scheduler.step()
    after_step: Callable[[], None] = field(default=lambda: None)  # after optimizer.step()
    eval_model: nn.Module | None = None  # the model to evaluate, if not the trained one (DoG)


def _prior_lambda(prior: BudgetPrior, steps: int) -> Callable[[int], float]:
    return lambda step: prior(min(step / steps, 1.0))


def build_optimizer(
    kind: str, params: list[nn.Parameter], lr: float, weight_decay: float = WEIGHT_DECAY
) -> torch.optim.Optimizer:
    """The task's plain optimizer: AdamW, or SGD with momentum 0.9 (no Nesterov)."""
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if kind == "sgd":
        return torch.optim.SGD(
            params, lr=lr, momentum=SGD_MOMENTUM, nesterov=False, weight_decay=weight_decay
        )
    raise ValueError(f"unknown optimizer {kind!r}; expected one of {OPTIMIZERS}")


def _anchor_import(module: str, package: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingAnchorPackage(f"anchor needs the {package!r} package: {BENCH_EXTRA}") from err


def _cosine_annealing(steps: int, clock: BudgetClock | None) -> Callable[[int], float]:
    """CosineAnnealingLR(T_max=steps) to 0 without warm-up, over steps or the clock's fraction."""
    if clock is not None:
        timed = clock
        return lambda _: 0.5 * (1.0 + math.cos(math.pi * min(timed.fraction_used, 1.0)))
    return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step / steps, 1.0)))


def _budget_lambda(prior: BudgetPrior, steps: int, clock: BudgetClock | None) -> Any:
    if clock is not None:
        timed = clock
        return lambda _: prior(timed.fraction_used)
    return _prior_lambda(prior, steps)


def make_anchor(
    name: str,
    model: nn.Module,
    steps: int,
    *,
    optimizer: str = "adamw",
    weight_decay: float = WEIGHT_DECAY,
    clock: BudgetClock | None = None,
) -> Setup:
    """A tuning-free anchor at its authors' recommended settings (see benchmarks/README.md).

    - ``prodigy``: ``prodigyopt.Prodigy(lr=1.0, safeguard_warmup=True, use_bias_correction=True)``
      (decoupled weight decay) with cosine annealing over the budget, as its README recommends.
      Prodigy has no SGD flavour: it stays Adam-type on SGD tasks.
    - ``dadapt``: ``dadaptation.DAdaptAdam(lr=1.0, decouple=True)`` (``DAdaptSGD(momentum=0.9)``
      on SGD tasks) with the schedule the task would normally use — the suite's 5 % warm-up +
      cosine, its README's "use the same learning rate scheduler you would normally use".
    - ``dog``: ``dog.DoG(lr=1.0, reps_rel=1e-6)``, no schedule, with the README's
      ``PolynomialDecayAverager`` (evaluation uses the averaged model). DoG is SGD-type.
    - ``schedule_free_default``: ``AdamWScheduleFree`` at its default LR 0.0025
      (``SGDScheduleFree`` at its default 1.0, momentum 0.9, on SGD tasks), 5 % warm-up.

    ``lr_range_wsd`` needs the task's data and is built by ``benchmarks.lr_range``.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "prodigy":
        prodigyopt = _anchor_import("prodigyopt", "prodigyopt")
        opt = prodigyopt.Prodigy(
            params,
            lr=1.0,
            weight_decay=weight_decay,
            safeguard_warmup=True,
            use_bias_correction=True,
        )
        return Setup(opt, torch.optim.lr_scheduler.LambdaLR(opt, _cosine_annealing(steps, clock)))
    if name == "dadapt":
        dadaptation = _anchor_import("dadaptation", "dadaptation")
        if optimizer == "sgd":
            opt = dadaptation.DAdaptSGD(
                params, lr=1.0, momentum=SGD_MOMENTUM, weight_decay=weight_decay
            )
        else:
            opt = dadaptation.DAdaptAdam(params, lr=1.0, weight_decay=weight_decay, decouple=True)
        prior = BudgetPrior("cosine", warmup=WARMUP, final=0.0, decay=0.2)
        return Setup(
            opt, torch.optim.lr_scheduler.LambdaLR(opt, _budget_lambda(prior, steps, clock))
        )
    if name == "dog":
        dog = _anchor_import("dog", "dog-optimizer")
        opt = dog.DoG(params, lr=1.0, reps_rel=1e-6, weight_decay=weight_decay)
        averager = dog.PolynomialDecayAverager(model)
        return Setup(opt, after_step=averager.step, eval_model=averager.averaged_model)
    if name == "schedule_free_default":
        import schedulefree

        warmup = int(WARMUP * steps)
        if optimizer == "sgd":
            opt = schedulefree.SGDScheduleFree(
                params, momentum=SGD_MOMENTUM, weight_decay=weight_decay, warmup_steps=warmup
            )
        else:
            opt = schedulefree.AdamWScheduleFree(
                params, weight_decay=weight_decay, warmup_steps=warmup
            )
        return Setup(opt, None, opt.train, opt.eval)
    if name == "lr_range_wsd":
        raise ValueError("lr_range_wsd needs the task's data: use benchmarks.lr_range.make_setup")
    raise KeyError(f"unknown anchor {name!r}")


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
    optimizer: str = "adamw",
    weight_decay: float = WEIGHT_DECAY,
) -> Setup:
    """Build optimizer + scheduler for variant ``name`` at base LR ``lr`` over ``steps`` steps.

    With ``clock`` (a wall-clock budget), cosine/linear/WSD follow ``clock.fraction_used`` and
    GRAFF/REACTOR plan against it; without, everything plans against a ``steps`` step budget.
    Fixed LR and schedule-free (step warm-up estimate) ignore the clock. ``graff_kwargs`` are
    extra arguments for every GRAFF variant (``--graff-kwargs`` of ``benchmarks run``): keyword
    arguments of GraffScheduler or fields of ``GraffConfig`` (:func:`graff_arguments`);
    a variant's own switches win (``prior_only`` and ``graff_fresh`` keep ``warm_start=None``,
    ``graff_frozen`` keeps ``online=False``, ...), so each stays the ablation it names.
    ``optimizer`` (``"adamw"`` or ``"sgd"``) and ``weight_decay`` are the task's; anchors
    (``ANCHORS``) ignore ``lr`` (see :func:`make_anchor`).
    """
    if name in ANCHORS:
        return make_anchor(
            name, model, steps, optimizer=optimizer, weight_decay=weight_decay, clock=clock
        )
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "schedule_free":
        import schedulefree

        warmup = int(WARMUP * steps)
        if optimizer == "sgd":
            sf = schedulefree.SGDScheduleFree(
                params, lr=lr, momentum=SGD_MOMENTUM, weight_decay=weight_decay, warmup_steps=warmup
            )
        else:
            sf = schedulefree.AdamWScheduleFree(
                params, lr=lr, weight_decay=weight_decay, warmup_steps=warmup
            )
        return Setup(sf, None, sf.train, sf.eval)
    opt = build_optimizer(optimizer, params, lr, weight_decay)
    if name == "fixed":
        return Setup(opt)
    if name in ("cosine", "linear", "wsd"):
        prior = BudgetPrior(name, warmup=WARMUP, final=0.0, decay=0.2)
        return Setup(
            opt, torch.optim.lr_scheduler.LambdaLR(opt, _budget_lambda(prior, steps, clock))
        )
    if clock is None:
        clock = BudgetClock(steps=steps, measure_energy=False)
    if name == "reactor":
        return Setup(
            opt, ReactorScheduler(opt, clock, model=model, seed=seed), steps_with_loss=True
        )
    if name in GRAFF_VARIANTS:
        kwargs = {**(graff_kwargs or {}), **GRAFF_VARIANTS[name]}  # the variant's switches win
        sched = GraffScheduler(
            opt, clock, model=model, loss_fn=loss_fn, seed=seed, **graff_arguments(kwargs)
        )
        return Setup(opt, sched, steps_with_loss=True)
    raise KeyError(f"unknown scheduler {name!r}")


def graff_arguments(kwargs: dict[str, Any]) -> dict[str, Any]:
    """GraffScheduler keyword arguments from a flat dict: the ``GraffConfig`` fields among them
    go into ``config=``."""
    from graff import GraffConfig

    fields = GraffConfig.field_names()
    knobs = {k: v for k, v in kwargs.items() if k in fields}
    rest = {k: v for k, v in kwargs.items() if k not in fields}
    return rest | ({"config": GraffConfig(**knobs)} if knobs else {})


def current_lr(setup: Setup) -> float:
    """The LR the optimizer will use for its next step (first parameter group)."""
    group = setup.optimizer.param_groups[0]
    if "scheduled_lr" in group:  # schedule-free exposes its warm-up-scaled LR here
        return float(group["scheduled_lr"])
    if "d" in group:  # Prodigy / D-Adaptation: the step size is d × lr
        return float(group["d"]) * float(group["lr"])
    if "reps_rel" in group:  # DoG: its step size eta (lr included); none before the first step
        eta = group.get("eta")
        if eta is None:
            return math.nan
        return float(eta[0] if isinstance(eta, list | tuple) else eta)
    return float(group["lr"])
