"""The checks every graff module shares: arguments, numbers in saved states, loaded states.

- **Arguments** (``check_*``): raise :class:`~graff.errors.GraffConfigError` (a ``ValueError``)
  or :class:`~graff.errors.GraffTypeError` (a ``TypeError``) with a message that names the
  argument, the value received and the allowed range, so users see what to fix.
- **Numbers in a saved state** (:func:`is_count`, :func:`is_finite_real`): one definition of a
  counter (a non-negative ``int`` below :data:`MAX_COUNT`) and of a finite real, so that every
  component validates its state with the same bounds.
- **A state just loaded** (:func:`check_finite_state`, :func:`check_adam`): a state can be well
  formed and still poison training (a NaN planner weight, an Adam moment of the wrong shape, a
  negative second moment); these raise :class:`~graff.errors.CheckpointError` and the loader
  restores the previous state.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from numbers import Real
from typing import Any

import torch
from torch import Tensor

from graff.errors import CheckpointError, GraffConfigError, GraffTypeError

#: Counters in saved states are ints below this (what an int64 tensor or a float64 holds).
MAX_COUNT = 2**63


def is_count(x: Any) -> bool:
    """Whether ``x`` is a counter: an ``int`` (not a bool) with ``0 <= x < MAX_COUNT``."""
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < MAX_COUNT


def is_finite_real(x: Any) -> bool:
    """Whether ``x`` is a real number (``int`` or ``float``, not a bool) with a finite float value."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:  # an int beyond the float range
        return False


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise GraffTypeError(
            f"{name} must be a real number, got {value!r} ({type(value).__name__})."
        )
    try:
        return float(value)
    except OverflowError:  # an int beyond the float range, e.g. 10**400
        raise GraffConfigError(
            f"{name} must be finite, got an integer of {value.bit_length()} bits."
        ) from None


def check_finite(name: str, value: Any) -> float:
    """Return ``value`` as a float, or raise if it is not a finite real number."""
    x = _as_float(name, value)
    if not math.isfinite(x):
        raise GraffConfigError(f"{name} must be finite, got {x!r}.")
    return x


def check_positive(name: str, value: Any) -> float:
    """Return ``value`` as a float, or raise unless it is finite and > 0."""
    x = check_finite(name, value)
    if x <= 0.0:
        raise GraffConfigError(f"{name} must be > 0, got {x!r}.")
    return x


def check_non_negative(name: str, value: Any) -> float:
    """Return ``value`` as a float, or raise unless it is finite and >= 0."""
    x = check_finite(name, value)
    if x < 0.0:
        raise GraffConfigError(f"{name} must be >= 0, got {x!r}.")
    return x


def check_in_range(
    name: str,
    value: Any,
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Return ``value`` as a float, or raise unless it lies in the interval from low to high."""
    x = check_finite(name, value)
    below = x <= low if low_open else x < low
    above = x >= high if high_open else x > high
    if below or above:
        lb = "(" if low_open else "["
        rb = ")" if high_open else "]"
        raise GraffConfigError(f"{name} must lie in {lb}{low}, {high}{rb}, got {x!r}.")
    return x


def check_positive_int(name: str, value: Any) -> int:
    """Return ``value`` as an int, or raise unless it is an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise GraffTypeError(f"{name} must be a positive integer, got {value!r}.")
    if value < 1:
        raise GraffConfigError(f"{name} must be a positive integer (>= 1), got {value!r}.")
    return int(value)


def check_choice(name: str, value: Any, allowed: Iterable[Any]) -> Any:
    """Return ``value`` unchanged, or raise unless it is one of ``allowed``."""
    options = tuple(allowed)
    if value not in options:
        raise GraffConfigError(f"{name} must be one of {options!r}, got {value!r}.")
    return value


def check_optimizer_and_model(optimizer: Any, model: Any = None) -> None:
    """Raise unless ``optimizer`` is a torch optimizer and ``model`` is a module or None."""
    import torch

    if not isinstance(optimizer, torch.optim.Optimizer):
        raise GraffTypeError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}."
        )
    if model is not None and not isinstance(model, torch.nn.Module):
        raise GraffTypeError(
            f"model must be a torch.nn.Module or None, got {type(model).__name__}."
        )


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


def check_adam(optimizer: torch.optim.Optimizer, what: str) -> None:
    """Raise unless ``optimizer`` (an Adam) holds usable hyperparameters and moments.

    Each group needs a finite ``lr > 0``, ``eps > 0``, ``weight_decay >= 0`` and betas in
    ``[0, 1)``; each parameter's state is empty or has a finite ``step >= 0`` and finite
    ``exp_avg``/``exp_avg_sq`` (``>= 0``) tensors of the parameter's shape.
    """
    for i, group in enumerate(optimizer.param_groups):
        betas = group.get("betas")
        ok = (
            is_finite_real(group.get("lr")) and group["lr"] > 0
            and is_finite_real(group.get("eps")) and group["eps"] > 0
            and is_finite_real(group.get("weight_decay")) and group["weight_decay"] >= 0
            and isinstance(betas, (tuple, list)) and len(betas) == 2
            and all(is_finite_real(b) and 0 <= b < 1 for b in betas)
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
            if not (is_finite_real(step) and step >= 0) or not all(
                isinstance(m, Tensor)
                and m.shape == p.shape
                and m.is_floating_point()
                and bool(torch.isfinite(m).all())
                for m in moments
            ):
                raise CheckpointError(f"{what} has an invalid state for a {tuple(p.shape)} tensor.")
            if bool((moments[1] < 0).any()):
                raise CheckpointError(f"{what} has a negative second moment.")
