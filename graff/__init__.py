"""graff: budget-aware learning-rate planners for PyTorch.

The public API is listed in ``__all__``; everything else is private and may change.
"""

from graff._version import __version__
from graff.budget_scheduler import BudgetScheduler
from graff.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from graff.clock import BudgetClock
from graff.errors import (
    CheckpointError,
    GraffConfigError,
    GraffError,
    GraffTypeError,
    ProbeError,
)
from graff.graff_scheduler import GraffScheduler, PlanRecord
from graff.guard import (
    clamp_lr,
    guard_constant,
    max_stable_lr,
    project_to_halfspace,
    stability_threshold,
)
from graff.planner.config import GraffConfig
from graff.planner.net import load_planner, save_planner
from graff.priors import BudgetPrior
from graff.probes.curvature import CurvatureProbe, CurvatureStats
from graff.probes.entropy import EntropyProbe, EntropyStats, entropy_from_logits
from graff.reactor import ReactorConfig, ReactorScheduler
from graff.tokens import token_weights_from_entropy, weighted_causal_lm_loss

__all__ = [
    "BudgetClock",
    "BudgetPrior",
    "BudgetScheduler",
    "CheckpointError",
    "CurvatureProbe",
    "CurvatureStats",
    "EntropyProbe",
    "EntropyStats",
    "GraffConfig",
    "GraffConfigError",
    "GraffError",
    "GraffScheduler",
    "GraffTypeError",
    "PlanRecord",
    "ProbeError",
    "ReactorConfig",
    "ReactorScheduler",
    "__version__",
    "clamp_lr",
    "entropy_from_logits",
    "guard_constant",
    "load_checkpoint",
    "load_planner",
    "max_stable_lr",
    "project_to_halfspace",
    "read_checkpoint",
    "save_checkpoint",
    "save_planner",
    "stability_threshold",
    "token_weights_from_entropy",
    "weighted_causal_lm_loss",
]
