"""REACTOR's numerical kernel: the Gaussian-tanh policy, the REINFORCE loss, reward, baseline
and state features.

Maths only, no scheduler bookkeeping: :class:`graff.schedulers.reactor.ReactorScheduler` counts steps,
keeps the interval's losses, reads the probes and saves the state; this module turns those
numbers into a state vector, a draw, a reward and a policy-gradient loss.

The policy maps a normalised state :math:`s \\in \\mathbb{R}^d` to a Gaussian over a pre-squash
action :math:`u`, and the LR change is its bounded squashing:

.. math::

    \\mu_\\phi(s) = w_2^\\top \\tanh(W_1 s + b_1) + b_2,\\qquad
    \\sigma_\\phi = \\exp(\\operatorname{clip}(\\rho, \\log\\sigma_{\\min}, \\log\\sigma_{\\max})),

    u \\sim \\mathcal N(\\mu_\\phi(s), \\sigma_\\phi^2),\\qquad
    a = a_{\\max}\\tanh(u) \\in (-a_{\\max}, a_{\\max}),

with :math:`\\phi = (W_1, b_1, w_2, b_2, \\rho)` and :math:`a_{\\max}` = ``max_log_step``. The
REINFORCE loss of one decision with advantage :math:`A` and entropy weight :math:`\\beta` is

.. math::

    \\ell(\\phi) = -A\\,\\log\\mathcal N(u;\\mu_\\phi,\\sigma_\\phi^2) - \\beta\\,H_\\phi,\\qquad
    H_\\phi = \\log\\sigma_\\phi + \\tfrac12\\log(2\\pi e).

The tanh Jacobian :math:`\\log(a_{\\max}(1-\\tanh^2 u))` of :math:`\\log\\pi(a\\mid s)` does not
depend on :math:`\\phi` once :math:`u` is drawn, so it drops out of the gradient; :math:`H` is
the entropy of the pre-squash Gaussian (the squashed one has no closed form).

References:
    Williams, "Simple statistical gradient-following algorithms for connectionist reinforcement
    learning", Machine Learning 8, 229–256, 1992.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from graff._seeding import splitmix64

if TYPE_CHECKING:
    from graff.probes.curvature import CurvatureStats
    from graff.probes.entropy import EntropyStats

#: Names of the state features, in order (see :class:`graff.schedulers.reactor.ReactorScheduler`).
STATE_FEATURES: tuple[str, ...] = (
    "loss_level",
    "loss_slope",
    "log_lr_factor",
    "log_grad_norm",
    "secant_ratio",
    "remaining_budget",
    "entropy_mean",
    "entropy_change",
    "entropy_std",
)
FEATURE_CLIP = 5.0
LOG_STD_MIN, LOG_STD_MAX = math.log(0.05), math.log(2.0)
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def standard_normal(seed: int, index: int) -> float:
    """One :math:`\\varepsilon \\sim \\mathcal N(0, 1)` for decision ``index`` of the stream ``seed``.

    The generator is seeded by :func:`graff._seeding.splitmix64` of ``(seed, index)``: the draw
    depends on nothing else, so a resumed run replays it exactly.
    """
    gen = torch.Generator().manual_seed(splitmix64(seed, index))
    return float(torch.randn((), generator=gen, dtype=torch.float64))


class GaussianTanhPolicy(nn.Module):
    """Tiny MLP for the mean :math:`\\mu_\\phi(s)` and a learned, state-free log-std :math:`\\rho`.

    The output layer starts at zero, so the initial policy is :math:`\\mathcal N(0, \\sigma_0^2)`
    in every state (no LR drift before anything is learned). Float64 throughout.

    Args:
        state_dim: Size :math:`d` of the state vector.
        hidden_size: Width of the hidden tanh layer.
        init_std: Initial :math:`\\sigma_0` (pre-squash units).
        seed: Seeds the hidden layer's initialisation (uniform, PyTorch's default bounds).
    """

    def __init__(self, state_dim: int, hidden_size: int, init_std: float, seed: int) -> None:
        super().__init__()
        self.hidden = nn.Linear(state_dim, hidden_size, dtype=torch.float64)
        self.mean_head = nn.Linear(hidden_size, 1, dtype=torch.float64)
        self.log_std = nn.Parameter(torch.tensor(math.log(init_std), dtype=torch.float64))
        gen = torch.Generator().manual_seed(splitmix64(seed, -1))
        bound = 1.0 / math.sqrt(state_dim)
        with torch.no_grad():
            for p in (self.hidden.weight, self.hidden.bias):
                p.copy_((torch.rand(p.shape, generator=gen, dtype=torch.float64) * 2 - 1) * bound)
            self.mean_head.weight.zero_()
            self.mean_head.bias.zero_()

    def forward(self, state: Tensor) -> tuple[Tensor, Tensor]:
        """``(mean, log_std)`` as 0-d tensors for one state vector of shape ``[d]``."""
        mean = self.mean_head(torch.tanh(self.hidden(state))).reshape(())
        return mean, self.log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)


def gaussian_log_prob(u: Tensor | float, mean: Tensor, log_std: Tensor) -> Tensor:
    """:math:`\\log\\mathcal N(u;\\mu,\\sigma^2) = -\\frac{(u-\\mu)^2}{2\\sigma^2} - \\log\\sigma - \\tfrac12\\log 2\\pi`."""
    z = (u - mean) * torch.exp(-log_std)
    return -0.5 * z * z - log_std - _HALF_LOG_2PI


def gaussian_entropy(log_std: Tensor) -> Tensor:
    """:math:`H = \\log\\sigma + \\tfrac12\\log(2\\pi e)` of a 1-d Gaussian."""
    return log_std + _HALF_LOG_2PI + 0.5


def reinforce_loss(
    mean: Tensor, log_std: Tensor, u: float, advantage: float, entropy_bonus: float
) -> Tensor:
    """:math:`-A\\log\\mathcal N(u;\\mu,\\sigma^2) - \\beta H`; its gradient is the REINFORCE step.

    By hand: :math:`\\partial\\ell/\\partial\\mu = -A(u-\\mu)/\\sigma^2` and
    :math:`\\partial\\ell/\\partial\\log\\sigma = -A\\bigl((u-\\mu)^2/\\sigma^2 - 1\\bigr) - \\beta`.
    """
    return -advantage * gaussian_log_prob(u, mean, log_std) - entropy_bonus * gaussian_entropy(
        log_std
    )


def interval_reward(
    prev_mean: float, cur_mean: float, delta_fraction: float, clip: float
) -> float | None:
    """Compute-normalised loss improvement of one decision interval, clipped.

    .. math::

        r_k = \\operatorname{clip}\\Bigl(\\frac{\\bar L_{k-1} - \\bar L_k}
        {(\\lvert\\bar L_{k-1}\\rvert + \\epsilon)\\,(u_k - u_{k-1})}, -r_{\\max}, r_{\\max}\\Bigr)

    :math:`\\bar L_k` is the mean finite loss of interval :math:`k`, :math:`u_k` the budget's
    ``fraction_used`` at its end, :math:`\\epsilon = 10^{-8}`, :math:`r_{\\max}` = ``clip``.
    Returns ``None`` (no reward) when no budget was used or the value is not finite.
    """
    if not delta_fraction > 1e-12:
        return None
    r = (prev_mean - cur_mean) / ((abs(prev_mean) + 1e-8) * delta_fraction)
    if math.isnan(r):
        return None
    return min(clip, max(-clip, r))


def interval_slope(positions: Sequence[int], losses: Sequence[float]) -> float:
    """Least-squares slope of ``losses`` against ``positions`` (0 with fewer than 2 points)."""
    n = len(losses)
    if n < 2:
        return 0.0
    pm = sum(positions) / n
    lm = sum(losses) / n
    sxx = sum((p - pm) ** 2 for p in positions)
    sxy = sum((p - pm) * (x - lm) for p, x in zip(positions, losses, strict=True))
    return sxy / sxx if sxx > 0 else 0.0


def clip_feature(x: float) -> float:
    """``x`` clipped to ``[-FEATURE_CLIP, FEATURE_CLIP]``; NaN becomes 0."""
    if math.isnan(x):
        return 0.0
    return min(FEATURE_CLIP, max(-FEATURE_CLIP, x))


def signed_log1p(x: float) -> float:
    """:math:`\\operatorname{sign}(x)\\log(1+\\lvert x\\rvert)`: compresses heavy-tailed ratios."""
    return math.copysign(math.log1p(abs(x)), x) if math.isfinite(x) else math.copysign(50.0, x)


class EmaBaseline:
    """Bias-corrected EMA of the rewards, :math:`b_k = m_k/(1-\\gamma^k)`.

    :math:`m_k = \\gamma m_{k-1} + (1-\\gamma) r_k`, :math:`m_0 = 0`, :math:`\\gamma` =
    ``baseline_decay``. The correction makes :math:`b_1 = r_1` (no pull toward 0 at the start).
    """

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self.raw = 0.0
        self.count = 0

    @property
    def value(self) -> float | None:
        """Current baseline, or ``None`` before the first reward."""
        if self.count == 0:
            return None
        return self.raw / (1.0 - self.decay**self.count) if self.decay > 0 else self.raw

    def update(self, reward: float) -> None:
        """Fold one finite reward into the average."""
        self.raw = self.decay * self.raw + (1.0 - self.decay) * reward
        self.count += 1

    def state_dict(self) -> dict[str, float | int]:
        """``baseline_raw`` (:math:`m_k`) and ``baseline_count`` (:math:`k`); the decay is config."""
        return {"baseline_raw": self.raw, "baseline_count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (checked by :mod:`graff.schedulers.reactor_state` beforehand)."""
        self.raw, self.count = float(state["baseline_raw"]), state["baseline_count"]


