"""The edge-of-stability guard: a Euclidean projection of the LR decoder, and the final clamp.

Gradient descent on a quadratic with top Hessian eigenvalue :math:`\\lambda_{\\max}` is stable
iff :math:`\\eta\\,\\lambda_{\\max} < 2`; the seed keeps :math:`\\eta_t\\,\\hat\\lambda_{\\max} \\le c`
with :math:`c = 1.9`, 5 % under the threshold. Other optimizers have other thresholds
(Cohen et al., "Gradient Descent on Neural Networks Typically Occurs at the Edge of Stability",
ICLR 2021, https://arxiv.org/abs/2103.00065; Cohen et al., "Adaptive Gradient Methods at the
Edge of Stability", 2022, https://arxiv.org/abs/2207.14484):

=====================================  ====================================  ==========================
optimizer                              sharpness the probe measures          threshold on η·λ̂
=====================================  ====================================  ==========================
SGD (no momentum)                      :math:`\\lambda_{\\max}(H)`             :math:`2`
SGD, heavy-ball momentum β             :math:`\\lambda_{\\max}(H)`             :math:`2 + 2\\beta`
SGD, Nesterov momentum β               :math:`\\lambda_{\\max}(H)`             :math:`(2 + 2\\beta)/(1 + 2\\beta)`
Adam / AdamW / NAdam / Adamax (β1)     :math:`\\lambda_{\\max}(P^{-1}H)`       :math:`(2 + 2\\beta_1)/(1 - \\beta_1)`
RMSprop (momentum β)                   :math:`\\lambda_{\\max}(P^{-1}H)`       :math:`2 + 2\\beta`
Adagrad                                :math:`\\lambda_{\\max}(P^{-1}H)`       :math:`2`
anything else                          :math:`\\lambda_{\\max}(H)`             :math:`2` (conservative)
=====================================  ====================================  ==========================

:math:`P` is the optimizer's diagonal preconditioner (e.g. :math:`\\sqrt{\\hat v} + \\epsilon` for
Adam). The guard constant is :math:`c = \\text{fraction} \\times \\text{threshold}` with
``fraction = 0.95`` by default, which gives the seed's 1.9 for plain gradient descent and 36.1
for Adam at :math:`\\beta_1 = 0.9`.

The planner's global log-LR is linear in its latent state,
:math:`\\log\\eta_t = w\\cdot\\bar h_t + b + o_t` (:math:`o_t`: the log of the base LR times the
budget prior), so :math:`\\eta_t\\hat\\lambda \\le c` is the half-space

.. math::

    \\mathcal{H} = \\{(w, b) : w\\cdot\\bar h_t + b \\le \\log(c/\\hat\\lambda) - o_t\\}

with normal :math:`(\\bar h_t, 1)`. :func:`project_to_halfspace` is the exact Euclidean
projection onto it:

.. math::

    (w, b) \\leftarrow (w, b) - \\frac{\\max(0,\\ w\\cdot\\bar h_t + b - \\beta)}{\\lVert\\bar h_t\\rVert^2 + 1}
    \\,(\\bar h_t, 1),\\qquad \\beta = \\log(c/\\hat\\lambda) - o_t.

Whatever the planner, probes or inputs do, :func:`clamp_lr` is applied last: the LR written to
the optimizer is finite, positive and inside ``[lr_min, lr_max]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from graff._checks import check_in_range
from graff._warn import warn
from graff.errors import GraffConfigError

_DEFAULT_FRACTION = 0.95

#: The one classification of optimizers, read by :func:`stability_threshold` (which threshold)
#: and by :mod:`graff.probes.preconditioner` (which ``P``): ``(kind, torch classes, names)``,
#: tried in order. An optimizer is of a kind if it is an instance of one of the classes or its
#: class has one of the names (third-party re-implementations of torch's adaptive methods).
OPTIMIZER_KINDS: tuple[
    tuple[str, tuple[type[torch.optim.Optimizer], ...], tuple[str, ...]], ...
] = (
    ("sgd", (torch.optim.SGD,), ()),
    ("radam", (torch.optim.RAdam,), ("RAdam",)),
    ("adamax", (torch.optim.Adamax,), ("Adamax",)),
    (
        "adam",
        (torch.optim.Adam, torch.optim.AdamW, torch.optim.NAdam),
        ("Adam", "AdamW", "NAdam", "SparseAdam"),
    ),
    ("rmsprop", (torch.optim.RMSprop,), ()),
    ("adagrad", (torch.optim.Adagrad,), ()),
)
#: Kinds whose update is Adam's (first moment β1, diagonal preconditioner).
ADAM_KINDS = ("adam", "radam", "adamax")


def optimizer_kind(optimizer: torch.optim.Optimizer) -> str | None:
    """``"sgd"``, ``"adam"``, ``"radam"``, ``"adamax"``, ``"rmsprop"``, ``"adagrad"`` or None.

    The first row of :data:`OPTIMIZER_KINDS` that ``optimizer`` matches; None if none does.
    """
    name = type(optimizer).__name__
    for kind, classes, names in OPTIMIZER_KINDS:
        if isinstance(optimizer, classes) or name in names:
            return kind
    return None


def project_to_halfspace(
    w: Tensor, b: Tensor, h: Tensor, bound: float | Tensor
) -> tuple[Tensor, Tensor]:
    """Project ``(w, b)`` onto ``{(w, b) : w·h + b ≤ bound}`` (nearest point, Euclidean norm).

    Args:
        w: Decoder weights, shape ``(d,)``.
        b: Decoder bias, a 0-d or 1-element tensor.
        h: The (mean) latent state the decoder is applied to, shape ``(d,)``.
        bound: Right-hand side of the constraint. ``+inf`` means no constraint. A NaN or
            ``-inf`` bound, or a non-finite ``h``, cannot be projected onto: ``(w, b)`` are
            returned unchanged and :func:`clamp_lr` must catch the LR.

    Returns:
        ``(w', b')`` with the shapes, dtypes and devices of ``(w, b)``; new tensors, the inputs are
        not modified. Unchanged values when ``(w, b)`` is already feasible.

    Examples:
        >>> w, b = torch.tensor([1.0, 0.0]), torch.tensor(0.0)
        >>> project_to_halfspace(w, b, torch.tensor([1.0, 1.0]), bound=-2.0)
        (tensor([ 0., -1.]), tensor(-1.))
    """
    if w.dim() != 1 or h.shape != w.shape:
        raise GraffConfigError(
            f"w and h must be 1-d of one shape, got {tuple(w.shape)} and {tuple(h.shape)}."
        )
    if b.numel() != 1:
        raise GraffConfigError(f"b must hold one number, got shape {tuple(b.shape)}.")
    beta = float(bound)
    if math.isnan(beta) or beta == -math.inf or not bool(torch.isfinite(h).all()):
        return w.clone(), b.clone()
    h64, w64, b64 = h.double(), w.double(), b.double().reshape(())
    violation = float(w64 @ h64 + b64) - beta
    if not violation > 0.0:  # feasible (or +inf bound)
        return w.clone(), b.clone()
    step = violation / (float(h64 @ h64) + 1.0)
    w_new = (w64 - step * h64).to(w.dtype)
    b_new = (b64 - step).reshape(b.shape).to(b.dtype)
    # Rounding (and the cast back to w's dtype) may leave the result a hair outside the
    # half-space; move the bias inside by the excess so the guard holds exactly.
    excess = float(w_new.double() @ h64 + b_new.double().reshape(())) - beta
    if excess > 0.0:
        b_new = torch.nextafter(
            (b_new.double() - excess).to(b.dtype), torch.tensor(-math.inf, dtype=b.dtype)
        )
    return w_new, b_new


def clamp_lr(lr: float, lr_min: float, lr_max: float) -> float:
    """The final clamp: a finite LR in ``[lr_min, lr_max]`` whatever ``lr`` is.

    NaN and ``-inf`` map to ``lr_min`` (the safe side), ``+inf`` to ``lr_max``.

    Examples:
        >>> clamp_lr(float("nan"), 1e-6, 1.0), clamp_lr(float("inf"), 1e-6, 1.0), clamp_lr(0.5, 1e-6, 1.0)
        (1e-06, 1.0, 0.5)
    """
    if not (0.0 < lr_min <= lr_max < math.inf):
        raise GraffConfigError(
            f"need 0 < lr_min <= lr_max < inf, got lr_min={lr_min!r}, lr_max={lr_max!r}."
        )
    x = float(lr)
    if math.isnan(x):
        return lr_min
    return min(lr_max, max(lr_min, x))


def max_stable_lr(lambda_hat: float, c: float) -> float:
    """Largest LR with ``lr · lambda_hat ≤ c``: ``c / lambda_hat``.

    ``inf`` when ``lambda_hat`` is 0, negative or NaN (no curvature information: no bound);
    ``0.0`` when ``lambda_hat`` is ``+inf`` (the clamp then applies ``lr_min``).

    Examples:
        >>> max_stable_lr(10.0, 1.9)
        0.19
    """
    if not (isinstance(c, (int, float)) and math.isfinite(c) and c > 0):
        raise GraffConfigError(f"the guard constant c must be finite and > 0, got {c!r}.")
    lam = float(lambda_hat)
    if math.isnan(lam) or lam <= 0.0:
        return math.inf
    return c / lam


def factor_caps(
    lambda_hat: float, constants: Sequence[float], initial_lrs: Sequence[float]
) -> list[float]:
    """Per-group caps on an LR *factor* (LR over initial LR) from one sharpness estimate.

    A scheduler that writes :math:`\\eta_g = \\eta^0_g f_g` keeps every group under the guard,
    :math:`\\eta_g\\hat\\lambda \\le c_g`, iff

    .. math::

        f_g \\le \\frac{\\texttt{max\\_stable\\_lr}(\\hat\\lambda, c_g)}{\\eta^0_g}
        = \\frac{c_g}{\\hat\\lambda\\,\\eta^0_g},

    with :math:`c_g` = ``constants[g]`` (e.g. :func:`guard_constant` of group :math:`g`) and
    :math:`\\eta^0_g` = ``initial_lrs[g]``. Groups keep their own constants (an optimizer's
    groups may use different momenta), so the caps differ by more than the LR ratios.
    ``lambda_hat`` ≤ 0 or NaN gives ``inf`` (no bound), ``+inf`` gives 0, as
    :func:`max_stable_lr` does.

    Examples:
        >>> factor_caps(10.0, [1.9, 1.9], [0.1, 0.01])
        [1.9, 19.0]
    """
    if len(constants) != len(initial_lrs):
        raise GraffConfigError(
            f"factor_caps needs one guard constant per group: got {len(constants)} constants "
            f"for {len(initial_lrs)} initial LRs."
        )
    return [
        max_stable_lr(lambda_hat, c) / float(lr0)
        for c, lr0 in zip(constants, initial_lrs, strict=True)
    ]


def log_lr_bound(lambda_hat: float, c: float, offset: float = 0.0) -> float:
    """Right-hand side ``log(c / lambda_hat) − offset`` of the decoder's half-space."""
    bound = max_stable_lr(lambda_hat, c)
    if bound == 0.0:
        return -math.inf
    return math.log(bound) - offset if math.isfinite(bound) else math.inf


