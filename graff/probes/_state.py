"""The probes' checkpoint schemas: format versions, keys, and the checks of both.

``CurvatureProbe.load_state_dict`` (with its λ̂ estimator's entries) and
``EntropyProbe.load_state_dict`` run their check before they load anything, so a state of another version or with other keys raises
:class:`~graff.errors.CheckpointError` and leaves the probe as it was.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from graff.errors import CheckpointError

__all__ = [
    "CURVATURE_FORMAT_VERSION",
    "ENTROPY_FORMAT_VERSION",
    "check_curvature_state",
    "check_entropy_state",
    "check_estimator_state",
]

#: CurvatureProbe, version 2: the λ̂ estimator's entries moved under ``"estimator"``.
CURVATURE_FORMAT_VERSION = 2
CURVATURE_STATE_KEYS = frozenset(
    {
        "format_version",
        "step",
        "dropped_samples",
        "overhead_seconds",
        "update",
        "grad_dot_update",
        "window",
        "last",
        "estimator",
    }
)


def check_curvature_state(state: Any) -> None:
    """Raise :class:`~graff.errors.CheckpointError` unless ``state`` has this version and keys."""
    if not isinstance(state, Mapping) or state.get("format_version") != CURVATURE_FORMAT_VERSION:
        got = state.get("format_version") if isinstance(state, Mapping) else type(state).__name__
        raise CheckpointError(
            f"expected a CurvatureProbe state with format_version {CURVATURE_FORMAT_VERSION}, got {got!r}."
        )
    if set(state) != CURVATURE_STATE_KEYS:
        raise CheckpointError(
            f"CurvatureProbe state keys differ: missing {sorted(CURVATURE_STATE_KEYS - set(state))}, "
            f"unexpected {sorted(set(state) - CURVATURE_STATE_KEYS)}."
        )


#: The λ̂ estimator's entries (``state["estimator"]`` of a CurvatureProbe state).
_ESTIMATOR_KEYS = frozenset(
    {
        "kind",
        "eigenvector",
        "lambda_max",
        "last_attempt_step",
        "interval",
        "cold_iters_done",
        "n_estimates",
        "dropped_estimates",
        "probe_inputs",
    }
)


def check_estimator_state(state: Any) -> None:
    """Raise :class:`~graff.errors.CheckpointError` unless ``state`` has the estimator's keys."""
    if not isinstance(state, Mapping) or set(state) != _ESTIMATOR_KEYS:
        got = set(state) if isinstance(state, Mapping) else set()
        raise CheckpointError(
            f"CurvatureProbe λ̂ state keys differ: missing {sorted(_ESTIMATOR_KEYS - got)}, "
            f"unexpected {sorted(got - _ESTIMATOR_KEYS)}."
        )


#: EntropyProbe: its sampling state (ints).
ENTROPY_FORMAT_VERSION = 1
_ENTROPY_KEYS = ("seed", "calls", "dropped_samples")


def check_entropy_state(state: Any) -> None:
    """Raise :class:`~graff.errors.CheckpointError` unless ``state`` is an EntropyProbe state.

    Of this version, with the keys ``seed``, ``calls`` and ``dropped_samples``, each a
    non-negative int.
    """
    version = state.get("format_version") if isinstance(state, dict) else None
    if version != ENTROPY_FORMAT_VERSION:
        raise CheckpointError(
            f"Not an EntropyProbe state of format_version {ENTROPY_FORMAT_VERSION}: got {version!r}."
        )
    missing = set(_ENTROPY_KEYS) - state.keys()
    if missing:
        raise CheckpointError(f"EntropyProbe state is missing keys {sorted(missing)}.")
    for key in _ENTROPY_KEYS:
        value = state[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise CheckpointError(f"EntropyProbe state has invalid {key}={value!r}.")
