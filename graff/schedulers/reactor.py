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
from typing import Any

import torch
from torch import Tensor, nn

from graff._seeding import component_seed
from graff.clock import BudgetClock
from graff.distributed import resolve_sync
from graff.errors import CheckpointError, GraffConfigError, GraffTypeError, ProbeError
from graff.guard import factor_caps, guard_constant
from graff.priors import BudgetPrior, make_prior
from graff.probes.curvature import CurvatureProbe
from graff.probes.entropy import EntropyProbe
from graff.schedulers.base import BudgetedScheduler
from graff.schedulers.reactor_config import ReactorConfig, reject_unexpected
from graff.schedulers.reactor_policy import (
    STATE_FEATURES,
    EmaBaseline,
    GaussianTanhPolicy,
    ReactorDecision,
    StateFeatures,
    interval_reward,
    reinforce_loss,
    standard_normal,
)
from graff.schedulers.reactor_state import (
    check_probe_state,
    invalid_controller_entries,
    load_controller,
)

__all__ = ["ReactorConfig", "ReactorDecision", "ReactorScheduler"]


def _check_probe_arguments(curvature_probe: Any, entropy_probe: Any, loss_fn: Any) -> None:
    """Raise GraffTypeError for a probe or ``loss_fn`` argument of the wrong type."""
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


