"""GraffScheduler's checkpoint: what its ``state_dict()`` adds, the checks, and the restore.

:class:`GraffCheckpointMixin` holds the three hooks :class:`graff._scheduler_base.BudgetedScheduler`
calls — ``_extra_state`` (save), ``_check_extra_state`` (validate before anything changes) and
``_load_extra_state`` (restore) — for the planner, its optimizer and latent state, the planning
window, the peak search, the loss trackers, the counters and both probes. Kept apart from the
planning code in :mod:`graff.graff_scheduler`, which it only reads.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor

from graff._graff_state import ExplosionWatch
from graff._refresh_budget import RefreshBudget
from graff.errors import CheckpointError
from graff.planner.net import FEATURE_NAMES, PlannerNet


class GraffCheckpointMixin:
    """The GraffScheduler half of ``state_dict()``/``load_state_dict()`` (see the module)."""

    # attributes of GraffScheduler this mixin reads and restores
    planner: PlannerNet
    planner_optimizer: torch.optim.Optimizer
    h: Tensor
    blocks: list[Any]
    edges: bool

    def _extra_state(self) -> dict[str, Any]:
        return {
            "num_blocks": len(self.blocks),
            "features": list(FEATURE_NAMES),
            "planner": {k: v.clone() for k, v in self.planner.state_dict().items()},
            "planner_optimizer": copy.deepcopy(self.planner_optimizer.state_dict()),
            "h": self.h.clone(),
            "pending": None if self._pending is None else [t.clone() for t in self._pending],
            "kappa_mean": self._kappa_mean.clone(),
            "multipliers": self._multipliers.clone(),
            "log_factor": self._log_factor,
            "calibrator": self.calibrator.state_dict(),
            "refresh_budget": self.refreshes.state_dict(),
            "window": self._window.state_dict(),
            "steps_since_plan": self._steps_since_plan,
            "plans": self._plans,
            "losses": self.losses.state_dict(),
            "explosion": self.explosion.state_dict(),
            "entropies": self.entropies.state_dict(),
            "counters": [
                self.guard_activations,
                self.guard_projections,
                self.planner_updates,
                self.skipped_planner_updates,
            ],
            "curvature": self.curvature.state_dict(),
            "entropy_probe": None
            if self.entropy_probe is None
            else self.entropy_probe.state_dict(),
        }

    def _check_extra_state(self, extra: dict[str, Any]) -> None:
        super()._check_extra_state(extra)
        keys = {
            "num_blocks",
            "features",
            "planner",
            "planner_optimizer",
            "h",
            "pending",
            "kappa_mean",
            "multipliers",
            "log_factor",
            "calibrator",
            "window",
            "steps_since_plan",
            "losses",
            "entropies",
            "counters",
            "curvature",
            "entropy_probe",
        }
        if keys - set(extra):
            raise CheckpointError(f"GraffScheduler state is missing {sorted(keys - set(extra))}.")
        if extra["num_blocks"] != len(self.blocks):
            raise CheckpointError(
                f"state was saved with {extra['num_blocks']} blocks, this scheduler has {len(self.blocks)}."
            )
        if not isinstance(extra["features"], list) or extra["features"] != list(FEATURE_NAMES):
            raise CheckpointError("state was saved by a planner with other input features.")
        try:
            PlannerNet(edges=self.edges).load_state_dict(extra["planner"])
        except (RuntimeError, TypeError, AttributeError) as err:
            raise CheckpointError(f"planner weights in the state do not fit: {err}") from err
        if tuple(extra["h"].shape) != tuple(self.h.shape):
            raise CheckpointError(
                f"planner state h has shape {tuple(extra['h'].shape)}, expected {tuple(self.h.shape)}."
            )
        n, pending = len(self.blocks), extra["pending"]
        shapes = {"h": self.h.shape, "kappa_mean": (n + 1,), "multipliers": (n,)}
        tensors = {k: extra[k] for k in shapes}
        if pending is not None:
            if not isinstance(pending, (list, tuple)) or len(pending) != 2:
                raise CheckpointError("GraffScheduler state has an invalid pending planner step.")
            tensors |= {"pending[0]": pending[0], "pending[1]": pending[1]}
            shapes |= {"pending[0]": (n, len(FEATURE_NAMES)), "pending[1]": self.h.shape}
        for key, t in tensors.items():
            if not (isinstance(t, Tensor) and t.is_floating_point() and t.shape == shapes[key]):
                raise CheckpointError(
                    f"GraffScheduler state {key} must be a float tensor of shape "
                    f"{tuple(shapes[key])}, got {t!r:.80}."
                )
        if not bool((extra["multipliers"] > 0).all()):
            raise CheckpointError("GraffScheduler state has non-positive block multipliers.")
        _check_optional_state(extra)

    def _inner_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"planner_optimizer": self.planner_optimizer}

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        self.planner.load_state_dict(extra["planner"])
        self.planner_optimizer.load_state_dict(extra["planner_optimizer"])
        self.h = extra["h"].clone()
        self._pending_graph = None
        self._pending = (
            None
            if extra["pending"] is None
            else (extra["pending"][0].clone(), extra["pending"][1].clone())
        )
        self._kappa_mean = extra["kappa_mean"].clone()
        self._multipliers = extra["multipliers"].clone()
        self._decoded = self._multiplier_tuple = None
        self._log_factor = float(extra["log_factor"])
        self.calibrator.load_state_dict(extra["calibrator"])
        if "refresh_budget" in extra:
            self.refreshes.load_state_dict(extra["refresh_budget"])
        self._window.load_state_dict(extra["window"])
        self._steps_since_plan = int(extra["steps_since_plan"])
        self._plans = int(extra.get("plans", 0))  # absent from states saved by earlier versions
        self.losses.load_state_dict(extra["losses"])
        if "explosion" in extra:  # absent from states of graff <= 0.2
            self.explosion.load_state_dict(extra["explosion"])
        self.entropies.load_state_dict(extra["entropies"])
        (
            self.guard_activations,
            self.guard_projections,
            self.planner_updates,
            self.skipped_planner_updates,
        ) = (int(v) for v in extra["counters"])
        self.curvature.load_state_dict(extra["curvature"])
        if self.entropy_probe is not None and extra["entropy_probe"] is not None:
            self.entropy_probe.load_state_dict(extra["entropy_probe"])


def _check_optional_state(extra: dict[str, Any]) -> None:
    """The entries earlier versions did not save (``refresh_budget``: graff 0.2; ``plans``;
    ``explosion``)."""
    if "refresh_budget" in extra:
        RefreshBudget(0.0).load_state_dict(extra["refresh_budget"])
    if "explosion" in extra:
        ExplosionWatch().load_state_dict(extra["explosion"])
    plans = extra.get("plans", 0)
    if isinstance(plans, bool) or not isinstance(plans, int) or not 0 <= plans < 2**63:
        raise CheckpointError(f"GraffScheduler state has an invalid plans={plans!r:.40}.")
