"""The peak search's checkpoint numbers: written, and parsed and checked before anything is loaded.

Split from :mod:`graff.planner.peak_search` (the rules) as :mod:`graff.probes._state` is from
the probes: :meth:`PeakSearch.load_state_dict` calls :func:`parse_search_state` first, so an
invalid state raises :class:`~graff.errors.CheckpointError` and changes nothing.
"""

from __future__ import annotations

import math
from typing import Any

from graff._checks import MAX_COUNT
from graff.errors import CheckpointError


def search_state(search: Any, history: list[float], applied: list[float]) -> dict[str, Any]:
    """:meth:`PeakSearch.state_dict`: the numbers, the loss watchers and the refresh allowance."""
    return {
        "log_peak": search.log_peak,
        "searching": search.searching,
        "steps": search.steps,
        "cooldown": search.cooldown,
        "backoffs": search.backoffs,
        "cuts": search.cuts,
        "best_level": search.best_level,
        "capped": search.capped,
        "hold_until": search.hold_until,
        "hold_decided": search.hold_decided,
        "history": history,
        "applied": applied,
        "last_refresh": search.last_refresh,
        "nonfinite_seen": search.nonfinite_seen,
        "discredited": search.discredited,
        "losses": search.losses.state_dict(),
        "explosion": search.explosion.state_dict(),
        "allowance": search.allowance.state_dict(),
    }


#: The search's counters, in the order :func:`parse_search_state` returns them.
COUNTS = ("steps", "cooldown", "backoffs", "cuts", "nonfinite_seen")


def parse_search_state(state: dict[str, Any]) -> dict[str, Any]:
    """The numbers of a :meth:`PeakSearch.state_dict`, converted and checked.

    Returns ``log_peak``, ``best_level``, ``searching``, ``capped``, ``counts`` (in
    :data:`COUNTS` order), ``history``, ``applied``, ``last_refresh``, ``discredited``,
    ``hold_until``, ``hold_decided`` and ``children`` (the loss tracker's, explosion watch's and
    refresh allowance's states, which they check themselves). Keys added later
    (``discredited``, ``hold_until``, ``hold_decided``, ``applied``) take their defaults when
    absent, so older checkpoints load.
    """
    try:
        parsed = {
            "log_peak": float(state["log_peak"]),
            "best_level": float(state["best_level"]),
            "searching": state["searching"],
            "capped": state["capped"],
            "counts": [int(state[k]) for k in COUNTS],
            "history": [float(v) for v in state["history"]],
            "applied": [float(v) for v in state.get("applied", [])],  # absent before rule 3 read it
            "last_refresh": int(state["last_refresh"]),
            "discredited": int(state.get("discredited", -1)),  # absent before loss evidence
            "hold_until": float(state.get("hold_until", 0.0)),  # absent before search_after_hold
            "hold_decided": state.get("hold_decided", True),  # absent before its auto mode
            "children": (state["losses"], state["explosion"], state["allowance"]),
        }
    except (KeyError, TypeError, ValueError, OverflowError) as err:
        raise CheckpointError(f"invalid peak-search state: {err!r}") from err
    numbers = (
        parsed["log_peak"],
        parsed["best_level"],
        parsed["hold_until"],
        *parsed["history"],
        *parsed["applied"],
    )
    if not (
        all(math.isfinite(v) for v in numbers)
        and all(0 <= c < MAX_COUNT for c in parsed["counts"])
        and isinstance(parsed["searching"], bool)
        and isinstance(parsed["capped"], bool)
        and isinstance(parsed["hold_decided"], bool)
        and -1 <= parsed["discredited"] < MAX_COUNT
        and 0.0 <= parsed["hold_until"] <= 1.0
    ):
        raise CheckpointError("invalid peak-search state.")
    return parsed