class ReactorScheduler(BudgetedScheduler):
    """Policy-gradient LR controller (REACTOR) with an EMA reward baseline.

    A *reactive* controller: it follows no schedule, it reacts. Every ``decision_interval``
    optimizer steps it reads the state of training, draws a bounded change of the log-LR
    factor, and learns online (REINFORCE) from how much the loss improved per unit of budget
    in the interval that followed.

    **Policy.** :math:`u_k \\sim \\mathcal N(\\mu_\\phi(s_k), \\sigma_\\phi^2)`,
    :math:`a_k = a_{\\max}\\tanh u_k` (:class:`~graff.schedulers.reactor_policy.GaussianTanhPolicy`). The
    noise of decision :math:`k` comes from a generator seeded by ``(seed, k)``, so a resumed run
    replays it.

    **LR.** The actions are integrated:

    .. math::

        \\ell_k = \\operatorname{clip}(\\ell_{k-1} + a_k,\\ \\log f_{\\min},\\ \\log f_{\\max}),\\qquad
        \\eta_{g,t} = \\operatorname{clamp}\\bigl(\\eta_{g,0}\\, p(u_t)\\, e^{\\ell_k}\\bigr),

    :math:`\\eta_{g,0}` the initial LR of group :math:`g` (groups keep their ratios), :math:`p`
    the optional budget prior (``None``: :math:`p \\equiv 1`, purely reactive),
    :math:`f_{\\min}, f_{\\max}` = ``lr_min_factor``, ``lr_max_factor``. With ``guard=True``
    each group's factor is also capped by :func:`~graff.guard.factor_caps` of the curvature
    probe's ``lambda_max_safe`` (so :math:`\\eta_g\\hat\\lambda \\le c_g`), and :math:`\\ell`
    is pulled down to the cap so the integrator does not wind up above it; the final clamp
    always applies last.

    **State** (:class:`~graff.schedulers.reactor_policy.StateFeatures`): loss level and slope, the
    log-LR factor, gradient norm and secant ratio from a
    :class:`~graff.probes.curvature.CurvatureProbe`, the remaining budget and, for a causal
    LM, the logit-lens entropy of an :class:`~graff.probes.entropy.EntropyProbe`.

    **Reward and learning.** :math:`r_k` is the relative drop of the mean loss over interval
    :math:`k` per unit of budget (:func:`~graff.schedulers.reactor_policy.interval_reward`); with
    :math:`A_k = r_k - b_{k-1}`, :math:`b` the bias-corrected EMA of the rewards, one Adam
    step on :func:`~graff.schedulers.reactor_policy.reinforce_loss`. An interval without a finite loss or
    budget progress gives no reward: the update is skipped and counted in
    :attr:`skipped_updates`; the policy and baseline never see NaN. The full derivation is in
    ``docs/concepts/reactor.md``.

    Args:
        optimizer: Any torch optimizer.
        budget: A :class:`~graff.BudgetClock` or a number of seconds.
        model: Optional model: its forward ``.loss`` is captured, and for a causal LM an
            :class:`EntropyProbe` makes the controller token-aware.
        loss_fn: Optional closure for the curvature probe's λ̂ estimates (guard).
        prior: Optional budget prior (name or :class:`~graff.BudgetPrior`); ``None`` = reactive.
        guard: Cap the LR with the curvature probe's λ̂ (needs ``model=``, ``loss_fn=`` or a
            ``curvature_probe`` that estimates λ̂).
        curvature_probe: A probe to share (not saved in :meth:`state_dict`; save it yourself).
            ``None``: one is created (``hvp=guard``) and saved with the scheduler. Either way
            its ``auto`` λ̂ interval follows the budget (``cost_model``: steps under a step
            budget, measured seconds under a wall-clock one); a probe built with
            ``cost_model="seconds"`` is refused under a step budget.
        entropy_probe: An entropy probe to share (same rule). Build it with
            ``training_only=True`` (as the one created here is), or evaluation passes between
            steps change the readings the controller sees.
        seed: Non-negative integer seed; ``None`` draws one from the OS (saved in the state;
            under ``torch.distributed`` rank 0 draws it and every rank uses it).
        lr_min_factor: Lower clamp of the LR factor.
        lr_max_factor: Upper clamp of the LR factor.
        process_group: ``torch.distributed`` group to agree over (``None``: the default).
        distributed: ``None`` (auto), ``False`` or ``True``: reduce the rank-local inputs once
            per step so every rank plans the same LR; see :mod:`graff.distributed`.
        config: The controller's knobs, a :class:`ReactorConfig` (``None``: its defaults).

    Raises:
        GraffConfigError, GraffTypeError: for bad arguments (the message names the argument);
            a :class:`ReactorConfig` field passed here directly is a ``GraffTypeError``.
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

    plans_from_loss = True

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        budget: BudgetClock | float | int,
        *,
        model: nn.Module | None = None,
        loss_fn: Callable[[], Tensor] | None = None,
        prior: BudgetPrior | str | None = None,
        guard: bool = False,
        curvature_probe: CurvatureProbe | None = None,
        entropy_probe: EntropyProbe | None = None,
        seed: int | None = None,
        lr_min_factor: float = 1e-3,
        lr_max_factor: float = 100.0,
        process_group: Any = None,
        distributed: bool | None = None,
        config: ReactorConfig | None = None,
        **unexpected: Any,
    ) -> None:
        if unexpected:
            reject_unexpected(unexpected)
        if config is None:
            config = ReactorConfig()
        elif not isinstance(config, ReactorConfig):
            raise GraffTypeError(
                f"config must be a graff.ReactorConfig or None, got {type(config).__name__}."
            )
        self.config = config
        token_aware = config.token_aware
        if not isinstance(guard, bool):
            raise GraffTypeError(f"guard must be a bool, got {guard!r}.")
        if seed is None:
            sync = resolve_sync(process_group, distributed)
            seed = int.from_bytes(os.urandom(7), "little") if sync is None else sync.shared_seed()
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise GraffTypeError(f"seed must be a non-negative integer or None, got {seed!r}.")
        if seed < 0:
            raise GraffConfigError(f"seed must be a non-negative integer or None, got {seed!r}.")
        _check_probe_arguments(curvature_probe, entropy_probe, loss_fn)
        if guard and curvature_probe is None and model is None and loss_fn is None:
            raise GraffConfigError(
                "guard=True needs λ̂ from the curvature probe, which needs model= or loss_fn= "
                "(or pass curvature_probe= with hvp=True)."
            )
        if token_aware and model is None and entropy_probe is None:
            raise GraffConfigError(
                "ReactorConfig(token_aware=True) needs model= (a causal LM) or entropy_probe=."
            )
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
                self.entropy_probe = EntropyProbe(
                    model, seed=component_seed(self.seed), training_only=True
                )
            except ProbeError:
                if token_aware:
                    raise
                self._owns_entropy = False  # not a causal LM: entropy features stay 0 (documented)
        c = self.config.guard_c
        groups = range(len(self.optimizer.param_groups)) if self.guard else ()
        self._guard_cs = [guard_constant(self.optimizer, g) if c is None else c for g in groups]

    def remove(self) -> None:
        """Detach the scheduler's hooks and those of the probes it created."""
        super().remove()
        for probe in self._owned_probes().values():
            if probe is not None:
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
        c = self.config.guard_c
        for g in range(len(self._guard_cs), len(initial)):  # groups added since (add_param_group)
            self._guard_cs.append(guard_constant(self.optimizer, g) if c is None else c)
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
        reward, advantage = self._reward_and_learn(mean, fraction)
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

    def _reward_and_learn(
        self, mean: float | None, fraction: float
    ) -> tuple[float | None, float | None]:
        """Reward the interval the pending action governed and learn from it (if there is one)."""
        reward = advantage = None
        if self._pending is None:
            return reward, advantage
        if mean is not None and self._prev_mean is not None:
            reward = interval_reward(
                self._prev_mean, mean, fraction - self._prev_fraction, self.config.reward_clip
            )
        if reward is None:
            self.skipped_updates += 1
        elif self.baseline.value is None:
            self.baseline.update(reward)  # the first reward only initialises the baseline
        else:
            advantage = self._learn(*self._pending, reward)
            self.skipped_updates += advantage is None
        return reward, advantage

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
    def _owned_probes(self) -> dict[str, Any]:
        """The probes this scheduler created and saves, by state key (``None``: shared or none)."""
        owned = (getattr(self, "_owns_curvature", False), getattr(self, "_owns_entropy", False))
        probes = (getattr(self, "curvature_probe", None), getattr(self, "entropy_probe", None))
        keys = ("curvature_probe", "entropy_probe")
        return {k: p if own else None for k, own, p in zip(keys, owned, probes, strict=True)}

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
            **self._state_features.state_dict(),
            "pending_state": None if pending is None else pending[0].clone(),
            "pending_u": None if pending is None else pending[1],
            **self.baseline.state_dict(),
            "policy": {k: v.clone() for k, v in self.policy.state_dict().items()},
            "policy_optimizer": copy.deepcopy(self._policy_opt.state_dict()),
            **{k: None if p is None else p.state_dict() for k, p in self._owned_probes().items()},
        }

    def _check_extra_state(self, extra: dict[str, Any]) -> None:
        """Raise CheckpointError unless ``extra`` loads; builds and drops test copies only."""
        super()._check_extra_state(extra)
        bad = invalid_controller_entries(extra)
        if bad:
            raise CheckpointError(f"ReactorScheduler state has missing or invalid entries {bad}.")
        self._load_controller(extra)  # raises if the policy or its Adam state does not fit
        for key, probe in self._owned_probes().items():
            check_probe_state(probe, extra[key], key)

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
        self._prev_mean = None if extra["prev_mean"] is None else float(extra["prev_mean"])
        self._state_features.load_state_dict(extra)
        pending = extra["pending_state"]
        self._pending = (
            None if pending is None else (pending.double().clone(), float(extra["pending_u"]))
        )
        self.baseline.load_state_dict(extra)
        self.last_decision = None
        for key, probe in self._owned_probes().items():
            if probe is not None:
                probe.load_state_dict(extra[key])
