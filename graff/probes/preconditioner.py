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

**The floor.** λ̂ is computed with each parameter tensor's ``P`` floored at a fraction
:math:`\\delta` (:data:`PRECONDITIONER_FLOOR`) of its median,

.. math:: \\tilde P_k = \\max\\bigl(P_k,\\ \\delta \\cdot \\operatorname{median}_{j} P_j\\bigr),

:math:`j` over the entries of the same tensor. Why: the stability threshold
:math:`\\eta\\lambda_{\\max}(P^{-1}H) < (2 + 2\\beta_1)/(1 - \\beta_1)` linearises the update
with ``P`` frozen. Along a coordinate whose gradients have been ~0 so far, :math:`\\sqrt{v}` is
~0 and :math:`P^{-1}` enormous, but the linearisation does not hold there: a perturbation along
it feeds its own second moment, and Adam's step :math:`m/\\sqrt{v}` stays of order one (the
sign-like regime), so no geometric growth follows. Yet those coordinates dominate the top
eigenvalue of :math:`P^{-1}H` while the second moments are young. Measured on a small CNN under
AdamW (``docs/concepts/probes.md``): the first estimate, at step 12, was
:math:`8.5\\cdot10^5` unfloored and 562 with :math:`\\delta = 0.01` (the same weights and
optimizer state); re-measured every ten steps, the unfloored estimate was 328 at step 22 and
about :math:`10^3` from step 32 on, so the first one was 2,600 times too high, and its ceiling
kept the peak search at the user's LR for the whole run. With :math:`\\delta` = 0.01 a
coordinate's effective LR :math:`\\eta/P_k` is taken as at most 100 times its tensor's median
one. The median is taken over at most :data:`MEDIAN_SAMPLE` entries (an even stride through
the tensor: deterministic, and cheap next to one Hessian-vector product); under FSDP each rank
floors its own shard by that shard's median.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from graff.errors import ProbeError
from graff.guard import optimizer_kind

#: Default floor :math:`\delta` of the preconditioner, as a fraction of each tensor's median
#: ``P`` (module docstring); 0 reads ``P`` exactly as the optimizer applies it.
PRECONDITIONER_FLOOR = 0.01
#: Most entries of a tensor the floor's median is taken over (an even stride beyond that).
MEDIAN_SAMPLE = 1 << 20


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


def floored(diag: Tensor, floor: float) -> Tensor:
    """``diag`` with its entries raised to at least ``floor`` times its median (module docstring).

    ``floor`` = 0, an empty tensor or a median that is not a positive finite number leave
    ``diag`` as it is.
    """
    if floor <= 0.0 or diag.numel() == 0:
        return diag
    flat = diag.reshape(-1)
    if flat.numel() > MEDIAN_SAMPLE:
        flat = flat[:: -(-flat.numel() // MEDIAN_SAMPLE)]  # ceil stride: ≤ MEDIAN_SAMPLE entries
    median = float(flat.median())
    if not (median > 0.0 and math.isfinite(median)):
        return diag
    return diag.clamp_min(floor * median)


def inverse_sqrt_preconditioner(
    optimizer: torch.optim.Optimizer,
    params: Sequence[Tensor],
    kind: str,
    floor: float = PRECONDITIONER_FLOOR,
) -> list[Tensor] | None:
    """:math:`D = \\tilde P^{-1/2}` per parameter (``P`` floored at ``floor`` times its median,
    module docstring), or None while no parameter has optimizer state yet.

    Parameters without state (never updated so far) get :math:`D = 0`: the optimizer has not
    moved them, so their curvature does not enter the dynamics yet.

    Args:
        optimizer: The adaptive optimizer.
        params: The parameters the probe differentiates, in order.
        kind: The value of :func:`preconditioner_kind` for ``optimizer``.
        floor: :math:`\\delta`, in [0, 1); 0: ``P`` exactly as the optimizer applies it.

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
        out.append(floored(diag, floor).rsqrt())
        found = True
    return out if found else None
