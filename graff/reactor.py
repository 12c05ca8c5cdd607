"""REACTOR: a reactive LR controller trained online by policy gradient (REINFORCE).

Every ``decision_interval`` optimizer steps the controller reads a normalised state :math:`s_k`
(loss level and slope, its own log-LR factor, gradient norm and secant ratio from a
:class:`~graff.probes.curvature.CurvatureProbe`, remaining budget and, with ``model=``, the
logit-lens entropy of an :class:`~graff.probes.entropy.EntropyProbe`), draws a bounded change of
the log-LR from a Gaussian-tanh policy, and learns from the compute-normalised loss improvement
of the interval that followed. See ``docs/concepts/reactor.md`` for the derivation.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from graff._scheduler_base import BudgetedScheduler
from graff._seeding import component_seed
from graff._validation import check_in_range, check_non_negative, check_positive, check_positive_int
from graff.clock import BudgetClock
from graff.distributed import resolve_sync
from graff.errors import CheckpointError, GraffConfigError, GraffTypeError, ProbeError
from graff.guard import factor_caps, guard_constant
from graff.priors import BudgetPrior, make_prior
from graff.probes.curvature import CurvatureProbe
from graff.probes.entropy import EntropyProbe
from graff.reactor_policy import (
    STATE_FEATURES,
    EmaBaseline,
    GaussianTanhPolicy,
    StateFeatures,
    interval_reward,
    reinforce_loss,
    standard_normal,
)
from graff.reactor_state import (
    OPTIONAL_FLOAT_KEYS,
    check_probe_state,
    invalid_controller_entries,
    load_controller,
)

__all__ = ["ReactorConfig", "ReactorDecision", "ReactorScheduler"]


@dataclass(frozen=True)
class ReactorConfig:
    """REACTOR's hyperparameters (see :class:`ReactorScheduler` for their meaning)."""

    controller_lr: float
    baseline_decay: float
    entropy_bonus: float
    decision_interval: int
    max_log_step: float
    hidden_size: int
    init_std: float
    reward_clip: float


