"""Argument checks shared by graff's public constructors.

Each helper raises :class:`~graff.errors.GraffConfigError` (a ``ValueError``) or
:class:`~graff.errors.GraffTypeError` (a ``TypeError``) with a message that names the
argument, the value received and the allowed range, so users see what to fix.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from numbers import Real
from typing import Any

from graff.errors import GraffConfigError, GraffTypeError


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