class StateFeatures:
    """Builds the normalised state :math:`s_k` and keeps the references it is normalised by.

    Features (each clipped to ``[-5, 5]``; 0 when the input is missing or not finite):

    ==================  ===============================================================
    ``loss_level``      :math:`(\\bar L_k - \\bar L_{\\text{first}})/(|\\bar L_{\\text{first}}|+\\epsilon)`
    ``loss_slope``      least-squares slope of the interval's losses × interval / :math:`(|\\bar L_k|+\\epsilon)`
    ``log_lr_factor``   :math:`\\ell_k / \\max(|\\log f_{\\min}|, \\log f_{\\max})`
    ``log_grad_norm``   :math:`\\log\\lVert g_t\\rVert - \\log\\lVert g_{\\text{first}}\\rVert`
    ``secant_ratio``    :math:`\\operatorname{sign}(q)\\log(1+|q|)`, :math:`q` the global secant ratio
    ``remaining_budget`` :math:`1 - u_t`
    ``entropy_mean``    entropy probe's ``normalized_mean`` :math:`\\bar H/\\log V \\in [0, 1]`
    ``entropy_change``  its change since the previous decision
    ``entropy_std``     :math:`\\operatorname{std}(H)/\\log V`
    ==================  ===============================================================

    :math:`g_t` and :math:`q` come from the curvature probe's last reading
    (:math:`q = \\sum_i(h_i - \\langle g_{t,i},\\Delta\\theta_{t,i}\\rangle)/(-\\sum_i\\langle g_{t,i},\\Delta\\theta_{t,i}\\rangle)`).
    """

    def __init__(self) -> None:
        self.ref_loss: float | None = None
        self.ref_grad: float | None = None
        self.prev_entropy: float | None = None

    def state_dict(self) -> dict[str, float | None]:
        """The normalisation references: ``ref_loss``, ``ref_grad``, ``prev_entropy``."""
        return {
            "ref_loss": self.ref_loss,
            "ref_grad": self.ref_grad,
            "prev_entropy": self.prev_entropy,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (checked by :mod:`graff.schedulers.reactor_state` beforehand)."""
        ref = {k: None if state[k] is None else float(state[k]) for k in self.state_dict()}
        self.ref_loss, self.ref_grad, self.prev_entropy = (
            ref["ref_loss"],
            ref["ref_grad"],
            ref["prev_entropy"],
        )

    def __call__(
        self,
        *,
        mean: float | None,
        positions: Sequence[int],
        losses: Sequence[float],
        interval: int,
        log_lr_factor: float,
        remaining_budget: float,
        curvature: CurvatureStats | None = None,
        entropy: EntropyStats | None = None,
    ) -> Tensor:
        """The state vector, float64, shape ``[len(STATE_FEATURES)]``."""
        f = dict.fromkeys(STATE_FEATURES, 0.0)
        if mean is not None:
            if self.ref_loss is None:
                self.ref_loss = mean
            f["loss_level"] = (mean - self.ref_loss) / (abs(self.ref_loss) + 1e-8)
            slope = interval_slope(positions, losses)
            f["loss_slope"] = slope * interval / (abs(mean) + 1e-8)
        f["log_lr_factor"] = log_lr_factor
        f["remaining_budget"] = remaining_budget
        if curvature is not None:
            self._curvature(f, curvature)
        if entropy is not None and entropy.count > 0 and math.isfinite(entropy.normalized_mean):
            self._entropy(f, entropy)
        return torch.tensor([clip_feature(f[k]) for k in STATE_FEATURES], dtype=torch.float64)

    def _curvature(self, f: dict[str, float], last: CurvatureStats) -> None:
        gsq = float(last.grad_sq_norm.double().sum())
        if math.isfinite(gsq) and gsq > 0:
            log_g = 0.5 * math.log(gsq)
            if self.ref_grad is None:
                self.ref_grad = log_g
            f["log_grad_norm"] = log_g - self.ref_grad
        gdu = float(last.grad_dot_update.double().sum())
        curv = float(last.hypergrad.double().sum()) - gdu
        if gdu != 0 and math.isfinite(curv / -gdu):
            f["secant_ratio"] = signed_log1p(curv / -gdu)

    def _entropy(self, f: dict[str, float], stats: EntropyStats) -> None:
        f["entropy_mean"] = stats.normalized_mean
        if self.prev_entropy is not None:
            f["entropy_change"] = stats.normalized_mean - self.prev_entropy
        self.prev_entropy = stats.normalized_mean
        if stats.mean > 0:
            f["entropy_std"] = stats.std * stats.normalized_mean / stats.mean


@dataclass(frozen=True)
class ReactorDecision:
    """What the controller saw and did at its last decision (for logging and tests).

    Attributes:
        index: Decision number :math:`k` (0-based).
        step: Optimizer step at which it was taken.
        state: The state vector :math:`s_k` (float64, names in ``graff.schedulers.reactor_policy.STATE_FEATURES``).
        mean: Policy mean :math:`\\mu_\\phi(s_k)` (pre-squash), after this decision's update.
        std: Policy standard deviation :math:`\\sigma_\\phi`.
        action: :math:`a_k = a_{\\max}\\tanh(u_k)`, the change of the log-LR factor.
        reward: Reward :math:`r_k` of the interval that just ended (``None`` if none).
        advantage: :math:`A = r_k - b_{k-1}` used in the update (``None`` if no update).
    """

    index: int
    step: int
    state: Tensor
    mean: float
    std: float
    action: float
    reward: float | None
    advantage: float | None
