"""The planner's inputs: the probes GRAFF builds, running loss/entropy averages, the explosion
watch, the planning window's curvature statistics, their hypergradient cosines, and the
node-feature matrix (:data:`~graff.planner.net.FEATURE_NAMES`).

Everything here is a function of the signals handed in; nothing reads a scheduler.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from graff._checks import MAX_COUNT
from graff._warn import warn
from graff.errors import CheckpointError, GraffConfigError, ProbeError, ProbeWarning
from graff.probes.curvature import CurvatureProbe
from graff.probes.entropy import EntropyProbe
from graff.probes.preconditioner import preconditioner_kind

if TYPE_CHECKING:
    from graff.planner.config import GraffConfig
    from graff.probes.curvature import CurvatureStats


class LossTracker:
    r"""Bias-corrected fast (β = 0.9) and slow (β = 0.98) moving averages and the best fast value.

    Non-finite or missing values are ignored. ``rising(tol)`` tells when the fast average is more
    than ``tol`` (relative) above the best fast average seen *and* more than three standard errors
    of the fast average above it (minibatch noise alone must not look like divergence): the
    loss-based instability signal. The standard error is
    :math:`\sigma\sqrt{(1-\beta)/(1+\beta)}`, :math:`\sigma^2` a slow average of squared
    deviations from the slow mean, each deviation clipped to
    :math:`\pm 3\max(\sigma, 0.01\,|\bar L_\text{slow}|)` once ``min_count`` losses are in
    (winsorised, as in Huber's robust scale estimates): one outlier batch — or the step that
    killed half of a ReLU network's units — would otherwise raise σ for the ~50 steps the slow
    average remembers and hide the worse plateau after it behind the noise term. The floor at
    1 % of the loss keeps a loss that was constant at first from locking σ at 0.
    """

    def __init__(self, fast: float = 0.9, slow: float = 0.98, min_count: int = 5) -> None:
        self.beta_fast, self.beta_slow, self.min_count = fast, slow, min_count
        self._fast = self._slow = self._var = 0.0
        self.count = 0
        self.best = math.inf

    @property
    def fast(self) -> float:
        r"""Bias-corrected fast average (0 before any value)."""
        return self._fast / (1 - self.beta_fast**self.count) if self.count else 0.0

    @property
    def slow(self) -> float:
        """Bias-corrected slow average (0 before any value)."""
        return self._slow / (1 - self.beta_slow**self.count) if self.count else 0.0

    def update(self, value: float | None) -> None:
        """Fold in one value (``None``, NaN, inf, or one that would overflow the averages: skipped)."""
        if value is None or not math.isfinite(value):
            return
        deviation = value - self.slow if self.count else 0.0
        if self.count >= self.min_count:
            limit = 3.0 * max(self.noise_std, 0.01 * abs(self.slow))
            deviation = max(-limit, min(limit, deviation))
        var = self.beta_slow * self._var + (1 - self.beta_slow) * deviation * deviation
        fast = self.beta_fast * self._fast + (1 - self.beta_fast) * value
        slow = self.beta_slow * self._slow + (1 - self.beta_slow) * value
        if not all(math.isfinite(x) for x in (var, fast, slow)):
            return
        self._var, self._fast, self._slow = var, fast, slow
        self.count += 1
        if self.count >= self.min_count:
            self.best = min(self.best, self.fast)

    @property
    def noise_std(self) -> float:
        """σ, the bias-corrected standard deviation of one loss about the slow average."""
        if not self.count:
            return 0.0
        return math.sqrt(self._var / (1 - self.beta_slow ** max(self.count - 1, 1)))

    def rising(self, tolerance: float) -> bool:
        """Whether the fast average exceeds the best by more than ``tolerance`` (relative)."""
        if self.count < self.min_count or not math.isfinite(self.best):
            return False
        noise = self.noise_std * math.sqrt((1 - self.beta_fast) / (1 + self.beta_fast))
        return self.fast - self.best > max(tolerance * max(abs(self.best), 1e-12), 3.0 * noise)

    def reset_best(self) -> None:
        """Forget the best value (after a back-off, so one event is not counted twice)."""
        self.best = self.fast if self.count >= self.min_count else math.inf

    def trend(self) -> float:
        """``tanh(10 · (fast − slow) / |slow|)`` in [-1, 1]; 0 before ``min_count`` values."""
        if self.count < self.min_count:
            return 0.0
        return math.tanh(10.0 * (self.fast - self.slow) / max(abs(self.slow), 1e-12))

    def state_dict(self) -> dict[str, Any]:
        """The averages, their count and the best value (plain numbers)."""
        return {
            "fast": self._fast,
            "slow": self._slow,
            "var": self._var,
            "count": self.count,
            "best": self.best,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; :class:`CheckpointError` (nothing changed) if invalid."""
        try:
            fast, slow, var = float(state["fast"]), float(state["slow"]), float(state["var"])
            count, best = int(state["count"]), float(state["best"])
        except (KeyError, TypeError, ValueError, OverflowError) as err:
            raise CheckpointError(f"invalid running-average state: {err}") from err
        if var < 0 or not 0 <= count < MAX_COUNT:
            raise CheckpointError(f"invalid running-average state: var={var}, count={count}.")
        self._fast, self._slow, self._var, self.count, self.best = fast, slow, var, count, best


class ExplosionWatch:
    r"""Detects a loss that explodes: growing by a large factor step over step.

    A step *explodes* when its loss :math:`L_t`

    - is more than ``high`` (4) times the fast loss average before it, :math:`\bar L_{t-1}`
      (β = 0.9): :math:`L_t - \bar L_{t-1} > 3\,s`, with the scale
      :math:`s = \max(|\bar L_{t-1}|, 0.01\,|\bar L_{\text{start}}|)` (the floor keeps the
      bounces of a loss that converged to ~0 from counting),
    - is above the previous step's loss, :math:`L_t > L_{t-1}`,
    - and either the step before exploded, or it too was high and rising: two consecutive
      outlier batches of rising loss are not yet an explosion, a third is (heavy-tailed
      minibatch losses, Student-t targets, stayed clear of this in the tests).

    A sustained growth by a factor :math:`g` per step keeps :math:`L_t/\bar L_{t-1} \approx
    10g - 9`, so it explodes as long as :math:`g \gtrsim 1.3`. A non-finite loss right after an
    exploding or high step explodes too (the growth went past the float range). Slower rises
    are left to the loss back-off of :class:`PeakSearch`.
    """

    high, min_count = 4.0, 3

    def __init__(self, beta: float = 0.9) -> None:
        self.beta = beta
        self._ema = 0.0
        self.count = 0
        self.start: float | None = None  # the average after min_count losses
        self.prev: float | None = None  # the last step's loss (inf: non-finite)
        self.prev_high = False  # the last step's loss was high and rising
        self.active = False  # the last step exploded

    @property
    def mean(self) -> float | None:
        """Bias-corrected fast average, ``None`` before ``min_count`` losses."""
        if self.count < self.min_count:
            return None
        return self._ema / (1 - self.beta**self.count)

    def update(self, loss: float | None, nonfinite: bool = False) -> bool:
        """Fold in one step's loss; True if the step explodes.

        Args:
            loss: The step's finite loss, or None (no loss, or a non-finite one).
            nonfinite: The step's loss was NaN or infinite.
        """
        if nonfinite:
            fired = self.active or self.prev_high
            self.prev, self.active = math.inf, fired
            return fired
        if loss is None:
            return False
        mean = self.mean
        fired = high = False
        if mean is not None:
            scale = max(abs(mean), 0.01 * abs(self.start or 0.0), 1e-30)
            rising = self.prev is not None and loss > self.prev
            high = rising and loss - mean > (self.high - 1.0) * scale
            fired = high and (self.active or self.prev_high)
        ema = self.beta * self._ema + (1 - self.beta) * loss
        if math.isfinite(ema):
            self._ema = ema
            self.count += 1
            if self.count == self.min_count:
                self.start = self.mean
        self.prev, self.prev_high, self.active = loss, high, fired
        return fired

    def state_dict(self) -> dict[str, Any]:
        """The average, its count and the last step's loss and flags."""
        return {
            "ema": self._ema,
            "count": self.count,
            "start": self.start,
            "prev": self.prev,
            "prev_high": self.prev_high,
            "active": self.active,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; :class:`CheckpointError` (nothing changed) if invalid."""
        try:
            ema, count = float(state["ema"]), int(state["count"])
            start = None if state["start"] is None else float(state["start"])
            prev = None if state["prev"] is None else float(state["prev"])
            flags = (state["prev_high"], state["active"])
        except (KeyError, TypeError, ValueError, OverflowError) as err:
            raise CheckpointError(f"invalid explosion-watch state: {err}") from err
        if not (
            math.isfinite(ema)
            and 0 <= count < MAX_COUNT
            and (start is None or math.isfinite(start))
            and (prev is None or not math.isnan(prev))
            and all(isinstance(f, bool) for f in flags)
        ):
            raise CheckpointError("invalid explosion-watch state.")
        self._ema, self.count, self.start, self.prev = ema, count, start, prev
        self.prev_high, self.active = flags


class EntropyTrend:
    """Running averages of the entropy probe's normalised mean entropy, one value per decoded pass.

    ``mean / log(vocab)`` of the sampled early-layer entropies (``EntropyStats.normalized_mean``)
    is folded into a :class:`LossTracker` once per forward pass the probe decoded, so a step that
    ran no new pass adds nothing.
    """

    def __init__(self) -> None:
        self.tracker = LossTracker()
        self._pass: int | None = None  # the probe's pass last folded in

    def observe(self, probe: EntropyProbe | None) -> None:
        """Fold in the probe's last decoded pass if it is new."""
        if probe is None or probe.decoded_pass in (None, self._pass):
            return
        self._pass = probe.decoded_pass
        mean, vocab = probe.mean_entropy(), probe.vocab_size
        if mean is None:
            self.tracker.update(None)
            return
        value = mean / math.log(vocab) if vocab and vocab > 1 else 0.0
        self.tracker.update(value if math.isfinite(value) else None)

    @property
    def level(self) -> float:
        """The fast average (0 before any value)."""
        return self.tracker.fast if self.tracker.count else 0.0

    def state_dict(self) -> dict[str, Any]:
        """The averages (the pass index is not kept: the probe's passes restart on a resume)."""
        return self.tracker.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (validated by :class:`LossTracker`)."""
        self.tracker.load_state_dict(state)


@dataclass(frozen=True)
class WindowStats:
    """Curvature-probe statistics summed over a planning window (per block, float32)."""

    hypergrad: Tensor
    grad_sq_norm: Tensor
    update_sq_norm: Tensor
    secant_ratio: Tensor


class StatsWindow:
    """Sums the curvature probe's per-step samples between two planner runs.

    For a log-LR residual held over the window, the derivative of the summed next-step losses is
    the sum of the per-step hypergradients :math:`\\sum_s \\langle g_{s+1}, \\Delta\\theta_s\\rangle`;
    the gradient and update squared norms are summed too, so the window cosine
    :math:`\\sum_s\\langle g_{s+1},\\Delta\\theta_s\\rangle / \\sqrt{\\sum_s\\lVert g_{s+1}\\rVert^2
    \\sum_s\\lVert\\Delta\\theta_s\\rVert^2}` stays in [-1, 1] (Cauchy–Schwarz). Secant ratios
    are averaged. A sample is counted once (by its step index).
    """

    def __init__(self, num_blocks: int) -> None:
        self._sums = torch.zeros(4, num_blocks)
        self.count = 0
        self._last_step: int | None = None

    def add(self, stats: CurvatureStats | None) -> None:
        """Fold in the probe's latest sample if it is new (``None`` is ignored)."""
        if stats is None or stats.step == self._last_step:
            return
        sample = torch.stack(
            [stats.hypergrad, stats.grad_sq_norm, stats.update_sq_norm, stats.secant_ratio]
        ).float()
        if not bool(torch.isfinite(sample).all()):
            return
        self._sums += sample
        self.count += 1
        self._last_step = stats.step

    def stats(self) -> WindowStats | None:
        """The window's statistics, or ``None`` if no sample arrived."""
        if not self.count:
            return None
        hyper, gsq, usq, secant = self._sums.clone().unbind(0)
        return WindowStats(hyper, gsq, usq, secant / self.count)

    def reset(self) -> None:
        """Start a new window (the last step index is kept, so no sample is counted twice)."""
        self._sums.zero_()
        self.count = 0

    def state_dict(self) -> dict[str, Any]:
        """The window's sums, sample count and last sampled step."""
        return {"sums": self._sums.clone(), "count": self.count, "last_step": self._last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; :class:`CheckpointError` (nothing changed) if invalid."""
        try:
            sums, count, last = state["sums"], int(state["count"]), state["last_step"]
        except (KeyError, TypeError, ValueError, OverflowError) as err:
            raise CheckpointError(f"invalid planning-window state: {err}") from err
        if not 0 <= count < MAX_COUNT:
            raise CheckpointError(f"invalid planning-window state: count={count}.")
        if not isinstance(sums, Tensor) or sums.shape != self._sums.shape:
            raise CheckpointError("planning-window state does not fit this number of blocks.")
        self._sums, self.count = sums.clone().float(), count
        self._last_step = None if last is None else int(last)


def window_cosines(stats: WindowStats) -> Tensor:
    """``κ = cos(g_{s+1}, Δθ_s)`` over a window: the whole model's (sums over blocks) first,
    then one per block, as one ``[blocks + 1]`` vector."""
    cols = torch.stack([stats.hypergrad, stats.grad_sq_norm, stats.update_sq_norm])
    cols = torch.cat([cols.sum(1, keepdim=True), cols], dim=1)
    return cosine(*cols.unbind(0))


def cosine(dot: Tensor, a_sq: Tensor, b_sq: Tensor) -> Tensor:
    """``dot / sqrt(a_sq · b_sq)`` clipped to [-1, 1]; 0 where a norm vanishes."""
    den = torch.sqrt(a_sq.clamp_min(0) * b_sq.clamp_min(0))
    out = torch.where(den > 0, dot / den.clamp_min(1e-30), torch.zeros_like(dot))
    return out.clamp(-1.0, 1.0)


def stability_usage(log_factor: float, log_bound: float | None, tripwire: float | None) -> float:
    """How close the LR is to the stability limit, in [0, 2].

    ``η / η_max = exp(log_factor − log_bound)`` where λ̂ gives a bound; else half the secant
    tripwire (2 is its alarm level); 0 before either exists.
    """
    if log_bound is not None and math.isfinite(log_bound):
        return min(2.0, math.exp(log_factor - log_bound))
    return min(2.0, tripwire / 2.0) if tripwire is not None else 0.0


@dataclass(frozen=True)
class SharedSignals:
    """The features every node shares (one value each), in :data:`FEATURE_NAMES` order."""

    budget_remaining: float
    log_lr_factor: float
    loss_trend: float
    entropy: float
    entropy_trend: float
    stability_usage: float
    calibrating: bool


def node_features(
    num_blocks: int,
    shared: SharedSignals,
    stats: WindowStats | None,
    kappa: Tensor | None,
) -> Tensor:
    """The planner's input ``[num_blocks, len(FEATURE_NAMES)]`` (float32, finite).

    Every row holds the shared signals; the per-block columns (hypergradient cosine, secant
    ratio, relative update size) come from the window's statistics when it has any (else 0).
    """
    row = [
        shared.budget_remaining,
        shared.log_lr_factor / math.log(10.0),
        shared.loss_trend,
        0.0,
        0.0,
        0.0,
        shared.entropy,
        shared.entropy_trend,
        shared.stability_usage,
        1.0 if shared.calibrating else 0.0,
    ]
    x = torch.tensor(row, dtype=torch.float32).repeat(num_blocks, 1)
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


# ------------------------------------------------------------------- the probes
def _cold_start(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """CurvatureProbe settings of the first λ̂ estimate under GraffScheduler.

    Adaptive optimizers spread the first estimate's 20 Hessian-vector products over three steps
    (7, 7, 6), a third of the spike; SGD-type optimizers keep one 20-product estimate in their
    first step, because their guard must bind at once (``docs/concepts/graff.md``). Fewer
    products were measured worse on the held-out sweep (``docs/concepts/probes.md``).
    """
    if preconditioner_kind(optimizer) is None:
        return {}
    return {"chunk_iters": 7}


def make_curvature_probe(
    optimizer: torch.optim.Optimizer,
    model: nn.Module | None,
    blocks: Mapping[str, Iterable[nn.Parameter]] | None,
    loss_fn: Callable[[], Tensor] | None,
    config: GraffConfig,
    guard: bool,
    seed: int,
) -> CurvatureProbe:
    """The curvature probe as GRAFF uses it (λ̂ only with the guard and a loss to re-evaluate)."""
    return CurvatureProbe(
        optimizer,
        model=model,
        blocks=blocks,
        loss_fn=loss_fn,
        every=config.curvature_every,
        hvp=guard and (model is not None or loss_fn is not None),
        seed=seed,
        # block multipliers rescale the applied update Δθ, so they need it every step and
        # exactly; the statistics alone are sums that one bfloat16 rounding barely moves
        stats_every=1 if config.block_multipliers else config.probe_interval,
        update_dtype=None if config.block_multipliers else torch.bfloat16,
        # the λ̂ refresh interval leaves the estimates what the per-step costs leave of the
        # 1 % overhead target
        share_step_costs=True,
        preconditioner_floor=config.preconditioner_floor,
        **_cold_start(optimizer),
    )


def make_entropy_probe(model: nn.Module | None, seed: int, every: int) -> EntropyProbe | None:
    if model is None:
        return None
    try:
        return EntropyProbe(model, seed=seed, every=every, training_only=True)
    except ProbeError as err:
        # EntropyProbe's own advice (layer=/head=) is for building one by hand; GraffScheduler
        # takes neither, so the warning keeps the reason and names what GraffScheduler accepts.
        reason = str(err).split(" Pass ", 1)[0]
        warn(
            f"GraffScheduler runs without the entropy probe (its entropy features stay 0): "
            f"{reason} The other signals are unaffected. Pass "
            "config=graff.GraffConfig(entropy=False) to GraffScheduler to silence this warning.",
            ProbeWarning,
        )
        return None
    except GraffConfigError:
        raise
