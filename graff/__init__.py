"""graff: budget-aware learning-rate planners for PyTorch.

The public API is listed in ``__all__``; everything else is private and may change.
"""

from graff._version import __version__
from graff.clock import BudgetClock
from graff.errors import (
    CheckpointError,
    GraffConfigError,
    GraffError,
    GraffTypeError,
    ProbeError,
)
from graff.guard import (
    clamp_lr,
    guard_constant,
    max_stable_lr,
    project_to_halfspace,
    stability_threshold,
)
from graff.priors import BudgetPrior

__all__ = [
    "BudgetClock",
    "BudgetPrior",
    "CheckpointError",
    "GraffConfigError",
    "GraffError",
    "GraffTypeError",
    "ProbeError",
    "__version__",
    "clamp_lr",
    "guard_constant",
    "max_stable_lr",
    "project_to_halfspace",
    "stability_threshold",
]
