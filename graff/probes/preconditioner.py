"""The diagonal preconditioner ``P`` of adaptive optimizers, read from the optimizer state.

Adaptive methods update :math:`\\theta \\leftarrow \\theta - \\eta P^{-1} m`, so on a quadratic
they are stable against the *preconditioned* sharpness :math:`\\lambda_{\\max}(P^{-1}H)` (Cohen et
al., "Adaptive Gradient Methods at the Edge of Stability", 2022, https://arxiv.org/abs/2207.14484),
which is what :data:`graff.guard.stability_threshold` compares :math:`\\eta\\hat\\lambda` with for
these optimizers. ``P`` per optimizer, exactly as torch computes its denominator:

==========================  ================================================================
optimizer                   :math:`P`
==========================  ================================================================
Adam, AdamW, NAdam          :math:`\\sqrt{v/(1-\\beta_2^t)} + \\epsilon` (amsgrad: ``max_exp_avg_sq``)
RAdam                       :math:`(\\sqrt{v} + \\epsilon)/\\sqrt{1-\\beta_2^t}`
Adamax                      ``exp_inf`` (already includes :math:`\\epsilon`)
RMSprop                     :math:`\\sqrt{v} + \\epsilon`; centered: :math:`\\sqrt{v - \\bar g^2} + \\epsilon`
Adagrad                     :math:`\\sqrt{\\textstyle\\sum g^2} + \\epsilon`
==========================  ================================================================

SGD and unknown optimizers have no preconditioner (:func:`preconditioner_kind` returns None).
Part of λ̂ estimation: :class:`graff.probes.lambda_max.LambdaMaxEstimator` reads ``P`` here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from graff.errors import ProbeError
from graff.guard import optimizer_kind


def preconditioner_kind(optimizer: torch.optim.Optimizer) -> str | None:
    """``"adam"``, ``"radam"``, ``"adamax"``, ``"rmsprop"``, ``"adagrad"`` or None (plain ``H``).

    :func:`graff.guard.optimizer_kind` (the one optimizer table), None for SGD.
    """
    kind = optimizer_kind(optimizer)
    return None if kind == "sgd" else kind


def _step(state: dict) -> float:
    step = state.get("step", 0)
    return float(step.item() if isinstance(step, Tensor) else step)


def _diag(kind: str, state: dict, group: dict) -> Tensor:
    """``P`` for one parameter with optimizer state ``state`` in param group ``group``."""
    eps = float(group.get("eps", 0.0))
    if kind in ("adam", "radam"):
        key = (
            "max_exp_avg_sq" if group.get("amsgrad") and "max_exp_avg_sq" in state else "exp_avg_sq"
        )
        bc2 = 1.0 - float(group["betas"][1]) ** _step(state)
        v = state[key].float()
        if kind == "radam":
            return (v.sqrt() + eps) / bc2**0.5
        return (v / bc2).sqrt() + eps
    if kind == "adamax":
        return state["exp_inf"].float().clone()
    if kind == "rmsprop":
        v = state["square_avg"].float()
        if group.get("centered"):
            ga = state["grad_avg"].float()
            v = v - ga * ga
        return v.clamp_min(0.0).sqrt() + eps
    return state["sum"].float().sqrt() + eps  # adagrad


def inverse_sqrt_preconditioner(
    optimizer: torch.optim.Optimizer, params: Sequence[Tensor], kind: str
) -> list[Tensor] | None:
    """:math:`D = P^{-1/2}` per parameter, or None while no parameter has optimizer state yet.

    Parameters without state (never updated so far) get :math:`D = 0`: the optimizer has not
    moved them, so their curvature does not enter the dynamics yet.

    Args:
        optimizer: The adaptive optimizer.
        params: The parameters the probe differentiates, in order.
        kind: The value of :func:`preconditioner_kind` for ``optimizer``.

    Raises:
        ProbeError: If the state lacks the entries ``kind`` needs (e.g. a third-party class
            named ``Adam`` with another state layout); pass ``preconditioned=False`` then.
    """
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    out: list[Tensor] = []
    found = False
    for p in params:
        state = optimizer.state.get(p, {})
        if not state or _step(state) <= 0:
            out.append(torch.zeros_like(p, dtype=torch.float32))
            continue
        try:
            diag = _diag(kind, state, group_of[id(p)])
        except KeyError as err:
            raise ProbeError(
                f"cannot read the {kind} preconditioner from {type(optimizer).__name__}'s state "
                f"(missing {err}); pass preconditioned=False to probe the plain Hessian."
            ) from err
        out.append(diag.rsqrt())
        found = True
    return out if found else None
