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
- :math:`\\sigma_t` is the *peak-LR calibration* (:class:`graff._graff_state.PeakCalibrator`):
  during the first ``search_fraction`` of the budget it rises geometrically toward ``peak_max``,
  but only up to ``c / (search_headroom · λ̂)`` (a quarter of the stability limit for
  adaptive optimizers, an eighth otherwise: the sharpness grows during training); the first
  sign of instability (loss rising above its best fast average, a non-finite loss, or the
  secant tripwire) returns it to the best level seen, or, when the user's LR itself is too
  high, sets it to the LR just reached divided by ``backoff``. Its fallback is always 0 — the
  user's LR under the prior alone. This is how GRAFF finds the peak LR the user did not tune
  (the biggest lever measured in the feasibility study), and why decreases come from the guard
  and instability, not from a greedy signal;
- :math:`r_t = w\\cdot\\bar h_t + b` is the planner's learned residual, clipped to
  ``±log(residual_max)``, from the graph-recurrent encoder in :mod:`graff.planner.net`;
- :math:`m_{t,i} = \\exp(\\rho\\tanh\\ell_{t,i})`, :math:`\\rho = \\log(\\text{multiplier_max})`,
  scales block :math:`i`'s applied update after ``optimizer.step()`` (exactly a per-block LR for
  any optimizer whose update is linear in the LR); :math:`m_{\\max} = \\max_i m_{t,i}`;
- the guard: after every planner update the decoder :math:`(w, b)` is projected onto the
  half-space :math:`w\\cdot\\bar h_t + b \\le \\log(c/\\hat\\lambda_t) - o_t`
  (:func:`graff.guard.project_to_halfspace`), and the min above makes the bound hard even where
  the residual clip would break it. :math:`\\hat\\lambda_t` is the curvature probe's
  ``lambda_max_safe`` (HVP power iteration, optimizer-aware) when the loss can be re-evaluated
  (``model=`` with a ``.loss`` output, or ``loss_fn=``); otherwise the secant tripwire is the
  (weaker) guard.

Online learning (two optimizers, one backward of the model): the hypergradient
:math:`\\partial L_{t+1}/\\partial\\log\\eta_t = \\langle g_{t+1}, \\Delta\\theta_t\\rangle`
(Baydin et al., ICLR 2018) arrives one step later from the curvature probe. Its one-step horizon
biases it toward small LRs (Wu et al., ICLR 2018; measured in ``notes/feasibility.md``), so GRAFF
uses it only as a *de-biased, bounded correction*: the cosine
:math:`\\kappa_t = \\langle g_{t+1}, \\Delta\\theta_t\\rangle / (\\lVert g_{t+1}\\rVert
\\lVert\\Delta\\theta_t\\rVert)` minus its slow running mean, so the planner learns from
deviations (steps that paid off better or worse than usual) and cannot drift systematically
down through a plateau. The planner's loss at step :math:`t+1`,

.. math::

    J = (\\kappa_t - \\bar\\kappa)\\, r_t + \\tfrac1N \\textstyle\\sum_i (\\kappa_{t,i} - \\bar\\kappa_i)
        \\log m_{t,i} + \\gamma\\,(r_t^2 + \\overline{\\log^2 m_t}),

is back-propagated through the stored encoder step (a graph of a few hundred floats) and Adam
(``planner_lr``) updates the planner; then the guard projection. The seed's compute-normalised
regret :math:`R_T = (L_T - L_\\text{best})/\\text{time}_T` has the same gradient direction
(``docs/concepts/graff.md`` derives it).

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

from graff._graff_checkpoint import GraffCheckpointMixin
from graff._graff_state import ExplosionWatch, LossTracker, PeakCalibrator, StatsWindow
from graff._planner_update import PlannerUpdate
from graff._refresh_budget import RefreshBudget
from graff._scheduler_base import BudgetedScheduler
from graff._validation import (
    check_in_range,
    check_optimizer_and_model,
    check_positive,
    check_positive_int,
)
from graff._warn import warn
from graff.blocks import block_edges
from graff.clock import BudgetClock
from graff.errors import GraffConfigError, ProbeError, ProbeWarning
from graff.guard import guard_constant, log_lr_bound, project_to_halfspace
from graff.planner.net import PlannerNet, load_planner, mean_adjacency, save_planner
from graff.priors import BudgetPrior, make_prior
from graff.probes.curvature import CurvatureProbe, estimate_cost_steps
from graff.probes.entropy import EntropyProbe
from graff.probes.preconditioner import preconditioner_kind


def _cold_start(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """CurvatureProbe settings of the first λ̂ estimate under GraffScheduler.

    Adaptive optimizers (no estimate before step 10, and the peak search holds until one
    exists): the probe's 20 Hessian-vector products in three chunks (7, 7, 6) on steps 10-12
    (published after the last), instead of all 20 in one step (~1 s, ~36 step times on the tiny
    LoRA benchmark task): two more forward/backward passes in all, about a third of the spike.
    Ten products in all were tried and rejected: on the LoRA task, AdamW's preconditioned λ̂
    came out ~2× lower (1.6e3 vs 2.9e3), the guard let the LR climb to 2× higher at the user's
    LR × 10, and the held-out loss was worse (2.266 vs 2.218, 200 steps, seed 0).
    SGD-type optimizers keep one 20-product estimate in their first step: their guard must bind
    at once, the user's LR may diverge from the first step.
    """
    if preconditioner_kind(optimizer) is None:
        return {}
    return {"chunk_iters": 7}


_REFRESH_ITERS = 6  # Hessian-vector products of a λ̂ refresh the peak search asks for


def default_headroom(optimizer: torch.optim.Optimizer) -> float:
    r"""The peak search's default ``search_headroom``: 4 for adaptive optimizers, else 8.

    The search rises only while :math:`\eta\hat\lambda \le c/\text{headroom}`, leaving room for
    the sharpness to grow as training goes on. Under plain (momentum) SGD :math:`\lambda_{\max}
    (H)` does not depend on the LR and grows during training (progressive sharpening), so the
    margin is wide (8). Under Adam-type optimizers the *preconditioned* sharpness adapts to the LR
    (adaptive edge of stability, Cohen et al. 2022): measured on the benchmark's GSM8K
    char-level transformer with AdamW under a fixed WSD schedule, :math:`\hat\lambda \approx
    9\cdot 10^3` at LR 1e-3 but :math:`\approx 4\cdot 10^3` at 3e-3 (the best tuned LR), so
    :math:`\eta\hat\lambda` grows far slower than :math:`\eta` and stayed at 0.2-0.45 of the
    threshold 38 at both; an eighth of the limit stopped the search below the user's LR there.
    Chosen on the benchmark's quality-floor cells (3 seeds, LR × 0.1/1/10, three tasks; see
    ``docs/concepts/graff.md``): 4 held all nine, 2 and 3 lost LoRA at × 10, 5 and 8 gave up
    most of the char transformer's gain at × 1.
    """
    return 4.0 if preconditioner_kind(optimizer) is not None else 8.0


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


class GraffScheduler(GraffCheckpointMixin, BudgetedScheduler):
    """Budget-aware learned LR planner with an edge-of-stability guard (see module docstring).

    Args:
        optimizer: Any torch optimizer whose update is linear in ``lr``.
        budget: A :class:`~graff.BudgetClock` or a number of seconds.
        model: Optional model: LoRA modules become graph nodes, the forward loss is captured
            (``step()`` may omit the loss), the entropy probe hooks an early layer, and the
            curvature probe re-runs captured inputs for λ̂.
        blocks: Optional mapping ``{name: parameters}`` overriding block discovery.
        adjacency: Optional pairs of block indices overriding the parsed graph.
        loss_fn: Optional closure returning the loss on a fixed probe batch (for λ̂).
        prior: Budget prior name or :class:`~graff.BudgetPrior`; ``None`` disables it (ablation).
            Default ``"wsd"``: warm-up, stable, then linear decay to zero over the last 20 % of
            the budget. On the benchmark's short budgets it beat linear decay from the start
            (the peak search runs during the stable phase); ``"linear"`` is the other strong
            choice (Bergsma et al., 2025).
        warmup: Warm-up fraction of the prior (when ``prior`` is a name).
        planner_lr: Adam LR of the planner (the seed's 1e-3).
        online: Train the planner online (``False``: the frozen-planner ablation; with the
            shipped planner and ``probe_every=10`` it measured 1.904 against 1.792 online
            on the benchmark's char transformer, level elsewhere: keep it on).
        edges: Message passing between blocks (``False``: the no-edges/MLP ablation).
        budget_feature: Feed the remaining budget to the planner (``False``: ablation).
        calibrate: Search the peak LR during the first ``search_fraction`` of the budget.
        search_fraction: Fraction of the budget the peak-LR search may use.
        peak_max: Largest peak factor the search may reach (× the user's LR).
        backoff: Factor the LR is divided by when instability is detected at or below the
            user's LR (a raised LR returns to the best level seen instead).
        search_headroom: The search (and a positive learned residual) raise the LR above the
            prior alone only up to ``c / (search_headroom · λ̂)``, a fraction of the stability
            limit (room for the sharpness to grow during training); never lowers the user's LR.
            ``None``: optimizer-aware (:func:`default_headroom`: 4 for Adam-type and other
            adaptive optimizers, 8 otherwise).
        refresh_budget: Fraction of the run's projected training time the peak search's extra
            λ̂ refreshes may use (:class:`graff._refresh_budget.RefreshBudget`): measured seconds
            under a wall-clock budget, training steps (a refresh priced from its product count)
            under a step budget; 0 turns them off (the search then holds at its ceiling).
        block_multipliers: Learn per-block multipliers of the applied update (off by default:
            on a GSM8K char-level transformer they cost 0.02–0.05 nats, as the feasibility
            study also found — per-block signals are mostly noise).
        multiplier_max: Multipliers lie in ``[1/multiplier_max, multiplier_max]``.
        residual_max: The learned residual lies in ``[1/residual_max, residual_max]`` (a bounded
            correction: ±25 % by default).
        guard: Apply the stability guard.
        guard_c: Guard constant ``c``; default optimizer-aware (:func:`graff.guard_constant`).
        curvature_every: λ̂ refresh interval in steps, or ``"auto"``: the refreshes get what the
            per-step work (probes, planner, guard) leaves of a 1 % overhead target, at least a
            quarter of it (``CurvatureProbe(share_step_costs=True)``, ``docs/concepts/graff.md``).
            Priced from measured times under a wall-clock budget; under a step budget from
            product counts alone (``CurvatureProbe(cost_model="steps")``: that quarter, every
            2800 steps), so that the run is bit-reproducible.
        plan_every: Run the planner (features, encoder, online update, projection) every this
            many optimizer steps; in between the LR follows the prior, the peak search and the
            guard every step with the residual held. The online signal is then the hypergradient
            summed over the window — the exact derivative for a residual held over it, and a
            ``plan_every``-step horizon instead of one step. Amortises the planner's cost.
        probe_every: The per-step probes sample every this many steps: the curvature probe's
            hypergradient/secant statistics (``stats_every``) and the entropy probe's logit lens
            (``every``); between samples their hooks only count. The planner's window features
            are ratios of sums and means over the sampled steps, so a fixed stride estimates
            them without bias at ``1/probe_every`` of the cost; 1 samples every step. The
            default 10 (= ``plan_every``: one sample per planning window) keeps the probes'
            share of a 75 ms CPU step near 0.3 %; on the benchmark's nine floor cells it
            matched ``probe_every=2`` (``docs/concepts/graff.md``). Keep it ≤ ``plan_every``,
            or some windows hold no sample (the planner then skips that online update).
        learn_every: With ``online``, update the planner at every this many plans (on that
            window's hypergradient cosine); the planning forward passes in between run without
            a graph. 1 updates at every plan.
        entropy: Use the entropy probe when a model is given.
        warm_start: ``"default"`` (the planner shipped with graff, meta-trained offline by
            ``python -m graff.pretrain``), the path of a planner saved by :meth:`save_planner`,
            or ``None`` (a fresh planner with a zero decoder: the prior and the peak search
            alone until online learning moves it).
        lr_min_factor: Lower clamp (× initial LR).
        lr_max_factor: Upper clamp (× initial LR).
        seed: Seed of the planner's initial weights (use the same on every rank).
        process_group: ``torch.distributed`` group to agree over (``None``: the default).
        distributed: ``None`` (auto), ``False`` or ``True``: reduce the rank-local inputs (loss,
            probe statistics, rank 0's clock) once per step so every rank plans the same LR;
            see :mod:`graff.distributed`.

    Raises:
        GraffConfigError, GraffTypeError: On a bad argument (the message names it).
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

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        budget: BudgetClock | float | int,
        *,
        model: nn.Module | None = None,
        blocks: Mapping[str, Iterable[nn.Parameter]] | None = None,
        adjacency: Iterable[tuple[int, int]] | None = None,
        loss_fn: Callable[[], Tensor] | None = None,
        prior: BudgetPrior | str | None = "wsd",
        warmup: float = 0.05,
        planner_lr: float = 1e-3,
        online: bool = True,
        edges: bool = True,
        budget_feature: bool = True,
        calibrate: bool = True,
        search_fraction: float = 0.15,
        peak_max: float = 10.0,
        backoff: float = 3.0,
        search_headroom: float | None = None,
        refresh_budget: float = 0.1,
        block_multipliers: bool = False,
        multiplier_max: float = 2.0,
        residual_max: float = 1.25,
        guard: bool = True,
        guard_c: float | None = None,
        curvature_every: int | str = "auto",
        plan_every: int = 10,
        probe_every: int = 10,
        learn_every: int = 1,
        entropy: bool = True,
        warm_start: str | Path | None = "default",
        lr_min_factor: float = 1e-3,
        lr_max_factor: float = 100.0,
        seed: int = 0,
        process_group: Any = None,
        distributed: bool | None = None,
    ) -> None:
        check_optimizer_and_model(optimizer, model)
        self.prior = (
            make_prior(prior, warmup=warmup) if isinstance(prior, str) else make_prior(prior)
        )
        self.planner_lr = check_positive("planner_lr", planner_lr)
        self.plan_every = check_positive_int("plan_every", plan_every)
        self.probe_every = check_positive_int("probe_every", probe_every)
        self.learn_every = check_positive_int("learn_every", learn_every)
        self.online, self.edges, self.budget_feature = (
            bool(online),
            bool(edges),
            bool(budget_feature),
        )
        self.block_multipliers, self.guard = bool(block_multipliers), bool(guard)
        self._log_mult_max = math.log(check_in_range("multiplier_max", multiplier_max, 1.0, 10.0))
        self._log_residual_max = math.log(check_in_range("residual_max", residual_max, 1.0, 100.0))
        self.guard_c = None if guard_c is None else check_positive("guard_c", guard_c)
        self._guard_c = self.guard_c if self.guard_c is not None else guard_constant(optimizer)
        self.calibrator = PeakCalibrator(
            enabled=bool(calibrate),
            search_fraction=check_in_range(
                "search_fraction", search_fraction, 0.0, 1.0, low_open=True
            ),
            peak_max=check_in_range("peak_max", peak_max, 1.0, 1e4),
            backoff=check_in_range("backoff", backoff, 1.0, 1e3, low_open=True),
            headroom=(
                default_headroom(optimizer)
                if search_headroom is None
                else check_in_range("search_headroom", search_headroom, 1.0, 1e3)
            ),
        )
        self.refreshes = RefreshBudget(check_in_range("refresh_budget", refresh_budget, 0.0, 1.0))
        self.losses = LossTracker()
        self.explosion = ExplosionWatch()
        self.entropies = LossTracker()
        self.guard_activations = 0  # steps where the guard bound the LR
        self.guard_projections = 0  # planner updates the projection changed
        self.planner_updates = 0
        self.skipped_planner_updates = 0
        self._last_plan: PlanRecord | tuple[Any, ...] | None = None  # a tuple until read
        self.planner = _make_planner(warm_start, edges=self.edges, seed=seed)
        self.planner_optimizer = _planner_adam(self.planner, self.planner_lr)
        self._update = PlannerUpdate(
            list(self.planner.parameters()),
            self.planner.encoder_parameters(),
            self.planner_optimizer,
        )
        self.curvature = CurvatureProbe(
            optimizer,
            model=model,
            blocks=blocks,
            loss_fn=loss_fn,
            every=curvature_every,
            hvp=self.guard and (model is not None or loss_fn is not None),
            seed=seed,
            # block multipliers rescale the applied update Δθ, so they need it every step
            stats_every=1 if self.block_multipliers else self.probe_every,
            # the multipliers rescale the applied update and need it exactly; the statistics
            # alone are sums over many entries, which one bfloat16 rounding barely moves
            # (median relative error 3-9e-5 on the LoRA task: docs/concepts/probes.md)
            update_dtype=None if self.block_multipliers else torch.bfloat16,
            # the λ̂ refresh interval leaves the estimates what the per-step costs (probes,
            # planner, guard: reported by step()) leave of the 1 % overhead target
            share_step_costs=True,
            **_cold_start(optimizer),
        )
        self.entropy_probe: EntropyProbe | None = None
        try:
            self.blocks = self.curvature.blocks
            self.edge_index = block_edges(self.blocks, adjacency)
            self._adjacency = mean_adjacency(self.edge_index, len(self.blocks))
            self.entropy_probe = _make_entropy_probe(model, entropy, seed, self.probe_every)
            self.h = self.planner.initial_state(len(self.blocks))
            self._pending: tuple[Tensor, Tensor] | None = None  # (x_t, h_{t-1}) awaiting feedback
            self._pending_graph: tuple[Tensor, int] | None = None  # (h_t with its graph, version)
            self._kappa_mean = torch.zeros(len(self.blocks) + 1)
            self._multipliers = torch.ones(len(self.blocks))
            self._log_factor = 0.0
            self._nonfinite_seen = 0
            self._window = StatsWindow(len(self.blocks))
            self._steps_since_plan = 0
            self._plans = 0  # planner runs so far
            self._decoded: tuple[float, Tensor | None] | None = None  # decoder output, per plan
            self._multiplier_tuple: tuple[float, ...] | None = None
            self._entropy_pass: int | None = None  # the entropy probe's pass last averaged
            self._entropy_seconds = 0.0  # the entropy probe's time already reported
            self._own_seconds = 0.0  # step() and the entropy lens, λ̂ refreshes excluded
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

    # ----------------------------------------------------------------- plan
    def step(self, loss: Any = None) -> None:  # type: ignore[override]
        """Plan and apply the LR for the next optimizer step (see ``BudgetedScheduler.step``).

        Its own time (λ̂ refreshes excluded) and the entropy probe's since the last step are
        reported to the curvature probe, whose ``auto`` refresh interval keeps the whole
        overhead to one target (``CurvatureProbe(share_step_costs=True)``) under a wall-clock
        budget; under a step budget the timings are only reported (``overhead_seconds()``).
        """
        t0 = time.perf_counter()
        refreshes = self.refreshes.spent
        super().step(loss)
        spent = time.perf_counter() - t0 - (self.refreshes.spent - refreshes)
        probe = self.entropy_probe
        if probe is not None:
            spent += probe.overhead_seconds - self._entropy_seconds
            self._entropy_seconds = probe.overhead_seconds
        self.curvature.add_step_cost(spent)
        self._own_seconds += max(spent, 0.0)

    def overhead_seconds(self) -> dict[str, float]:
        """Seconds of graff's own work since this scheduler was built (timings, not saved).

        ``per_step``: the curvature probe's hooks, the entropy lens and :meth:`step` (planner,
        peak search, guard), λ̂ estimates excluded — the cost every step pays. ``lambda_max``:
        every λ̂ estimate (the first one, the scheduled refreshes and the ones the peak search
        asks for). Divide by the run's wall time for fractions.
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
        self.refreshes.tick()
        u = self.budget.fraction_used
        self._apply_multipliers()
        self._window.add(self.curvature.last)
        self.losses.update(loss)
        probe = self.entropy_probe
        if probe is not None and probe.decoded_pass not in (None, self._entropy_pass):
            self._entropy_pass = probe.decoded_pass  # each decoded pass counts once
            self.entropies.update(_entropy_mean(probe))
        self._steps_since_plan += 1
        replan = self._pending is None or self._steps_since_plan >= self.plan_every
        if replan:
            stats = self._window.stats()
            kappa = None if stats is None else _window_cosines(stats)
            if self._learn_due() and self._pending is not None and kappa is not None:
                self._learn(kappa)
            x = self._features(stats, kappa, u)
            self._plans += 1
            keep = self._learn_due()  # the next plan learns from this window
            with torch.set_grad_enabled(keep):
                h = self.planner(x, self.h, self._adjacency)
            self._pending, self.h = (x, self.h), h.detach()
            # the next online update backpropagates through this very forward pass (the encoder
            # does not change in between) instead of re-running it
            self._pending_graph = (h, self._update.encoder_version()) if keep else None
            self._window.reset()
            self._steps_since_plan = 0
        return self._decide(u, loss, self.h, replan)

    def _learn_due(self) -> bool:
        """Whether the plan after ``self._plans`` completed ones updates the planner online."""
        return self.online and self._plans % self.learn_every == 0

    def _decide(self, u: float, loss: float | None, h: Tensor, replan: bool) -> list[float]:
        prior = max(self._prior_value(u), 1e-12)
        log_prior = math.log(prior)
        bound = self._refreshed_bound(self._guard_log_bound(), log_prior)
        nonfinite = loss is None and self.nonfinite_losses > self._nonfinite_seen
        exploding = self.explosion.update(loss, nonfinite)
        unstable = self._unstable(loss, bound, u)
        # Rise toward the stability limit only once the guard can see it (when it can at all),
        # and only up to a fraction 1/search_headroom of it (PeakCalibrator, rules 1-3).
        hold = self.guard and self.curvature.hvp and bound is None
        ceiling = self.calibrator.ceiling(bound) if self.guard else None
        losses = self.losses
        at_best = losses.count >= losses.min_count and losses.fast <= losses.best
        if self.calibrator.update(
            u,
            log_prior,
            unstable,
            hold=hold,
            log_ceiling=ceiling,
            at_best=at_best,
            exploding=exploding,
        ) or (self.calibrator.cooldown > 0):
            # Re-baseline the loss average through the cool-down: it is still catching up with
            # the excursion that caused the back-off, which is not a new instability.
            self.losses.reset_best()
        offset = log_prior + self.calibrator.log_peak
        if replan and bound is not None and self.guard:
            # Never project the decoder below its clip range: the hard min below enforces
            # the rest, and the decoder stays where online learning can move it back.
            target = max(bound - offset, -self._log_residual_max)
            w, b = project_to_halfspace(
                self.planner.lr_w.data, self.planner.lr_b.data, h.mean(0), target
            )
            if not (
                torch.equal(w, self.planner.lr_w.data) and torch.equal(b, self.planner.lr_b.data)
            ):
                self.guard_projections += 1
                self.planner.lr_w.data.copy_(w)
                self.planner.lr_b.data.copy_(b)
        if replan or self._decoded is None:  # h and the decoder change only when planning
            self._decoded = self._log_residual(h)
        residual, logits = self._decoded
        log_factor = offset + residual
        if ceiling is not None and not math.isnan(ceiling):
            # What GRAFF adds above the prior alone (search + residual) obeys the search's
            # ceiling too; a negative residual is always allowed.
            log_factor = min(log_factor, log_prior + max(0.0, ceiling))
        active = bound is not None and self.guard and log_factor > bound
        if active:
            log_factor = bound
            self.guard_activations += 1
            self.calibrator.searching = False  # the peak search stops at the stability limit
        self._log_factor = log_factor
        if self.block_multipliers and (replan or self._multiplier_tuple is None):
            self._multipliers = torch.exp(self._log_mult_max * torch.tanh(logits)).float()
            self._multiplier_tuple = None
        if self._multiplier_tuple is None:
            self._multiplier_tuple = tuple(self._multipliers.tolist())
        # PlanRecord's fields, in order; the record is built when someone reads last_plan
        self._last_plan = (
            self.last_epoch,
            u,
            prior,
            self.calibrator.log_peak,
            residual,
            math.exp(log_factor),
            bound,
            active,
            self.calibrator.searching,
            self._multiplier_tuple,
        )
        return [math.exp(log_factor)] * len(self.optimizer.param_groups)

    @property
    def last_plan(self) -> PlanRecord | None:
        """What GRAFF decided at the last step (:class:`PlanRecord`), ``None`` before a step."""
        plan = self._last_plan
        if isinstance(plan, tuple):
            plan = self._last_plan = PlanRecord(*plan)
        return plan

    def _log_residual(self, h: Tensor) -> tuple[float, Tensor | None]:
        """The clipped residual, and the multiplier logits when block multipliers are on."""
        with torch.no_grad():
            if self.block_multipliers:
                residual, logits = self.planner.decode(h)
                logits = torch.nan_to_num(logits)
            else:
                residual, logits = self.planner.decode_residual(h), None
        r = float(residual.clamp(-self._log_residual_max, self._log_residual_max))
        return (r if math.isfinite(r) else 0.0), logits

    def _guard_log_bound(self) -> float | None:
        """``log(c / (λ̂ · η⁰_max · m_max))`` in units of the LR factor, or None without λ̂."""
        lam = self.curvature.lambda_max_safe
        if lam is None:
            return None
        c = self._guard_c
        top_lr = max(float(g["initial_lr"]) for g in self.optimizer.param_groups)
        m_max = float(self._multipliers.max()) if self.block_multipliers else 1.0
        return log_lr_bound(lam, c, offset=math.log(top_lr * m_max))

    def _refreshed_bound(self, bound: float | None, log_prior: float) -> float | None:
        """The guard bound, after re-measuring λ̂ if a stale estimate may be holding the LR down.

        A refresh (at most every 10 steps) is asked for when the search is stopped by its
        ceiling, or when the guard cuts the LR below the prior alone (the user's LR): an early
        estimate of Adam's preconditioned sharpness can be far too large while the second-moment
        estimates are young, and the scheduled refresh may be hundreds of steps away.
        """
        if bound is None or not (self.guard and self.curvature.hvp and self.calibrator.enabled):
            return bound
        stale = (self.calibrator.capped and self.calibrator.searching) or bound < log_prior
        if not (stale and self.calibrator.refresh_due() and self._refresh_affordable()):
            return bound
        t0 = time.perf_counter()
        try:
            # Warm-started from the last eigenvector: 6 products came within 1.5x of 20 from a
            # fresh start (char transformer, AdamW, steps 20-80) at a third of the cost.
            self.curvature.estimate_lambda_max(_REFRESH_ITERS)
        except ProbeError:
            return bound
        finally:
            self.refreshes.charge(time.perf_counter() - t0)
        return self._guard_log_bound()

    def _refresh_affordable(self) -> bool:
        """Whether the refresh budget allows one more extra λ̂ refresh.

        Under a step budget from counts alone (a refresh priced by
        :func:`~graff.probes.curvature.estimate_cost_steps`, the run being the budget's steps),
        so the decision is the same on every run; under a wall-clock budget from measured
        times (rank 0 decides).
        """
        if self.curvature.cost_model == "steps":
            cost = estimate_cost_steps(_REFRESH_ITERS)
            return self.refreshes.affordable_steps(cost, self.budget.total)
        spent = self.curvature.overhead_seconds
        ok = self.refreshes.affordable(spent, spent, self.budget.fraction_used)
        sync = self.curvature.sync
        if sync is not None:  # timings differ between ranks; every rank must agree
            ok = sync.from_rank0(1.0 if ok else 0.0) > 0.5
        return ok

    def _unstable(self, loss: float | None, bound: float | None, u: float) -> bool:
        """Loss- or secant-based sign of instability (drives the peak-LR back-off).

        The guard itself caps the LR where λ̂ is known and ends the search when it binds; it does
        not also back off the peak (early Adam preconditioners make λ̂ noisy).
        """
        if loss is None and self.nonfinite_losses > self._nonfinite_seen:
            self._nonfinite_seen = self.nonfinite_losses
            return True  # a non-finite loss: back off
        if self.losses.rising(tolerance=0.05 if self.calibrator.watching(u) else 0.5):
            return True
        if bound is not None:  # λ̂ is known: the guard, not the secant, watches stability
            return False
        tripwire = self.curvature.tripwire
        if tripwire is not None and tripwire > 2.0:
            return self.losses.rising(tolerance=0.05)  # q > 2 alone is common under momentum
        return False

    # -------------------------------------------------------------- features
    def _features(self, stats: Any, kappa: Tensor | None, u: float) -> Tensor:
        entropy = self.entropy_probe is not None
        shared = [  # the features every node shares, in FEATURE_NAMES order (3-5 per block)
            (1.0 - u) if self.budget_feature else 0.0,
            self._log_factor / math.log(10.0),
            self.losses.trend(),
            0.0,
            0.0,
            0.0,
            (self.entropies.fast if self.entropies.count else 0.0) if entropy else 0.0,
            self.entropies.trend() if entropy else 0.0,
            self._stability_usage(),
            1.0 if self.calibrator.searching else 0.0,
        ]
        x = torch.tensor(shared, dtype=torch.float32).repeat(len(self.blocks), 1)
        if stats is not None and kappa is not None:
            usq = stats.update_sq_norm.clamp_min(1e-30)
            x[:, 3:6] = torch.stack(
                [
                    kappa[1:],  # the per-block hypergradient cosines
                    torch.tanh(stats.secant_ratio / 2.0),
                    torch.tanh(0.25 * torch.log(usq / usq.mean())),
                ],
                dim=1,
            )
        return torch.nan_to_num(x, nan=0.0, posinf=1.0, neginf=-1.0)

    def _stability_usage(self) -> float:
        bound = self._guard_log_bound()
        if bound is not None and math.isfinite(bound):
            return min(2.0, math.exp(self._log_factor - bound))
        tripwire = self.curvature.tripwire
        return min(2.0, tripwire / 2.0) if tripwire is not None else 0.0

    # --------------------------------------------------------------- learning
    def _learn(self, kappa: Tensor) -> None:
        """One Adam step of the planner on the de-biased hypergradient cosine (module docstring).

        ``kappa``: the window's cosines, the whole model's first, then one per block
        (:func:`_window_cosines`).
        """
        if not bool(torch.isfinite(kappa).all()):
            self.skipped_planner_updates += 1
            return
        advantage = kappa - self._kappa_mean
        self._kappa_mean.mul_(0.99).add_(kappa, alpha=0.01)
        x, h_prev = self._pending
        graph, self._pending_graph = self._pending_graph, None
        if graph is not None and graph[1] == self._update.encoder_version():
            h = graph[0]
        else:  # after a resume (graphs are not saved) or an edit of the weights: re-run it
            h = self.planner(x, h_prev, self._adjacency)
        if self.block_multipliers:
            residual, logits = self.planner.decode(h)
        else:
            residual, logits = self.planner.decode_residual(h), None
        objective = advantage[0] * residual + 1e-2 * residual.pow(2)
        if logits is not None:
            log_m = self._log_mult_max * torch.tanh(logits)
            objective = objective + (advantage[1:] * log_m).mean() + 1e-2 * log_m.pow(2).mean()
        if self._update.step(objective, max_norm=1.0):
            self.planner_updates += 1
        else:
            self.skipped_planner_updates += 1

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles drop the kept planning graph (an autograd graph cannot be copied);
        a copy's next online update re-runs the encoder. Checkpoint with :meth:`state_dict`."""
        state = super().__getstate__()  # hooks are not copied: the copy registers its own
        state["_pending_graph"] = None
        return state

    def _apply_multipliers(self) -> None:
        """Scale each block's last applied update by its multiplier (a per-block LR)."""
        if self.block_multipliers and not torch.all(self._multipliers == 1.0):
            self.curvature.scale_last_update(self._multipliers)

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


def _window_cosines(stats: Any) -> Tensor:
    """``κ = cos(g_{s+1}, Δθ_s)`` over a window: the whole model's (sums over blocks) first,
    then one per block, as one ``[blocks + 1]`` vector."""
    cols = torch.stack([stats.hypergrad, stats.grad_sq_norm, stats.update_sq_norm])
    cols = torch.cat([cols.sum(1, keepdim=True), cols], dim=1)
    return _cosine(*cols.unbind(0))


def _cosine(dot: Tensor, a_sq: Tensor, b_sq: Tensor) -> Tensor:
    """``dot / sqrt(a_sq · b_sq)`` clipped to [-1, 1]; 0 where a norm vanishes."""
    den = torch.sqrt(a_sq.clamp_min(0) * b_sq.clamp_min(0))
    out = torch.where(den > 0, dot / den.clamp_min(1e-30), torch.zeros_like(dot))
    return out.clamp(-1.0, 1.0)


def _entropy_mean(probe: EntropyProbe) -> float | None:
    """``mean / log(vocab)`` of the last forward's sampled entropies (``stats().normalized_mean``)."""
    mean, vocab = probe.mean_entropy(), probe.vocab_size
    if mean is None:
        return None
    value = mean / math.log(vocab) if vocab and vocab > 1 else 0.0
    return value if math.isfinite(value) else None


