"""GraffScheduler: the learned, budget-aware LR planner (Graph-Recurrent Allocation of Fine-tuning Funds).

Per optimizer step :math:`t` the LR of parameter group :math:`g` is

.. math::

    \\eta_{t,g} = \\eta^0_g \\cdot \\min\\Bigl(p(u_t)\\,e^{\\sigma_t + r_t},\\
                 \\frac{c}{\\hat\\lambda_t\\,\\eta^0_{\\max}\\,m_{\\max}}\\Bigr),

clamped to ``[lr_min_factor, lr_max_factor] × η⁰_g``, where

- :math:`\\eta^0_g` is the group's initial LR (groups keep their ratios);
- :math:`p(u_t)` is the budget prior at the fraction of budget used :math:`u_t`
  (:class:`graff.priors.BudgetPrior`; by default warm-up, stable, then linear decay to zero over
  the last 20 % of the budget — "WSD");
- :math:`\\sigma_t` is the log peak factor of the peak-LR search
  (:class:`graff.planner.peak_search.PeakSearch`): during the first ``search_fraction`` of the
  budget it rises toward ``peak_max`` below a fraction of the stability limit, and backs off on
  instability; its fallback is 0, the user's LR under the prior alone;
- :math:`r_t = w\\cdot\\bar h_t + b` is the planner's learned residual, clipped to
  ``±log(residual_max)``, from the graph-recurrent encoder in :mod:`graff.planner.net`
  (:class:`graff.planner.online.OnlinePlanner` runs it); 0 with ``GraffConfig(planner=False)``;
- :math:`m_{t,i} = \\exp(\\rho\\tanh\\ell_{t,i})`, :math:`\\rho = \\log(\\text{multiplier_max})`,
  scales block :math:`i`'s applied update after ``optimizer.step()`` (exactly a per-block LR for
  any optimizer whose update is linear in the LR); :math:`m_{\\max} = \\max_i m_{t,i}`;
- the guard: after every plan the decoder :math:`(w, b)` is projected onto the half-space
  :math:`w\\cdot\\bar h_t + b \\le \\log(c/\\hat\\lambda_t) - o_t`
  (:func:`graff.guard.project_to_halfspace`), and the min above makes the bound hard.
  :math:`\\hat\\lambda_t` is the curvature probe's ``lambda_max_safe`` when the loss can be
  re-evaluated (``model=`` with a ``.loss`` output, or ``loss_fn=``); otherwise the secant
  tripwire is the (weaker) guard. Under loss evidence (``GraffConfig.loss_evidence``, on for
  adaptive optimizers) an estimate a healthy loss contradicts by more than 4× is set aside
  until the next one (``docs/concepts/guard.md``).

Online learning (two optimizers, one backward of the model): the hypergradient
:math:`\\partial L_{t+1}/\\partial\\log\\eta_t = \\langle g_{t+1}, \\Delta\\theta_t\\rangle`
(Baydin et al., ICLR 2018) arrives one step later from the curvature probe; its window cosine,
de-biased by its running mean, trains the planner (:mod:`graff.planner.online`;
``docs/concepts/graff.md`` derives the objective).

One step (:meth:`GraffScheduler._plan`) reads top to bottom: statistics (the probes' window,
the loss) → features (:mod:`graff.planner.features`) → planner (:class:`OnlinePlanner`) → peak
search (:class:`PeakSearch`) → guard → LR. The research knobs live in
:class:`graff.planner.config.GraffConfig`.

References:
    Baydin et al., "Online Learning Rate Adaptation with Hypergradient Descent", ICLR 2018,
    https://arxiv.org/abs/1703.04782. Wu et al., "Understanding Short-Horizon Bias in Stochastic
    Meta-Optimization", ICLR 2018, https://arxiv.org/abs/1803.02021. Li et al., "Budgeted
    Training", ICLR 2020, https://arxiv.org/abs/1905.04753. Cohen et al., "Gradient Descent on
    Neural Networks Typically Occurs at the Edge of Stability", ICLR 2021,
    https://arxiv.org/abs/2103.00065.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from graff._checks import check_optimizer_and_model, is_count
from graff.blocks import block_edges
from graff.clock import BudgetClock
from graff.errors import CheckpointError, GraffConfigError, GraffTypeError
from graff.guard import guard_constant, log_lr_bound
from graff.planner.config import GraffConfig, reject_unknown
from graff.planner.features import (
    EntropyTrend,
    SharedSignals,
    StatsWindow,
    make_curvature_probe,
    make_entropy_probe,
    node_features,
    stability_usage,
    window_cosines,
)
from graff.planner.net import DEFAULT_PLANNER, mean_adjacency, save_planner
from graff.planner.online import OnlinePlanner, make_planner
from graff.planner.peak_search import PeakSearch
from graff.priors import BudgetPrior, make_prior
from graff.probes.entropy import EntropyProbe
from graff.schedulers.base import BudgetedScheduler

#: Version of what GraffScheduler adds to the scheduler state (``state["extra"]``).
STATE_VERSION = 2
_OWN_STATE = ("version", "num_blocks", "log_factor", "guard_activations", "entropy_probe")


@dataclass(frozen=True)
class PlanRecord:
    """What GRAFF decided at one step (``sched.last_plan``), for logging and plots."""

    step: int
    fraction_used: float
    prior: float
    log_peak: float
    residual: float
    lr_factor: float
    guard_bound: float | None
    guard_bound_active: bool
    calibrating: bool
    multipliers: tuple[float, ...]


class GraffScheduler(BudgetedScheduler):
    """Budget-aware learned LR planner with an edge-of-stability guard (see module docstring).

    Args:
        optimizer: Any torch optimizer whose update is linear in ``lr``.
        budget: A :class:`~graff.BudgetClock` or a number of seconds.
        model: Optional model: LoRA modules become graph nodes, the forward loss is captured
            (``step()`` may omit the loss), the entropy probe hooks an early layer (with the
            planner), and the curvature probe re-runs captured inputs for λ̂.
        loss_fn: Optional closure returning the loss on a fixed probe batch (for λ̂).
        blocks: Optional mapping ``{name: parameters}`` overriding block discovery.
        adjacency: Optional pairs of block indices overriding the parsed graph.
        prior: Budget prior name or :class:`~graff.BudgetPrior`; ``None`` disables it (ablation).
            Default ``"wsd"``: warm-up over the first 5 %, stable, then linear decay to zero over
            the last 20 % of the budget. Another warm-up: ``BudgetPrior("wsd", warmup=0.1)``.
        warm_start: ``"default"`` (the planner shipped with graff, from
            ``python -m graff.pretrain``), the path of a planner saved by :meth:`save_planner`,
            or ``None`` (a fresh planner with a zero decoder). A path with
            ``GraffConfig(planner=False)`` is a ``GraffConfigError`` (it would be ignored).
        guard: Apply the stability guard.
        lr_min_factor: Lower clamp (× initial LR).
        lr_max_factor: Upper clamp (× initial LR).
        seed: Seed of the planner's initial weights and the probes (use the same on every rank).
        distributed: ``None`` (auto), ``False`` or ``True``: reduce the rank-local inputs (loss,
            probe statistics, rank 0's clock) once per step so every rank plans the same LR;
            see :mod:`graff.distributed`.
        process_group: ``torch.distributed`` group to agree over (``None``: the default).
        config: The ablation switches and tuning knobs (:class:`~graff.GraffConfig`; default:
            ``GraffConfig()``).

    Raises:
        GraffConfigError, GraffTypeError: On a bad argument (the message names it; a
            ``GraffConfig`` field passed here names ``config=``).
        CheckpointError: If ``warm_start`` is not a planner file.
        GraffConfigError: Sparse gradients (``nn.Embedding(sparse=True)``) are not supported:
            at construction when ``model`` has such a module, else at the first
            ``optimizer.step()`` that sees one. ``BudgetScheduler`` supports them.

    Examples:
        >>> import torch, graff
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        >>> sched = graff.GraffScheduler(opt, budget=graff.BudgetClock(steps=20))
        >>> for _ in range(20):
        ...     loss = model(torch.randn(8, 4)).pow(2).mean()
        ...     loss.backward(); opt.step(); sched.step(loss); opt.zero_grad()
        >>> sched.budget.exhausted, all(lr > 0 for lr in sched.get_last_lr())
        (True, True)
    """

    plans_from_loss = True

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        budget: BudgetClock | float | int,
        *,
        model: nn.Module | None = None,
        loss_fn: Callable[[], Tensor] | None = None,
        blocks: Mapping[str, Iterable[nn.Parameter]] | None = None,
        adjacency: Iterable[tuple[int, int]] | None = None,
        prior: BudgetPrior | str | None = "wsd",
        warm_start: str | Path | None = "default",
        guard: bool = True,
        lr_min_factor: float = 1e-3,
        lr_max_factor: float = 100.0,
        seed: int = 0,
        distributed: bool | None = None,
        process_group: Any = None,
        config: GraffConfig | None = None,
        **unknown: Any,
    ) -> None:
        reject_unknown(unknown)
        if config is None:
            config = GraffConfig()
        elif not isinstance(config, GraffConfig):
            raise GraffTypeError(
                f"config must be a graff.GraffConfig, got {type(config).__name__}."
            )
        check_optimizer_and_model(optimizer, model)
        if not config.planner and warm_start not in (DEFAULT_PLANNER, None):
            raise GraffConfigError(
                f"warm_start={str(warm_start)!r} loads a planner, but GraffConfig(planner=False) "
                "turns the planner off: drop one of the two."
            )
        self.config, self.guard = config, bool(guard)
        self.prior = make_prior(prior)
        self.guard_c = config.guard_c if config.guard_c is not None else guard_constant(optimizer)
        self.peak_search = PeakSearch.from_config(config, optimizer, guard=self.guard)
        self.entropies = EntropyTrend()
        self.guard_activations = 0  # steps where the guard bound the LR
        self._last_plan: PlanRecord | tuple[Any, ...] | None = None  # a tuple until read
        self.planner = make_planner(warm_start, edges=config.edges, seed=seed)
        self.curvature = make_curvature_probe(
            optimizer, model, blocks, loss_fn, config, self.guard, seed
        )
        self.entropy_probe: EntropyProbe | None = None
        try:
            self._build(model, adjacency, seed)
            super().__init__(
                optimizer,
                budget,
                model=model,
                lr_min_factor=lr_min_factor,
                lr_max_factor=lr_max_factor,
                process_group=process_group,
                distributed=distributed,
            )
            # the auto λ̂ interval is priced in steps under a step budget, in seconds otherwise
            self.curvature._follow_budget(self.budget.kind)
        except BaseException:  # a failed constructor leaves no hook on the optimizer/model
            self.curvature.remove()
            if self.entropy_probe is not None:
                self.entropy_probe.remove()
            raise

    def _build(self, model: nn.Module | None, adjacency: Any, seed: int) -> None:
        """The parts that need the probe's blocks: the graph, the runtime, the entropy probe."""
        config = self.config
        self.blocks = self.curvature.blocks
        self.edge_index = block_edges(self.blocks, adjacency)
        adjacency_matrix = mean_adjacency(self.edge_index, len(self.blocks))
        self.runtime = OnlinePlanner.from_config(self.planner, adjacency_matrix, config)
        self.window = StatsWindow(len(self.blocks))
        if config.entropy and config.planner:  # its signals are planner features only
            self.entropy_probe = make_entropy_probe(model, seed, config.probe_interval)
        self._log_factor = 0.0
        self._entropy_seconds = 0.0  # the entropy probe's time already reported
        self._own_seconds = 0.0  # step() and the entropy lens, λ̂ refreshes excluded

    # ----------------------------------------------------------------- step
    def step(self, loss: Any = None) -> None:  # type: ignore[override]
        """Plan and apply the LR for the next optimizer step (see ``BudgetedScheduler.step``).

        Its own time (λ̂ refreshes excluded) and the entropy probe's since the last step are
        reported to the curvature probe, whose ``auto`` refresh interval keeps the whole
        overhead to one target under a wall-clock budget; under a step budget the timings are
        only reported (``overhead_seconds()``).
        """
        t0 = time.perf_counter()
        allowance = self.peak_search.allowance
        refreshes = allowance.spent
        super().step(loss)
        spent = time.perf_counter() - t0 - (allowance.spent - refreshes)
        probe = self.entropy_probe
        if probe is not None:
            spent += probe.overhead_seconds - self._entropy_seconds
            self._entropy_seconds = probe.overhead_seconds
        self.curvature.add_step_cost(spent)
        self._own_seconds += max(spent, 0.0)

    def overhead_seconds(self) -> dict[str, float]:
        """Seconds of graff's own work since this scheduler was built (timings, not saved).

        ``per_step``: the curvature probe's hooks, the entropy lens and :meth:`step` (planner,
        peak search, guard), λ̂ estimates excluded. ``lambda_max``: every λ̂ estimate.
        """
        return {
            "per_step": self.curvature.hook_seconds + self._own_seconds,
            "lambda_max": self.curvature.estimate_seconds,
        }

    def _initial_factors(self) -> list[float]:
        factor = self._prior_value(0.0)
        self._log_factor = math.log(factor)
        return [factor] * len(self.optimizer.param_groups)

    def _prior_value(self, fraction_used: float) -> float:
        return self.prior(fraction_used) if self.prior is not None else 1.0

    def _plan(self, loss: float | None) -> list[float]:
        """One step: statistics → features → planner → peak search → guard → LR."""
        self.peak_search.tick()
        u = self.budget.fraction_used
        self._apply_multipliers()
        self.peak_search.observe(loss)
        replanned = self.config.planner and self._run_planner(u)
        prior = max(self._prior_value(u), 1e-12)
        log_prior = math.log(prior)
        bound = self._guard_bound()
        search = self.peak_search
        own = self._own_seconds  # step() and the entropy lens; the probe adds its own time
        if search.refresh_wanted(bound, log_prior, self.curvature, self.budget, own):
            if search.refresh(self.curvature):
                bound = self._guard_bound()
        search.step(
            u, log_prior, bound, loss=loss, nonfinite_losses=self.nonfinite_losses,
            probe=self.curvature, last_log_factor=self._log_factor,
        )  # fmt: skip
        if search.discredited >= 0:  # the loss contradicted this λ̂ (docs/concepts/guard.md)
            bound = None
        offset = log_prior + search.log_peak
        if replanned and bound is not None and self.guard:
            self.runtime.project(bound - offset)  # the guard on the decoder
        residual, logits = self.runtime.residual(replanned) if self.config.planner else (0.0, None)
        log_factor = search.limit(offset + residual, log_prior, self._log_factor)
        active = bound is not None and self.guard and log_factor > bound
        if active:  # the guard's hard min (no lower than a healthy raised peak, if kept)
            log_factor = max(
                bound, min(log_factor, search.guard_floor(log_prior, self._log_factor))
            )
            self.guard_activations += 1
            search.stop_at_guard()
        self._log_factor = log_factor
        multipliers = self.runtime.update_multipliers(logits, replanned)
        # PlanRecord's fields, in order; the record is built when someone reads last_plan
        self._last_plan = (
            self.last_epoch, u, prior, search.log_peak, residual, math.exp(log_factor),
            bound, active, search.searching, multipliers,
        )  # fmt: skip
        return [math.exp(log_factor)] * len(self.optimizer.param_groups)

    def _run_planner(self, u: float) -> bool:
        """Fold in this step's statistics; every ``plan_every`` steps build the features and run
        the planner (learning from the last window first). True when it ran."""
        self.window.add(self.curvature.last)
        self.entropies.observe(self.entropy_probe)
        if not self.runtime.replan_due():
            return False
        stats = self.window.stats()
        kappa = None if stats is None else window_cosines(stats)
        entropy = self.entropy_probe is not None
        shared = SharedSignals(
            budget_remaining=(1.0 - u) if self.config.budget_feature else 0.0,
            log_lr_factor=self._log_factor,
            loss_trend=self.peak_search.losses.trend(),
            entropy=self.entropies.level if entropy else 0.0,
            entropy_trend=self.entropies.tracker.trend() if entropy else 0.0,
            stability_usage=stability_usage(
                self._log_factor, self._guard_bound(), self.curvature.tripwire
            ),
            calibrating=self.peak_search.searching,
        )
        self.runtime.plan(node_features(len(self.blocks), shared, stats, kappa), kappa)
        self.window.reset()
        return True

    @property
    def last_plan(self) -> PlanRecord | None:
        """What GRAFF decided at the last step (:class:`PlanRecord`), ``None`` before a step."""
        plan = self._last_plan
        if isinstance(plan, tuple):
            plan = self._last_plan = PlanRecord(*plan)
        return plan

    def _guard_bound(self) -> float | None:
        """``log(c / (λ̂ · η⁰_max · m_max))`` in units of the LR factor, or None without λ̂."""
        lam = self.curvature.lambda_max_safe
        if lam is None:
            return None
        top_lr = max(float(g["initial_lr"]) for g in self.optimizer.param_groups)
        m_max = float(self.runtime.multipliers.max()) if self.config.block_multipliers else 1.0
        return log_lr_bound(lam, self.guard_c, offset=math.log(top_lr * m_max))

    def _apply_multipliers(self) -> None:
        """Scale each block's last applied update by its multiplier (a per-block LR)."""
        multipliers = self.runtime.multipliers
        if self.config.block_multipliers and not torch.all(multipliers == 1.0):
            self.curvature.scale_last_update(multipliers)

    # ---------------------------------------------------------------- state
    def _parts(self) -> dict[str, Any]:
        """The components that save and validate their own state, by state key."""
        return {
            "planner": self.runtime,
            "window": self.window,
            "peak_search": self.peak_search,
            "entropies": self.entropies,
            "curvature": self.curvature,
        }

    def _extra_state(self) -> dict[str, Any]:
        probe = self.entropy_probe
        return {
            "version": STATE_VERSION,
            "num_blocks": len(self.blocks),
            "log_factor": self._log_factor,
            "guard_activations": self.guard_activations,
            "entropy_probe": None if probe is None else probe.state_dict(),
        } | {name: part.state_dict() for name, part in self._parts().items()}

    def _check_extra_state(self, extra: dict[str, Any]) -> None:
        super()._check_extra_state(extra)
        if extra.get("version") != STATE_VERSION:
            raise CheckpointError(
                f"GraffScheduler state of version {extra.get('version')!r}; this graff reads "
                f"version {STATE_VERSION} (a state saved by an older graff cannot be resumed)."
            )
        missing = {*_OWN_STATE, *self._parts()} - set(extra)
        if missing:
            raise CheckpointError(f"GraffScheduler state is missing {sorted(missing)}.")
        if extra["num_blocks"] != len(self.blocks):
            raise CheckpointError(
                f"state was saved with {extra['num_blocks']} blocks, this scheduler has "
                f"{len(self.blocks)}."
            )
        count = extra["guard_activations"]
        if not is_count(count):
            raise CheckpointError(f"GraffScheduler state has guard_activations={count!r:.40}.")

    def _inner_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"planner_optimizer": self.runtime.optimizer}

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        for name, part in self._parts().items():
            part.load_state_dict(extra[name])
        if self.entropy_probe is not None and extra["entropy_probe"] is not None:
            self.entropy_probe.load_state_dict(extra["entropy_probe"])
        self._log_factor = float(extra["log_factor"])
        self.guard_activations = extra["guard_activations"]

    # ---------------------------------------------------------------- planner
    def save_planner(self, path: str | Path) -> Path:
        """Save the planner's weights (not its state h) for a warm start on another model."""
        return save_planner(self.planner, path)

    def remove(self) -> None:
        """Detach every hook of the scheduler and its probes."""
        super().remove()
        self.curvature.remove()
        if self.entropy_probe is not None:
            self.entropy_probe.remove()
