"""The curvature probe's flat attribute surface over the parts it is built from.

:class:`graff.probes.curvature.CurvatureProbe` holds a λ̂ estimator and an overhead meter, but
users (and GraffScheduler) read ``probe.lambda_max``, ``probe.interval`` or
``probe.overhead_seconds`` directly, as they did before the probe was split into parts. Each
such name is a property that reads and writes the part's attribute, so there is one value and
no copy to keep in sync.
"""

from __future__ import annotations

from typing import Any

#: The estimator's and the meter's readings and settings, as attributes of the probe (read and
#: write through): ``probe.lambda_max`` is ``probe.estimator.lambda_max``, and so on.
FORWARDED = {
    "estimator": (
        "lambda_max interval n_estimates dropped_estimates hvp sync kind refresh_seconds loss_fn "
        "every power_iters initial_iters margin overhead_target min_every max_every chunk_iters "
        "start_step seed share_step_costs cost_model preconditioner_floor"
    ).split(),
    "meter": "overhead_seconds hook_seconds estimate_seconds step_cost_seconds".split(),
}


def forwarded(owner: str, name: str) -> property:
    """A property reading and writing ``self.<owner>.<name>``."""

    def get(self: Any) -> Any:
        return getattr(getattr(self, owner), name)

    def set_(self: Any, value: Any) -> None:
        setattr(getattr(self, owner), name, value)

    return property(get, set_, doc=f"``{owner}.{name}``.")


def forward_attributes(cls: type) -> type:
    """Add the :data:`FORWARDED` properties (and the meter's private ``_step_time``) to ``cls``."""
    for owner, names in FORWARDED.items():
        for name in names:
            setattr(cls, name, forwarded(owner, name))
    cls._step_time = forwarded("meter", "step_time")  # type: ignore[attr-defined]
    return cls