def _planner_adam(planner: PlannerNet, lr: float) -> torch.optim.Adam:
    """Adam for the planner's ~10 small tensors: fused (one kernel, ~5× less time per update
    than the per-tensor loop on CPU) where torch supports it, else the multi-tensor path."""
    try:
        return torch.optim.Adam(planner.parameters(), lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):  # fused Adam needs torch >= 2.4 on CPU
        return torch.optim.Adam(planner.parameters(), lr=lr, foreach=True)


def _make_planner(warm_start: str | Path | None, *, edges: bool, seed: int) -> PlannerNet:
    if warm_start is not None:
        planner = load_planner(warm_start)
        planner.edges = edges
        return planner
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    planner = PlannerNet(edges=edges)
    torch.random.set_rng_state(generator_state)
    return planner


def _make_entropy_probe(
    model: nn.Module | None, enabled: bool, seed: int, every: int
) -> EntropyProbe | None:
    if model is None or not enabled:
        return None
    try:
        return EntropyProbe(model, seed=seed, every=every)
    except ProbeError as err:
        # EntropyProbe's own advice (layer=/head=) is for building one by hand; GraffScheduler
        # takes neither, so the warning keeps the reason and names what GraffScheduler accepts.
        reason = str(err).split(" Pass ", 1)[0]
        warn(
            f"GraffScheduler runs without the entropy probe (its entropy features stay 0): "
            f"{reason} The other signals are unaffected. Pass entropy=False to GraffScheduler "
            "to silence this warning.",
            ProbeWarning,
        )
        return None
    except GraffConfigError:
        raise
