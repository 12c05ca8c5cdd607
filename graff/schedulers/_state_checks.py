"""Checks of a scheduler state and of the parameter groups' LRs, before anything is changed.

Split from :mod:`graff.schedulers.base` (the stepping) as :mod:`graff.probes._state` is from the
probes: a state that fails these checks raises :class:`~graff.errors.CheckpointError` and
:meth:`BudgetedScheduler.load_state_dict` changes nothing.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from graff._checks import is_count, is_finite_real
from graff.errors import CheckpointError, GraffConfigError

#: The version of :meth:`BudgetedScheduler.state_dict`'s format.
FORMAT_VERSION = 1


def is_positive_finite(x: Any) -> bool:
    """A finite real number > 0 (an LR in a saved ``last_lr``)."""
    return is_finite_real(x) and x > 0


def not_started(state: dict[str, Any]) -> bool:
    """``last_epoch == -1`` with no step taken: torch's ``SequentialLR`` keeps the schedulers
    after its first milestone there until the milestone (its ``recursive_undo``)."""
    last = state.get("last_epoch")
    return (
        type(last) is int
        and last == -1
        and type(state.get("step_count")) is int
        and (state["step_count"] == 0)
    )


def check_counters(state: dict[str, Any]) -> None:
    """:class:`CheckpointError` unless the counters are non-negative integers (``last_epoch``
    may be -1 in a state saved before ``SequentialLR`` started the scheduler)."""
    counters = ("last_epoch", "step_count", "skipped_steps", "nonfinite_losses")
    bad = [k for k in counters if not is_count(state[k])]
    if bad == ["last_epoch"] and not_started(state):
        return
    if bad:
        raise CheckpointError(
            "scheduler state has invalid counters "
            + ", ".join(f"{k}={state[k]!r:.40}" for k in bad)
            + " (need non-negative integers; last_epoch=-1, a scheduler SequentialLR has "
            "not started, only with step_count=0)."
        )


def check_group_lr(index: int, lr: Any, owner: str) -> float:
    """A group's LR as a float; :class:`GraffConfigError` unless it is finite and > 0."""
    lr = float(lr) if isinstance(lr, Tensor) else lr
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise GraffConfigError(
            f"param_groups[{index}] has lr={lr!r}; {owner} scales each group's "
            "initial LR, so every group needs a finite lr > 0."
        )
    return float(lr)


def set_lrs(optimizer: torch.optim.Optimizer, lrs: list[float]) -> None:
    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
        if isinstance(group["lr"], Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr
