"""Checks of :class:`graff.probes.lambda_max.LambdaMaxEstimator`'s arguments.

Split from :mod:`graff.probes.lambda_max` (the estimate and its schedule): each check returns
the normalised value or raises :class:`~graff.errors.GraffConfigError` /
:class:`~graff.errors.GraffTypeError` naming the argument.
"""

from __future__ import annotations

from typing import Any

import torch

from graff._checks import check_positive_int
from graff.errors import GraffConfigError, GraffTypeError
from graff.probes.preconditioner import preconditioner_kind

#: How the ``auto`` refresh interval may price a refresh (``LambdaMaxEstimator(cost_model=...)``).
COST_MODELS = ("steps", "seconds")


def check_every(every: Any) -> int | str:
    if every == "auto":
        return every
    if isinstance(every, str):
        raise GraffConfigError(f"every must be 'auto' or a positive integer, got {every!r}.")
    return check_positive_int("every", every)


def check_flags(**flags: Any) -> None:
    for name, value in flags.items():
        optional = name == "preconditioned"
        if not (isinstance(value, bool) or (optional and value is None)):
            raise GraffTypeError(
                f"{name} must be a bool{' or None' if optional else ''}, got {value!r}."
            )


def check_non_negative_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise GraffConfigError(f"{name} must be a non-negative integer, got {value!r}.")
    return value


def check_cost_model(cost_model: Any) -> str | None:
    if cost_model is not None and cost_model not in COST_MODELS:
        raise GraffConfigError(
            f"cost_model must be None, 'steps' or 'seconds', got {cost_model!r}."
        )
    return cost_model


def preconditioner_to_read(
    optimizer: torch.optim.Optimizer, preconditioned: bool | None
) -> str | None:
    """The preconditioner to read (None: the plain Hessian), as ``preconditioned`` asks."""
    kind = preconditioner_kind(optimizer)
    if preconditioned and kind is None:
        raise GraffConfigError(
            f"preconditioned=True, but graff reads no diagonal preconditioner from "
            f"{type(optimizer).__name__}; use preconditioned=None or False."
        )
    return kind if preconditioned is not False else None
