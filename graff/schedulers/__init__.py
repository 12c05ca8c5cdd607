"""The schedulers: :class:`BudgetScheduler` (a prior over the budget), :class:`GraffScheduler`
(the learned planner) and :class:`ReactorScheduler` (the policy-gradient baseline), all built on
:class:`~graff.schedulers.base.BudgetedScheduler`."""

from graff.schedulers.budget import BudgetScheduler
from graff.schedulers.graff import GraffScheduler, PlanRecord
from graff.schedulers.reactor import ReactorScheduler

__all__ = ["BudgetScheduler", "GraffScheduler", "PlanRecord", "ReactorScheduler"]
