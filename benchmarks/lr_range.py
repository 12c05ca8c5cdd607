"""The LR range test (Smith, 2017) followed by WSD at the LR it picks: the ``lr_range_wsd`` anchor.

Leslie N. Smith, "Cyclical Learning Rates for Training Neural Networks", WACV 2017
(https://arxiv.org/abs/1506.01186), section 3.3. The test and its suggestion rule follow the
defaults of ``torch-lr-finder`` (https://github.com/davidtvs/pytorch-lr-finder,
``LRFinder.range_test`` and ``LRFinder.plot(suggest_lr=True)``), written here once so the
benchmark does not depend on it:

- on a *copy* of the model (the real run starts from the untouched initialisation), with the
  task's optimizer, the LR grows exponentially from ``start_lr`` = 1e-7 to ``end_lr`` = 10 over
  ``num_iter`` steps: ``lr_i = start · (end / start) ** (i / (num_iter − 1))``;
- the training loss is smoothed with an exponential moving average (``smooth_f`` = 0.05: each
  new loss gets weight 0.05) and the test stops once the smoothed loss exceeds
  ``diverge_th`` = 5 × the best smoothed loss so far (or is not finite);
- the suggested LR is the one at the steepest descent of the smoothed loss,
  ``argmin(numpy.gradient(losses))``, after trimming ``skip_start`` = 10 points at the start and
  ``skip_end`` = 5 at the end. torch-lr-finder's defaults are for 100 iterations; for shorter
  tests both trims scale with ``num_iter`` (10 % and 5 %). Where too few points are left for a
  gradient, the fallback is fast.ai's older rule, the LR of the minimum smoothed loss / 10.

The test's steps are real training steps of the budget: WSD then trains for the budget minus the
steps the test ran (``make_setup``), so ``lr_range_wsd`` spends exactly the step budget.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from benchmarks.schedulers import WEIGHT_DECAY, Setup, build_optimizer, make

START_LR = 1e-7
END_LR = 10.0
MAX_ITER = 100  # torch-lr-finder's default num_iter
SMOOTH_F = 0.05
DIVERGE_TH = 5.0


def range_steps(budget: int) -> int:
    """Steps of the range test for a budget: ~100 (the default), at most a quarter of the budget."""
    return max(2, min(MAX_ITER, budget // 4))


@dataclass
class RangeResult:
    """What the range test saw: the LR and smoothed loss of every step it ran, and its pick."""

    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # smoothed
    raw_losses: list[float] = field(default_factory=list)
    lr: float = math.nan
    rule: str = ""

    @property
    def steps(self) -> int:
        """Training steps the test ran (they count against the step budget)."""
        return len(self.raw_losses)


def suggest_lr(lrs: list[float], losses: list[float], num_iter: int) -> tuple[float, str]:
    """torch-lr-finder's steepest-descent suggestion, trims scaled to ``num_iter``."""
    if not lrs:
        raise ValueError("the range test ran no step")
    skip_start = round(10 * num_iter / MAX_ITER)
    skip_end = round(5 * num_iter / MAX_ITER)
    end = len(losses) - skip_end if skip_end else len(losses)
    trimmed_lrs, trimmed = lrs[skip_start:end], losses[skip_start:end]
    if len(trimmed) >= 2:
        return float(trimmed_lrs[int(np.gradient(np.asarray(trimmed)).argmin())]), "steepest"
    return float(lrs[int(np.argmin(losses))]) / 10.0, "min_loss/10"


def range_test(
    model: nn.Module,
    make_optimizer: Callable[[list[nn.Parameter], float], torch.optim.Optimizer],
    loss_of: Callable[[nn.Module], Tensor],
    num_iter: int,
    *,
    start_lr: float = START_LR,
    end_lr: float = END_LR,
) -> RangeResult:
    """Run the exponential LR sweep on a deep copy of ``model``; ``model`` is not touched."""
    if num_iter < 2:
        raise ValueError(f"num_iter must be at least 2, got {num_iter}")
    probe = copy.deepcopy(model)
    probe.train()
    params = [p for p in probe.parameters() if p.requires_grad]
    opt = make_optimizer(params, start_lr)
    result = RangeResult()
    best = math.inf
    for i in range(num_iter):
        lr = start_lr * (end_lr / start_lr) ** (i / (num_iter - 1))
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss = loss_of(probe)
        value = float(loss.detach())
        if not math.isfinite(value):
            result.raw_losses.append(value)  # the step was spent, even if it blew up
            break
        loss.backward()
        opt.step()
        smoothed = value if i == 0 else SMOOTH_F * value + (1 - SMOOTH_F) * result.losses[-1]
        best = min(best, smoothed)
        result.lrs.append(lr)
        result.losses.append(smoothed)
        result.raw_losses.append(value)
        if smoothed > DIVERGE_TH * best:
            break
    result.lr, result.rule = suggest_lr(result.lrs, result.losses, num_iter)
    del probe, opt
    return result


def make_setup(
    model: nn.Module,
    steps: int,
    loss_of: Callable[[nn.Module], Tensor],
    *,
    seed: int,
    optimizer: str = "adamw",
    weight_decay: float = WEIGHT_DECAY,
) -> tuple[Setup, RangeResult]:
    """The range test on a copy of ``model``, then WSD at the picked LR for the steps left.

    ``loss_of(model)`` draws one training minibatch (the caller seeds its generator). Returns the
    WSD setup, built over ``steps - result.steps`` steps, and the test's result.
    """
    result = range_test(
        model,
        lambda params, lr: build_optimizer(optimizer, params, lr, weight_decay),
        loss_of,
        range_steps(steps),
    )
    left = max(1, steps - result.steps)
    setup = make(
        "wsd", model, result.lr, left, seed=seed, optimizer=optimizer, weight_decay=weight_decay
    )
    return setup, result
