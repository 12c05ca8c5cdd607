"""graff's warnings: one category to filter by, attributed to the user's line.

A warning raised inside an optimizer hook or a forward hook would otherwise point at torch's
``optimizer.py`` or ``module.py``; :func:`warn` walks up past graff's and torch's own frames so
that ``warnings`` shows (and filters by) the line in the user's code that led to it.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch

from graff.errors import GraffWarning

_INTERNAL = (
    os.path.dirname(os.path.abspath(__file__)) + os.sep,
    os.path.dirname(os.path.abspath(torch.__file__)) + os.sep,
)


def warn(message: str, category: type[Warning] = GraffWarning) -> None:
    """``warnings.warn`` at the first frame outside graff and torch (the user's line)."""
    frame = sys._getframe(1)
    level = 2  # stacklevel 2: the caller of this function
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(
        _INTERNAL
    ):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)
