"""A re-entrancy flag for graff's hooks.

Probes re-run the model (e.g. the curvature probe's Hessian-vector products on a fixed probe
batch). Those extra forward passes must not be seen by graff's own forward hooks (the entropy
probe, the schedulers' loss capture, the probe-batch capture). Every graff hook checks
:func:`probing_active` and returns at once while a probe is evaluating.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

_state = threading.local()


def probing_active() -> bool:
    """Whether a graff probe is re-evaluating the model on this thread right now."""
    return getattr(_state, "depth", 0) > 0


@contextmanager
def probing() -> Iterator[None]:
    """Mark the enclosed code as a probe's own evaluation (nestable)."""
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1
