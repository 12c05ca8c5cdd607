"""The curvature probe's checkpoint schema: its format version, its keys, and the check of both.

:meth:`graff.probes.curvature.CurvatureProbe.load_state_dict` runs :func:`check_state` before it
loads anything, so a state of another version or with other keys raises
:class:`~graff.errors.CheckpointError` and leaves the probe as it was.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from graff.errors import CheckpointError

__all__ = ["FORMAT_VERSION", "STATE_KEYS", "check_state"]

#: Version 2: the λ̂ estimator's entries moved under ``"estimator"``.
FORMAT_VERSION = 2
STATE_KEYS = frozenset(
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


def check_state(state: Any) -> None:
    """Raise :class:`~graff.errors.CheckpointError` unless ``state`` has this version and keys."""
    if not isinstance(state, Mapping) or state.get("format_version") != FORMAT_VERSION:
        got = state.get("format_version") if isinstance(state, Mapping) else type(state).__name__
        raise CheckpointError(
            f"expected a CurvatureProbe state with format_version {FORMAT_VERSION}, got {got!r}."
        )
    if set(state) != STATE_KEYS:
        raise CheckpointError(
            f"CurvatureProbe state keys differ: missing {sorted(STATE_KEYS - set(state))}, "
            f"unexpected {sorted(set(state) - STATE_KEYS)}."
        )