@dataclass(frozen=True)
class ReactorDecision:
    """What the controller saw and did at its last decision (for logging and tests).

    Attributes:
        index: Decision number :math:`k` (0-based).
        step: Optimizer step at which it was taken.
        state: The state vector :math:`s_k` (float64, names in ``graff.reactor_policy.STATE_FEATURES``).
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


class ReactorScheduler(BudgetedScheduler):
    """Policy-gradient LR controller (REACTOR) with an EMA reward baseline.

    **Policy.** :math:`u_k \\sim \\mathcal N(\\mu_\\phi(s_k), \\sigma_\\phi^2)`,
    :math:`a_k = a_{\\max}\\tanh u_k` with :math:`a_{\\max}` = ``max_log_step``; a one-hidden-layer
    tanh MLP of width ``hidden_size`` gives :math:`\\mu_\\phi`, a learned scalar gives
    :math:`\\log\\sigma_\\phi` (clipped to [log 0.05, log 2]). The noise
    :math:`\\varepsilon_k = (u_k-\\mu)/\\sigma` is drawn from a generator seeded by
    ``(seed, k)``, so a resumed run replays it.

    **LR.** A reactive integrator of the actions:

    .. math::

        \\ell_k = \\operatorname{clip}(\\ell_{k-1} + a_k,\\ \\log f_{\\min},\\ \\log f_{\\max}),\\qquad
        \\eta_{g,t} = \\operatorname{clamp}\\bigl(\\eta_{g,0}\\, p(u_t)\\, e^{\\ell_k}\\bigr),

    :math:`\\eta_{g,0}` the initial LR of group :math:`g`, :math:`p` the optional budget prior
    (``prior=None``: :math:`p \\equiv 1`, the seed's purely reactive controller),
    :math:`f_{\\min}, f_{\\max}` = ``lr_min_factor``, ``lr_max_factor``. With ``guard=True`` the
    LR is also capped at ``max_stable_lr(lambda_max_safe, c_g)`` (and :math:`\\ell` is pulled
    down to the cap so it does not wind up); the final clamp always applies last.

    **State** (each clipped to [-5, 5], missing values 0): relative loss level
    :math:`(\\bar L_k - \\bar L_1)/|\\bar L_1|`; loss slope over the interval (least squares, times
    the interval, over :math:`|\\bar L_k|`); :math:`\\ell_k/\\max(|\\log f_{\\min}|, \\log f_{\\max})`;
    :math:`\\log(\\lVert g\\rVert/\\lVert g_{\\text{first}}\\rVert)`; :math:`\\operatorname{sign}(q)\\log(1+|q|)`
    of the global secant ratio :math:`q`; remaining budget :math:`1-u`; entropy
    ``normalized_mean``, its change since the last decision, and ``std / log V``.

    **Reward** of interval :math:`k` (the one the action :math:`a_{k-1}` governed):
    :math:`r_k = \\operatorname{clip}\\bigl((\\bar L_{k-1}-\\bar L_k)/((|\\bar L_{k-1}|+\\epsilon)(u_k-u_{k-1})), \\pm r_{\\max}\\bigr)`,
    the relative loss drop per unit of budget, with :math:`r_{\\max}` = ``reward_clip``.

    **Learning.** :math:`A_k = r_k - b_{k-1}` with :math:`b` the bias-corrected EMA of the
    rewards (decay ``baseline_decay``; the first reward only initialises it), then one Adam step
    (``controller_lr``) on :math:`-A_k\\log\\mathcal N(u_{k-1};\\mu_\\phi(s_{k-1}),\\sigma_\\phi^2)
    - \\beta H_\\phi` with :math:`\\beta` = ``entropy_bonus``. Intervals without a finite loss,
    or without budget progress, give no reward: the update is skipped and counted in
    :attr:`skipped_updates`; the policy and baseline never see NaN.

    Args:
        optimizer: Any torch optimizer.
        budget: A :class:`~graff.BudgetClock` or a number of seconds.
        model: Optional model: its forward ``.loss`` is captured, and for a causal LM an
            :class:`EntropyProbe` makes the controller token-aware.
        loss_fn: Optional closure for the curvature probe's λ̂ estimates (guard).
        controller_lr: Adam learning rate of the policy.
        baseline_decay: EMA decay :math:`\\gamma \\in [0, 1)` of the reward baseline.
        entropy_bonus: Weight :math:`\\beta \\ge 0` of the policy entropy.
        decision_interval: Optimizer steps per decision.
        max_log_step: Bound :math:`a_{\\max}` of one log-LR change.
        hidden_size: Width of the policy MLP.
        init_std: Initial :math:`\\sigma` of the policy (pre-squash), in [0.05, 2].
        reward_clip: :math:`r_{\\max} > 0`.
        prior: Optional budget prior (name or :class:`~graff.BudgetPrior`); ``None`` = reactive.
        guard: Cap the LR with the curvature probe's λ̂ (needs ``model=``, ``loss_fn=`` or a
            ``curvature_probe`` that estimates λ̂).
        guard_c: Guard constant; ``None``: :func:`~graff.guard_constant` of each group.
        token_aware: Use an entropy probe: ``None`` if ``model`` is a detectable causal LM,
            ``True`` requires one, ``False`` never.
        curvature_probe: A probe to share (not saved in :meth:`state_dict`; save it yourself).
            ``None``: one is created (``hvp=guard``) and saved with the scheduler. Either way
            its ``auto`` λ̂ interval follows the budget (``cost_model``: steps under a step
            budget, measured seconds under a wall-clock one); a probe built with
            ``cost_model="seconds"`` is refused under a step budget.
        entropy_probe: An entropy probe to share (same rule).
        seed: Non-negative integer seed; ``None`` draws one from the OS (saved in the state;
            under ``torch.distributed`` rank 0 draws it and every rank uses it).
        lr_min_factor: Lower clamp of the LR factor.
        lr_max_factor: Upper clamp of the LR factor.
        process_group: ``torch.distributed`` group to agree over (``None``: the default).
        distributed: ``None`` (auto), ``False`` or ``True``: reduce the rank-local inputs (loss,
            probe statistics, rank 0's clock) once per step so every rank plans the same LR;
            see :mod:`graff.distributed`.

    Raises:
        GraffConfigError, GraffTypeError: for bad arguments (the message names the argument).
        ProbeError: ``token_aware=True`` but no entropy probe fits the model.
        GraffConfigError: Sparse gradients (``nn.Embedding(sparse=True)``) are not supported:
            at construction when ``model`` has such a module, else at the first
            ``optimizer.step()`` that sees one. ``BudgetScheduler`` supports them.

    Examples:
        >>> import graff
        >>> p = torch.nn.Parameter(torch.zeros(2))
        >>> opt = torch.optim.SGD([p], lr=0.1)
        >>> sched = ReactorScheduler(opt, budget=graff.BudgetClock(steps=100), seed=0)
        >>> for _ in range(20):
        ...     opt.step()
        ...     sched.step(loss=1.0)
        >>> sched.decisions
        2

    References:
        Williams, "Simple statistical gradient-following algorithms for connectionist
        reinforcement learning", Machine Learning 8, 229–256, 1992.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        budget: BudgetClock | float | int,
        *,
        model: nn.Module | None = None,
        loss_fn: Callable[[], Tensor] | None = None,
        controller_lr: float = 1e-4,
        baseline_decay: float = 0.99,
        entropy_bonus: float = 0.01,
        decision_interval: int = 10,
        max_log_step: float = 0.1,
        hidden_size: int = 16,
        init_std: float = 0.5,
        reward_clip: float = 10.0,
        prior: BudgetPrior | str | None = None,
        guard: bool = False,
        guard_c: float | None = None,
        token_aware: bool | None = None,
        curvature_probe: CurvatureProbe | None = None,
        entropy_probe: EntropyProbe | None = None,
        seed: int | None = None,
        lr_min_factor: float = 1e-3,
        lr_max_factor: float = 100.0,
        process_group: Any = None,
        distributed: bool | None = None,
    ) -> None:
        self.config = ReactorConfig(
            controller_lr=check_positive("controller_lr", controller_lr),
            baseline_decay=check_in_range(
                "baseline_decay", baseline_decay, 0.0, 1.0, high_open=True
            ),
            entropy_bonus=check_non_negative("entropy_bonus", entropy_bonus),
            decision_interval=check_positive_int("decision_interval", decision_interval),
            max_log_step=check_in_range("max_log_step", max_log_step, 0.0, 5.0, low_open=True),
            hidden_size=check_positive_int("hidden_size", hidden_size),
            init_std=check_in_range("init_std", init_std, 0.05, 2.0),
            reward_clip=check_positive("reward_clip", reward_clip),
        )
        for name, value in (("guard", guard), ("token_aware", token_aware)):
            if not isinstance(value, bool) and not (name == "token_aware" and value is None):
                raise GraffTypeError(
                    f"{name} must be a bool{' or None' if name != 'guard' else ''}, got {value!r}."
                )
        if seed is None:
            sync = resolve_sync(process_group, distributed)
            seed = int.from_bytes(os.urandom(7), "little") if sync is None else sync.shared_seed()
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise GraffTypeError(f"seed must be a non-negative integer or None, got {seed!r}.")
        if seed < 0:
            raise GraffConfigError(f"seed must be a non-negative integer or None, got {seed!r}.")
        if curvature_probe is not None and not isinstance(curvature_probe, CurvatureProbe):
            raise GraffTypeError(
                f"curvature_probe must be a CurvatureProbe or None, got {type(curvature_probe).__name__}."
            )
        if entropy_probe is not None and not isinstance(entropy_probe, EntropyProbe):
            raise GraffTypeError(
                f"entropy_probe must be an EntropyProbe or None, got {type(entropy_probe).__name__}."
            )
        if loss_fn is not None and not callable(loss_fn):
            raise GraffTypeError(f"loss_fn must be a callable returning the loss, got {loss_fn!r}.")
        if guard and curvature_probe is None and model is None and loss_fn is None:
            raise GraffConfigError(
                "guard=True needs λ̂ from the curvature probe, which needs model= or loss_fn= "
                "(or pass curvature_probe= with hvp=True)."
            )
        if token_aware and model is None and entropy_probe is None:
            raise GraffConfigError("token_aware=True needs model= (a causal LM) or entropy_probe=.")
        self._guard_c = None if guard_c is None else check_positive("guard_c", guard_c)
        self.guard = guard
        self.prior = make_prior(prior)
        self.seed = seed
        self._reset_controller()
        self.curvature_probe: CurvatureProbe | None = None
        self.entropy_probe: EntropyProbe | None = None
        self._owns_curvature = self._owns_entropy = False
        self._guard_cs: list[float] = []
        super().__init__(
            optimizer,
            budget,
            model=model,
            lr_min_factor=lr_min_factor,
            lr_max_factor=lr_max_factor,
            process_group=process_group,
            distributed=distributed,
        )
        try:
            self._setup_probes(model, loss_fn, token_aware, curvature_probe, entropy_probe)
        except BaseException:
            self.remove()
            raise
        self._share_sync()  # the probes exist only now
        self._write(self._factors_now())

    # ------------------------------------------------------------------ setup
    def _reset_controller(self) -> None:
        cfg = self.config
        self.policy = GaussianTanhPolicy(
            len(STATE_FEATURES), cfg.hidden_size, cfg.init_std, self.seed
        )
        self._policy_opt = torch.optim.Adam(self.policy.parameters(), lr=cfg.controller_lr)
        self.baseline = EmaBaseline(cfg.baseline_decay)
        self.decisions = 0  # number of decisions taken
        self.updates = 0  # policy-gradient steps taken
        self.skipped_updates = 0  # decisions whose reward was missing or not finite
        self.last_decision: ReactorDecision | None = None
        self._log_factor = 0.0
        self._in_interval = 0  # optimizer steps in the current interval
        self._positions: list[int] = []  # positions (in the interval) of the finite losses
        self._losses: list[float] = []
        self._prev_mean: float | None = None
        self._prev_fraction = 0.0
        self._state_features = StateFeatures()
        self._pending: tuple[Tensor, float] | None = None  # (s_{k-1}, u_{k-1})

    def _setup_probes(self, model, loss_fn, token_aware, curvature_probe, entropy_probe) -> None:
        self._owns_curvature = curvature_probe is None
        if curvature_probe is None:
            curvature_probe = CurvatureProbe(
                self.optimizer,
                model=model,
                loss_fn=loss_fn,
                hvp=self.guard,
                seed=component_seed(self.seed),
            )
        # the probe's auto λ̂ interval is priced in steps under a step budget (no timing
        # decides anything there), in seconds under a wall-clock one
        curvature_probe._follow_budget(self.budget.kind)
        self.curvature_probe = curvature_probe
        self._owns_entropy = (
            entropy_probe is None and model is not None and token_aware is not False
        )
        self.entropy_probe = entropy_probe
        if self._owns_entropy:
            try:
                self.entropy_probe = EntropyProbe(model, seed=component_seed(self.seed))
            except ProbeError:
                if token_aware:
                    raise
                self._owns_entropy = False  # not a causal LM: entropy features stay 0 (documented)
        n = len(self.optimizer.param_groups)
        self._guard_cs = (
            [
                self._guard_c if self._guard_c is not None else guard_constant(self.optimizer, g)
                for g in range(n)
            ]
            if self.guard
            else []
        )

    def remove(self) -> None:
        """Detach the scheduler's hooks and those of the probes it created."""
        super().remove()
        for owned, probe in (
            (getattr(self, "_owns_curvature", False), getattr(self, "curvature_probe", None)),
            (getattr(self, "_owns_entropy", False), getattr(self, "entropy_probe", None)),
        ):
            if owned and probe is not None:
                probe.remove()

    # ------------------------------------------------------------- planning
    def _initial_factors(self) -> list[float]:
        return self._factors_now()

    def _caps(self) -> list[float] | None:
        """Per-group guard caps on the LR factor, or ``None`` when the guard does not bind."""
        probe = self.curvature_probe
        if not self.guard or probe is None or probe.lambda_max_safe is None:
            return None
        initial = [g["initial_lr"] for g in self.optimizer.param_groups]
        return factor_caps(probe.lambda_max_safe, self._guard_cs, initial)

    def _prior_value(self) -> float:
        return 1.0 if self.prior is None else self.prior(self.budget.fraction_used)

    def _factors_now(self) -> list[float]:
        factor = self._prior_value() * math.exp(self._log_factor)
        factors = [factor] * len(self.optimizer.param_groups)
        caps = self._caps()
        if caps is not None:
            factors = [min(f, c) for f, c in zip(factors, caps, strict=True)]
        return factors

    def _plan(self, loss: float | None) -> list[float]:
        if loss is not None:
            self._positions.append(self._in_interval)
            self._losses.append(loss)
        self._in_interval += 1
        if self._in_interval >= self.config.decision_interval:
            self._decide()
        return self._factors_now()

    def _interval_mean(self) -> float | None:
        if not self._losses:
            return None
        n = len(self._losses)
        mean = math.fsum(x / n for x in self._losses)  # x / n: no overflow for huge losses
        return mean if math.isfinite(mean) else None

    def _decide(self) -> None:
        """End the interval: reward and learn from the last action, then draw the next one."""
        cfg = self.config
        mean = self._interval_mean()
        fraction = self.budget.fraction_used
        span = max(-math.log(self.lr_min_factor), math.log(self.lr_max_factor))
        state = self._state_features(
            mean=mean,
            positions=self._positions,
            losses=self._losses,
            interval=cfg.decision_interval,
            log_lr_factor=self._log_factor / span if span > 0 else 0.0,
            remaining_budget=1.0 - fraction,
            curvature=self.curvature_probe.last if self.curvature_probe is not None else None,
            entropy=self.entropy_probe.stats() if self.entropy_probe is not None else None,
        )
        reward = advantage = None
        if self._pending is not None:
            if mean is not None and self._prev_mean is not None:
                reward = interval_reward(
                    self._prev_mean, mean, fraction - self._prev_fraction, cfg.reward_clip
                )
            if reward is None:
                self.skipped_updates += 1
            elif self.baseline.value is None:
                self.baseline.update(reward)  # the first reward only initialises the baseline
            else:
                advantage = self._learn(*self._pending, reward)
                self.skipped_updates += advantage is None
        self._prev_mean, self._prev_fraction = mean, fraction
        self._positions, self._losses, self._in_interval = [], [], 0
        self._anti_windup()
        with torch.no_grad():
            mu, log_std = self.policy(state)
        u = float(mu) + math.exp(float(log_std)) * standard_normal(self.seed, self.decisions)
        action = cfg.max_log_step * math.tanh(u)
        lo, hi = math.log(self.lr_min_factor), math.log(self.lr_max_factor)
        self._log_factor = min(hi, max(lo, self._log_factor + action))
        self._pending = (state, u)
        self.last_decision = ReactorDecision(
            self.decisions,
            self._step_count,
            state,
            float(mu),
            math.exp(float(log_std)),
            action,
            reward,
            advantage,
        )
        self.decisions += 1

    def _anti_windup(self) -> None:
        """Pull ℓ down to the guard's cap so the integrator does not wind up above it."""
        caps = self._caps()
        prior = self._prior_value()
        if caps is not None and prior > 0:
            cap = min(caps) / prior
            if 0 < cap < math.exp(self._log_factor):
                self._log_factor = max(math.log(self.lr_min_factor), math.log(cap))

    def _learn(self, state: Tensor, u: float, reward: float) -> float | None:
        """One REINFORCE step on the pending decision; returns the advantage (None if skipped)."""
        advantage = reward - self.baseline.value
        mu, log_std = self.policy(state)
        loss = reinforce_loss(mu, log_std, u, advantage, self.config.entropy_bonus)
        self._policy_opt.zero_grad(set_to_none=True)
        loss.backward()
        grads = [p.grad for p in self.policy.parameters() if p.grad is not None]
        if not math.isfinite(float(loss.detach())) or not all(
            bool(torch.isfinite(g).all()) for g in grads
        ):
            self._policy_opt.zero_grad(set_to_none=True)
            return None
        self._policy_opt.step()
        self.baseline.update(reward)
        self.updates += 1
        return advantage

    # ---------------------------------------------------------------- state
    def _extra_state(self) -> dict[str, Any]:
        pending = self._pending
        return {
            "seed": self.seed,
            "decisions": self.decisions,
            "updates": self.updates,
            "skipped_updates": self.skipped_updates,
            "in_interval": self._in_interval,
            "positions": list(self._positions),
            "losses": list(self._losses),
            "log_factor": self._log_factor,
            "prev_mean": self._prev_mean,
            "prev_fraction": self._prev_fraction,
            "ref_loss": self._state_features.ref_loss,
            "ref_grad": self._state_features.ref_grad,
            "prev_entropy": self._state_features.prev_entropy,
            "pending_state": None if pending is None else pending[0].clone(),
            "pending_u": None if pending is None else pending[1],
            "baseline_raw": self.baseline.raw,
            "baseline_count": self.baseline.count,
            "policy": {k: v.clone() for k, v in self.policy.state_dict().items()},
            "policy_optimizer": copy.deepcopy(self._policy_opt.state_dict()),
            "curvature_probe": self.curvature_probe.state_dict() if self._owns_curvature else None,
            "entropy_probe": self.entropy_probe.state_dict() if self._owns_entropy else None,
        }

    def _check_extra_state(self, extra: dict[str, Any]) -> None:
        """Raise CheckpointError unless ``extra`` loads; builds and drops test copies only."""
        super()._check_extra_state(extra)
        bad = invalid_controller_entries(extra)
        if bad:
            raise CheckpointError(f"ReactorScheduler state has missing or invalid entries {bad}.")
        self._load_controller(extra)  # raises if the policy or its Adam state does not fit
        check_probe_state(
            self.curvature_probe if self._owns_curvature else None,
            extra["curvature_probe"],
            "curvature_probe",
        )
        check_probe_state(
            self.entropy_probe if self._owns_entropy else None,
            extra["entropy_probe"],
            "entropy_probe",
        )

    def _load_controller(self, extra: dict[str, Any]) -> tuple[nn.Module, torch.optim.Optimizer]:
        """A new policy and Adam loaded from ``extra``; the live ones are not touched."""
        cfg = self.config
        return load_controller(
            self.policy, extra, controller_lr=cfg.controller_lr, hidden_size=cfg.hidden_size
        )

    def _inner_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"policy_optimizer": self._policy_opt}

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        self.policy, self._policy_opt = self._load_controller(extra)
        self.seed = extra["seed"]
        self.decisions, self.updates = extra["decisions"], extra["updates"]
        self.skipped_updates, self._in_interval = extra["skipped_updates"], extra["in_interval"]
        self._positions, self._losses = (
            list(extra["positions"]),
            [float(x) for x in extra["losses"]],
        )
        self._log_factor = float(extra["log_factor"])
        self._prev_fraction = float(extra["prev_fraction"])
        opt = {k: None if extra[k] is None else float(extra[k]) for k in OPTIONAL_FLOAT_KEYS}
        self._prev_mean = opt["prev_mean"]
        feats = self._state_features
        feats.ref_loss, feats.ref_grad = opt["ref_loss"], opt["ref_grad"]
        feats.prev_entropy = opt["prev_entropy"]
        pending = extra["pending_state"]
        self._pending = (
            None if pending is None else (pending.double().clone(), float(extra["pending_u"]))
        )
        self.baseline.raw, self.baseline.count = (
            float(extra["baseline_raw"]),
            extra["baseline_count"],
        )
        self.last_decision = None
        if self._owns_curvature:
            self.curvature_probe.load_state_dict(extra["curvature_probe"])
        if self._owns_entropy:
            self.entropy_probe.load_state_dict(extra["entropy_probe"])
