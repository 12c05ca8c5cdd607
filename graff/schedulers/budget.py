"""BudgetScheduler: a standard LR shape (cosine, linear-to-zero, WSD) laid over a budget.

Most schedules are written in steps; under a wall-clock budget ("anneal by the deadline, whatever
the throughput") users have to guess the number of steps. :class:`BudgetScheduler` reads the
budget clock instead: the LR of group :math:`g` at step :math:`t` is

.. math::

    \\eta_{t,g} = \\eta^0_g \\cdot p(u_t),

with :math:`u_t` the fraction of the budget used (seconds or steps) and :math:`p` a
:class:`~graff.priors.BudgetPrior`. No probes, no planner: the cheapest budget-aware schedule,
and GraffScheduler's ``prior_only`` baseline.

Examples:
    >>> import torch, graff
    >>> p = torch.nn.Parameter(torch.zeros(2))
    >>> opt = torch.optim.SGD([p], lr=0.1)
    >>> sched = graff.BudgetScheduler(opt, graff.BudgetClock(steps=4), prior="linear", warmup=0.0)
    >>> lrs = []
    >>> for _ in range(4):
    ...     opt.step(); sched.step(); lrs.append(round(sched.get_last_lr()[0], 8))
    >>> lrs
    [0.075, 0.05, 0.025, 1e-07]
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from graff.clock import BudgetClock
from graff.priors import BudgetPrior, make_prior
from graff.schedulers.base import BudgetedScheduler


class BudgetScheduler(BudgetedScheduler):
    """Each group's initial LR times a budget prior at the fraction of budget used.

    Args:
        optimizer: Any torch optimizer.
        budget: A :class:`~graff.BudgetClock` (seconds or steps) or a number of seconds.
        prior: ``"cosine"``, ``"linear"``, ``"wsd"``, ``"constant"`` or a
            :class:`~graff.BudgetPrior`.
        warmup: Warm-up fraction (when ``prior`` is a name).
        final: Multiplier at the deadline (when ``prior`` is a name).
        decay: Decay fraction of ``"wsd"`` (when ``prior`` is a name).
        model: Optional model whose forward ``.loss`` is captured (not used for planning).
        lr_min_factor: Lower clamp (× initial LR): the LR at the deadline. Default 1e-6.
        lr_max_factor: Upper clamp (× initial LR).
        process_group: ``torch.distributed`` group to agree over (``None``: the default).
        distributed: ``None`` (auto), ``False`` or ``True``: reduce the rank-local inputs (loss,
            probe statistics, rank 0's clock) once per step so every rank plans the same LR;
            see :mod:`graff.distributed`.

    Raises:
        GraffConfigError, GraffTypeError: On a bad argument.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        budget: BudgetClock | float | int,
        *,
        prior: BudgetPrior | str = "cosine",
        warmup: float = 0.05,
        final: float = 0.0,
        decay: float = 0.2,
        model: nn.Module | None = None,
        lr_min_factor: float = 1e-6,
        lr_max_factor: float = 1.0,
        process_group: Any = None,
        distributed: bool | None = None,
    ) -> None:
        if isinstance(prior, str):
            self.prior = make_prior(prior, warmup=warmup, final=final, decay=decay)
        else:
            self.prior = make_prior(prior)
        if self.prior is None:
            self.prior = BudgetPrior("constant", warmup=0.0)
        super().__init__(
            optimizer,
            budget,
            model=model,
            lr_min_factor=lr_min_factor,
            lr_max_factor=lr_max_factor,
            process_group=process_group,
            distributed=distributed,
        )

    def _initial_factors(self) -> list[float]:
        return [self.prior(0.0)] * len(self.optimizer.param_groups)

    def _plan(self, loss: float | None) -> list[float]:
        return [self.prior(self.budget.fraction_used)] * len(self.optimizer.param_groups)

    def _extra_state(self) -> dict[str, Any]:
        return {}
