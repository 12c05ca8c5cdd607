"""What a scheduler reads as the training loss, and what it says when there is none.

A loss reaches a graff scheduler passed to ``step(loss)`` (:func:`loss_value` turns it into a
float) or captured from the forward output of ``model=``
(:func:`graff.probes._capture.output_loss` finds it there). A scheduler that plans from the loss
and gets none for :data:`NO_LOSS_WARNING_STEPS` steps in a row says so once
(:func:`no_loss_message`): without one, the peak search cannot back off and an exploding loss
cannot be cut.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np
from torch import Tensor

from graff.errors import GraffTypeError

#: Consecutive counted steps without any loss after which a scheduler that plans from the loss
#: (``plans_from_loss``) warns, once.
NO_LOSS_WARNING_STEPS = 10


def loss_value(loss: Any) -> float | None:
    """A float from a loss (tensor, NumPy array or scalar, number, or HF output with ``.loss``).

    ``None`` if absent; a tensor or array with several entries gives their mean, an empty one NaN.
    """
    if loss is None:
        return None
    if hasattr(loss, "loss") and not isinstance(loss, Tensor):
        loss = loss.loss
    if isinstance(loss, Tensor):
        if loss.numel() == 1:  # the usual scalar loss: one host read
            return float(loss.detach())
        if loss.numel() == 0:
            return math.nan
        return float(loss.detach().float().mean())
    if isinstance(loss, np.ndarray) and loss.dtype.kind in "fiu":  # like a tensor
        return float(loss.mean()) if loss.size else math.nan
    if isinstance(loss, numbers.Real) and not isinstance(loss, (bool, np.bool_)):
        return float(loss)  # int, float, and NumPy scalars such as np.float32
    raise GraffTypeError(f"loss must be a tensor, a number or None, got {type(loss).__name__}.")


def no_loss_message(scheduler: str, steps: int, has_model: bool) -> str:
    """The warning of a scheduler that has had no loss for ``steps`` steps in a row."""
    source = (
        "the model's forward outputs hold none (no .loss, ['loss'], or tuple starting with the "
        "scalar loss)"
        if has_model
        else "step() is called without one and there is no model= to capture it from"
    )
    return (
        f"{scheduler} has had no training loss for {steps} steps: {source}. It plans the LR "
        "from the loss (the peak search backs off and an exploding loss is cut only when it "
        "sees one), so it is running blind. Pass the loss: sched.step(loss). To silence: "
        "warnings.filterwarnings('ignore', message='.*no training loss', "
        "category=graff.errors.GraffWarning)."
    )
