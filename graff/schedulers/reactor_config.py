"""REACTOR's knobs: the REINFORCE learner, its cadence and its guard constant, checked once.

:class:`ReactorConfig` is what ``ReactorScheduler(config=...)`` takes: the scheduler's own
arguments say what it controls and with which probes, the config how its controller learns.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from graff._checks import check_in_range, check_non_negative, check_positive, check_positive_int
from graff.errors import GraffTypeError

__all__ = ["ReactorConfig"]


@dataclass(frozen=True)
class ReactorConfig:
    """REACTOR's controller knobs: the REINFORCE learner, its cadence and its guard constant.

    Frozen and checked when built: a ``ReactorConfig`` that exists is valid. The defaults are
    the seed's run configuration (see ``docs/concepts/reactor.md``).

    Attributes:
        controller_lr: Adam learning rate of the policy, > 0.
        baseline_decay: EMA decay :math:`\\gamma \\in [0, 1)` of the reward baseline.
        entropy_bonus: Weight :math:`\\beta \\ge 0` of the policy entropy.
        decision_interval: Optimizer steps per decision, a positive integer.
        max_log_step: Bound :math:`a_{\\max} \\in (0, 5]` of one change of the log-LR factor.
        hidden_size: Width of the policy MLP, a positive integer.
        init_std: Initial :math:`\\sigma` of the policy (pre-squash), in [0.05, 2].
        reward_clip: :math:`r_{\\max} > 0`, the clip of one interval's reward.
        guard_c: Guard constant for ``guard=True``; ``None``: :func:`~graff.guard.guard_constant`
            of each parameter group.
        token_aware: Entropy features: ``None`` when ``model=`` is a causal LM an
            :class:`~graff.probes.entropy.EntropyProbe` can read, ``True`` requires one,
            ``False`` never.

    Raises:
        GraffConfigError, GraffTypeError: for a value out of range or of the wrong type (the
            message names the field).

    Examples:
        >>> ReactorConfig(decision_interval=5).decision_interval
        5
    """

    controller_lr: float = 1e-4
    baseline_decay: float = 0.99
    entropy_bonus: float = 0.01
    decision_interval: int = 10
    max_log_step: float = 0.1
    hidden_size: int = 16
    init_std: float = 0.5
    reward_clip: float = 10.0
    guard_c: float | None = None
    token_aware: bool | None = None

    def __post_init__(self) -> None:
        checked = {
            "controller_lr": check_positive("controller_lr", self.controller_lr),
            "baseline_decay": check_in_range(
                "baseline_decay", self.baseline_decay, 0.0, 1.0, high_open=True
            ),
            "entropy_bonus": check_non_negative("entropy_bonus", self.entropy_bonus),
            "decision_interval": check_positive_int("decision_interval", self.decision_interval),
            "max_log_step": check_in_range(
                "max_log_step", self.max_log_step, 0.0, 5.0, low_open=True
            ),
            "hidden_size": check_positive_int("hidden_size", self.hidden_size),
            "init_std": check_in_range("init_std", self.init_std, 0.05, 2.0),
            "reward_clip": check_positive("reward_clip", self.reward_clip),
            "guard_c": None if self.guard_c is None else check_positive("guard_c", self.guard_c),
        }
        if self.token_aware is not None and not isinstance(self.token_aware, bool):
            raise GraffTypeError(f"token_aware must be a bool or None, got {self.token_aware!r}.")
        for name, value in checked.items():  # store the normalised values (e.g. 1 -> 1.0)
            object.__setattr__(self, name, value)


_CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(ReactorConfig))


def reject_unexpected(kwargs: dict[str, Any]) -> None:
    """Raise for keyword arguments ReactorScheduler does not take, naming ReactorConfig's."""
    knobs = sorted(k for k in kwargs if k in _CONFIG_FIELDS)
    if knobs:
        raise GraffTypeError(
            f"ReactorScheduler does not take {', '.join(k + '=' for k in knobs)}: "
            f"{'it is a field' if len(knobs) == 1 else 'they are fields'} of graff.ReactorConfig; "
            f"pass config=graff.ReactorConfig({knobs[0]}=...)."
        )
    raise GraffTypeError(
        f"ReactorScheduler got an unexpected keyword argument {sorted(kwargs)[0]!r}."
    )
