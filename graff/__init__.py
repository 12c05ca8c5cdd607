"""graff: budget-aware learning-rate planners for PyTorch.

The front door holds what a user builds a run from: the three schedulers and their configs, the
budget clock and prior, the probes, checkpoint and planner save/load, and the base error. The
rest is public in its own namespace: ``graff.errors`` (every exception and warning type),
``graff.guard`` (the stability rule's pure functions), ``graff.probes`` (probes and their
statistics), ``graff.tokens`` (entropy-weighted LM loss), ``graff.checkpoint``
(``read_checkpoint``), ``graff.schedulers`` (``PlanRecord``). Modules whose names start with an
underscore are private. ``docs/architecture.md`` maps the package.
"""

from graff._version import __version__
from graff.checkpoint import load_checkpoint, save_checkpoint
from graff.clock import BudgetClock
from graff.errors import GraffError
from graff.planner.config import GraffConfig
from graff.planner.net import load_planner, save_planner
from graff.priors import BudgetPrior
from graff.probes import CurvatureProbe, EntropyProbe
from graff.schedulers import BudgetScheduler, GraffScheduler, ReactorScheduler
from graff.schedulers.reactor_config import ReactorConfig

__all__ = [
    "BudgetClock",
    "BudgetPrior",
    "BudgetScheduler",
    "CurvatureProbe",
    "EntropyProbe",
    "GraffConfig",
    "GraffError",
    "GraffScheduler",
    "ReactorConfig",
    "ReactorScheduler",
    "__version__",
    "load_checkpoint",
    "load_planner",
    "save_checkpoint",
    "save_planner",
]
