"""Which forward passes graff's hooks read: a re-entrancy flag, and the training-pass test.

Probes re-run the model (e.g. the curvature probe's Hessian-vector products on a fixed probe
batch). Those extra forward passes must not be seen by graff's own forward hooks (the entropy
probe, the schedulers' loss capture, the probe-batch capture). Nor must a user's evaluation
(``torch.no_grad()``/``torch.inference_mode()``, as Hugging Face's ``Trainer`` and Lightning
run it): a schedule must not depend on how often the model is evaluated. Every graff hook asks
:func:`reads_pass` and returns at once when it says no.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

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


def reads_pass(training_only: bool = True) -> bool:
    """Whether a graff forward hook reads the pass running now: not a probe's own, and (with
    ``training_only``) a training pass, i.e. one run with gradients enabled."""
    return not probing_active() and (torch.is_grad_enabled() or not training_only)


def in_backward() -> bool:
    """True while autograd runs a backward pass (activation-checkpointing recomputation)."""
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


def eager() -> contextlib.AbstractContextManager[None]:
    """Run a ``torch.compile``-d model eagerly inside the block (``set_stance("force_eager")``).

    A probe's Hessian-vector products need a double backward (``create_graph=True``), which
    compiled graphs do not support ("torch.compile with aot_autograd does not currently support
    double backward"). Under this stance the model's Python code runs as written, through the
    same parameters and forward hooks, and compiled calls outside the block are unaffected.
    torch < 2.6 has no stance: a null context (the estimator then turns a compiled model's
    double-backward error into a :class:`~graff.errors.ProbeError`, and λ̂ off). Nor is
    one needed before ``torch._dynamo`` was imported (nothing can be compiled yet), and entering
    the stance would import it: about a second, on the first λ̂ estimate of a plain model.
    """
    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is None or "torch._dynamo" not in sys.modules:
        return contextlib.nullcontext()
    return set_stance("force_eager")
