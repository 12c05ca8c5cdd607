"""The one training loop every benchmark runs: a step budget or a wall-clock budget stops it.

``train_loop(step, setup, stop)`` repeats: record the LR the next step will use, take one
optimizer step (``step``: zero_grad, forward, backward, ``optimizer.step()``), then advance the
schedule the way each variant needs it (:func:`advance`). The stop rule is a callable of the steps
done: :func:`step_budget` for the step-budget suites, :func:`clock_budget` for the wall-clock
ones. Evaluation and other per-step work go in ``after_step``; the loop itself never evaluates,
so it cannot spend a clock's time on evaluation by accident.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from benchmarks.schedulers import Setup, current_lr

Stop = Callable[[int], bool]


@dataclass
class Trace:
    """What a loop recorded: train loss and LR per step, steps done, and whether it diverged."""

    loss_tensors: list[Tensor]
    lrs: list[float]
    steps: int
    diverged: bool

    @property
    def losses(self) -> list[float]:
        """The train losses as floats (read after the loop: no device sync per step, and a
        wall-clock budget's time is read before this is)."""
        return [float(v) for v in self.loss_tensors]


def step_budget(steps: int) -> Stop:
    """Stop after ``steps`` steps (counting steps taken before the loop, e.g. a range test)."""
    return lambda done: done >= steps


def clock_budget(clock: Any, max_steps: float = math.inf) -> Stop:
    """Stop when ``clock`` (a started ``graff.BudgetClock``) is exhausted, or at ``max_steps``,
    but never before the first step: a budget of a few milliseconds (the quick suite's) can run
    out while a loaded machine preempts the process between set-up and the loop, and a run with
    no step measures nothing."""
    return lambda done: done > 0 and (clock.exhausted or done >= max_steps)


def task_step(
    task: Any, model: torch.nn.Module, setup: Setup, gen: torch.Generator
) -> Tensor | None:
    """One optimizer step on ``task``'s training loss; ``None`` (no step taken) if it is not finite."""
    setup.train_mode()
    setup.optimizer.zero_grad(set_to_none=True)
    loss = task.train_loss(model, gen)
    if not torch.isfinite(loss):
        return None
    loss.backward()
    setup.optimizer.step()
    return loss


def advance(setup: Setup, loss: Tensor, clock: Any = None) -> None:
    """Step the schedule after ``optimizer.step()``: GRAFF/REACTOR take the loss (and tick the
    clock themselves); every other scheduler steps plainly and ``clock`` is ticked here."""
    if setup.scheduler is not None and setup.steps_with_loss:
        setup.scheduler.step(loss.detach())
        return
    if setup.scheduler is not None:
        setup.scheduler.step()
    if clock is not None:
        clock.tick()


def train_loop(
    step: Callable[[], Tensor | None],
    setup: Setup,
    stop: Stop,
    *,
    clock: Any = None,
    done: int = 0,
    after_step: Callable[[int], None] | None = None,
) -> Trace:
    """Train until ``stop(steps done)``; a ``None`` from ``step`` ends the run as diverged.

    ``done`` counts steps already spent from the same budget; ``after_step(done)`` runs after
    every step (evaluation).
    """
    losses: list[Tensor] = []
    lrs: list[float] = []
    diverged = False
    while not stop(done):
        lrs.append(current_lr(setup))
        loss = step()
        if loss is None:
            diverged = True
            break
        setup.after_step()
        advance(setup, loss, clock)
        done += 1
        losses.append(loss.detach())
        if after_step is not None:
            after_step(done)
    return Trace(losses, lrs, done, diverged)
