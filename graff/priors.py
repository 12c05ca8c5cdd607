"""Budget priors: pure functions from the fraction of budget used to an LR multiplier.

A prior is the backbone of every graff schedule: the planner's learned part multiplies it by a
bounded factor, so whatever the learned part does, the LR anneals by the deadline. Each prior
maps ``fraction_used`` :math:`u \\in [0, 1]` to a multiplier in :math:`[0, 1]`:

- ``"linear"`` — warm-up, then linear decay to ``final`` at the deadline (Budgeted Training,
  Li et al., ICLR 2020, https://arxiv.org/abs/1905.04753; "Straight to Zero", Bergsma et al.,
  ICLR 2025, https://arxiv.org/abs/2502.15938, finds linear-to-zero beats cosine):
  :math:`p(u) = f + (1-f)\\,(1-u')` with :math:`u' = (u-w)/(1-w)`.
- ``"cosine"`` — warm-up, then :math:`p = f + (1-f)\\,\\tfrac12(1+\\cos \\pi u')`
  (Loshchilov & Hutter, SGDR, ICLR 2017, https://arxiv.org/abs/1608.03983).
- ``"wsd"`` — warm-up, stable at 1, then linear decay over the last ``decay`` fraction (at most
  the whole budget after the warm-up)
  (Hu et al., MiniCPM, 2024, https://arxiv.org/abs/2404.06395).
- ``"constant"`` — warm-up, then 1 (the ablation "no budget prior").

Warm-up is linear from ``warmup_start`` to 1 over the first ``warmup`` fraction of the budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from graff._checks import check_choice, check_in_range

PriorName = Literal["linear", "cosine", "wsd", "constant"]
PRIOR_NAMES: tuple[str, ...] = ("linear", "cosine", "wsd", "constant")


@dataclass(frozen=True)
class BudgetPrior:
    """A budget prior: ``prior(fraction_used) -> multiplier`` in [0, 1].

    Args:
        name: ``"linear"``, ``"cosine"``, ``"wsd"`` or ``"constant"``.
        warmup: Fraction of the budget spent warming up, in [0, 1).
        final: Multiplier at the deadline, in [0, 1] (``0`` anneals to zero; the scheduler's
            ``lr_min`` clamp keeps the applied LR positive).
        decay: For ``"wsd"``, the fraction of the budget spent decaying, in (0, 1].
        warmup_start: Multiplier at the start of the warm-up, in (0, 1].

    Examples:
        >>> prior = BudgetPrior("linear", warmup=0.0, final=0.0)
        >>> prior(0.0), prior(0.25), prior(1.0)
        (1.0, 0.75, 0.0)
        >>> BudgetPrior("wsd", warmup=0.0, decay=0.5)(0.75)
        0.5
    """

    name: PriorName = "linear"
    warmup: float = 0.05
    final: float = 0.0
    decay: float = 0.2
    warmup_start: float = 0.1

    def __post_init__(self) -> None:
        check_choice("prior", self.name, PRIOR_NAMES)
        check_in_range("warmup", self.warmup, 0.0, 1.0, high_open=True)
        check_in_range("final", self.final, 0.0, 1.0)
        check_in_range("decay", self.decay, 0.0, 1.0, low_open=True)
        check_in_range("warmup_start", self.warmup_start, 0.0, 1.0, low_open=True)

    def __call__(self, fraction_used: float) -> float:
        """Multiplier at ``fraction_used`` (clamped to [0, 1]; NaN counts as 0)."""
        u = float(fraction_used)
        u = 0.0 if math.isnan(u) else min(1.0, max(0.0, u))
        if self.warmup > 0.0 and u < self.warmup:
            return self.warmup_start + (1.0 - self.warmup_start) * u / self.warmup
        rest = (u - self.warmup) / (1.0 - self.warmup)  # progress after warm-up, in [0, 1]
        if self.name == "constant":
            shape = 1.0
        elif self.name == "linear":
            shape = 1.0 - rest
        elif self.name == "cosine":
            shape = 0.5 * (1.0 + math.cos(math.pi * rest))
        else:  # wsd
            shape = min(1.0, (1.0 - u) / min(self.decay, 1.0 - self.warmup))
        return self.final + (1.0 - self.final) * shape


def make_prior(prior: BudgetPrior | str | None, **kwargs: float) -> BudgetPrior | None:
    """Turn a name (or ``None`` for no prior) into a :class:`BudgetPrior`."""
    if prior is None or isinstance(prior, BudgetPrior):
        return prior
    check_choice("prior", prior, PRIOR_NAMES)
    return BudgetPrior(prior, **kwargs)  # type: ignore[arg-type]
