"""Checks run on a scheduler right after it loaded a state (see ``BudgetedScheduler.load_state_dict``).

A state can be well formed and still poison training: a NaN planner weight, an Adam moment of
the wrong shape or type, a negative second moment. These checks look at what was loaded and
raise :class:`~graff.errors.CheckpointError`; the loader then restores the previous state.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from graff.errors import CheckpointError

#: State entries that hold the user's data (the curvature probe's captured batch), not graff's.
USER_DATA_KEYS = frozenset({"probe_inputs"})


def _walk(obj: Any, path: str) -> Iterator[tuple[str, Any]]:
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if k not in USER_DATA_KEYS:
                yield from _walk(v, f"{path}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _walk(v, f"{path}[{i}]")
    else:
        yield path, obj


def check_finite_state(state: Any, what: str) -> None:
    """Raise unless every float tensor in ``state`` is finite and no number is NaN."""
    for path, value in _walk(state, what):
        if isinstance(value, Tensor) and value.is_floating_point():
            if not bool(torch.isfinite(value).all()):
                raise CheckpointError(f"{path} holds NaN or infinite values.")
        elif isinstance(value, float) and math.isnan(value):
            raise CheckpointError(f"{path} is NaN.")


def _real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_adam(optimizer: torch.optim.Optimizer, what: str) -> None:
    """Raise unless ``optimizer`` (an Adam) holds usable hyperparameters and moments.

    Each group needs a finite ``lr > 0``, ``eps > 0``, ``weight_decay >= 0`` and betas in
    ``[0, 1)``; each parameter's state is empty or has a finite ``step >= 0`` and finite
    ``exp_avg``/``exp_avg_sq`` (``>= 0``) tensors of the parameter's shape.
    """
    for i, group in enumerate(optimizer.param_groups):
        betas = group.get("betas")
        ok = (
            _real(group.get("lr")) and group["lr"] > 0
            and _real(group.get("eps")) and group["eps"] > 0
            and _real(group.get("weight_decay")) and group["weight_decay"] >= 0
            and isinstance(betas, (tuple, list)) and len(betas) == 2
            and all(_real(b) and 0 <= b < 1 for b in betas)
        )  # fmt: skip
        flags = ("amsgrad", "maximize", "capturable", "differentiable")
        ok = ok and all(group.get(k, False) is False for k in flags)  # as graff builds them
        ok = ok and all(group.get(k) in (None, False, True) for k in ("fused", "foreach"))
        if not ok:
            raise CheckpointError(f"{what} param_groups[{i}] has invalid hyperparameters.")
        for p in group["params"]:
            state = optimizer.state.get(p)
            if not state:
                continue
            step = state.get("step")
            step = float(step) if isinstance(step, Tensor) and step.numel() == 1 else step
            moments = [state.get("exp_avg"), state.get("exp_avg_sq")]
            if not (_real(step) and step >= 0) or not all(
                isinstance(m, Tensor)
                and m.shape == p.shape
                and m.is_floating_point()
                and bool(torch.isfinite(m).all())
                for m in moments
            ):
                raise CheckpointError(f"{what} has an invalid state for a {tuple(p.shape)} tensor.")
            if bool((moments[1] < 0).any()):
                raise CheckpointError(f"{what} has a negative second moment.")