def stability_threshold(optimizer: torch.optim.Optimizer, group_index: int = 0) -> float:
    """Threshold on η·λ̂ above which ``optimizer`` diverges on a quadratic (see module table).

    Unknown optimizers get 2 (plain gradient descent) and a warning.
    """
    n = len(optimizer.param_groups)
    if (
        isinstance(group_index, bool)
        or not isinstance(group_index, int)
        or not 0 <= group_index < n
    ):
        raise GraffConfigError(f"group_index must be an integer in [0, {n}), got {group_index!r}.")
    group = optimizer.param_groups[group_index]
    kind = optimizer_kind(optimizer)
    if kind == "sgd":
        beta = float(group.get("momentum", 0.0))
        return (
            (2.0 + 2.0 * beta) / (1.0 + 2.0 * beta) if group.get("nesterov") else 2.0 + 2.0 * beta
        )
    if kind in ADAM_KINDS:
        beta1 = float(group["betas"][0])
        return (2.0 + 2.0 * beta1) / (1.0 - beta1)
    if kind == "rmsprop":
        return 2.0 + 2.0 * float(group.get("momentum", 0.0))
    if kind == "adagrad":
        return 2.0
    warn(
        f"graff does not know the stability threshold of {type(optimizer).__name__}; using 2 (plain gradient "
        "descent), which is conservative for momentum methods. Pass guard_c= to override "
        "(and to silence this warning)."
    )
    return 2.0


def guard_constant(
    optimizer: torch.optim.Optimizer, group_index: int = 0, fraction: float = _DEFAULT_FRACTION
) -> float:
    """The guard constant ``c = fraction × stability_threshold`` (1.9 for plain SGD).

    Examples:
        >>> p = torch.nn.Parameter(torch.zeros(1))
        >>> round(guard_constant(torch.optim.SGD([p], lr=0.1)), 6)
        1.9
        >>> round(guard_constant(torch.optim.Adam([p], betas=(0.9, 0.999))), 6)
        36.1
    """
    check_in_range("fraction", fraction, 0.0, 1.0, low_open=True)
    return fraction * stability_threshold(optimizer, group_index)
