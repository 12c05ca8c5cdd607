"""GraffConfig: GRAFF's ablation switches and tuning knobs, in one frozen, validated object.

``GraffScheduler`` takes what a user sets for a run (model, prior, guard, clamps, seed, …);
everything a study of the method varies lives here, with the defaults the benchmarks chose
(``docs/concepts/graff.md`` says what decided each; ``docs/design-log.md`` gives the measurements).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from graff._checks import check_in_range, check_positive, check_positive_int
from graff.errors import GraffConfigError, GraffTypeError

_SWITCHES = (
    "planner",
    "online",
    "edges",
    "budget_feature",
    "keep_raised_peak",
    "peak_search",
    "block_multipliers",
    "entropy",
)


@dataclass(frozen=True)
class GraffConfig:
    """GRAFF's ablation switches and tuning knobs (``GraffScheduler(..., config=...)``).

    Ablation switches (all on by default except ``block_multipliers``):
        planner: Run the learned planner. ``False``: the planner-off ablation, the cheapest
            GRAFF — the prior, the peak search and the guard alone, with the residual and the
            multipliers held at zero (no planner forward pass, no online update, no entropy
            probe): level with the planner at the user's LR, but worse when the user's LR is
            3-10× off (``docs/design-log.md``, "What the learned part contributes").
        online: Train the planner online on the de-biased hypergradient cosine (``False``: the
            frozen-planner ablation).
        edges: Message passing between blocks (``False``: the no-edges/MLP ablation).
        budget_feature: Feed the remaining budget to the planner.
        peak_search: Search the peak LR during the first ``search_fraction`` of the budget.
        block_multipliers: Learn per-block multipliers of the applied update (off by default:
            per-block signals are mostly noise; needs ``planner``).
        entropy: Use the entropy probe when a model is given.

    Tuning knobs:
        planner_lr: Adam LR of the planner.
        learn_every: With ``online``, update the planner at every this many plans.
        plan_every: Run the planner (features, encoder, online update, projection) every this
            many optimizer steps; in between the residual is held. The online signal is then the
            hypergradient summed over the window, the exact derivative for a held residual.
        probe_every: The per-step probes (hypergradient/secant statistics, the entropy lens)
            sample every this many steps; ``None``: ``plan_every`` (one sample per window).
            Must not exceed ``plan_every``, or some windows hold no sample.
        curvature_every: λ̂ refresh interval in steps, or ``"auto"`` (the refreshes get what the
            per-step work leaves of a 1 % overhead target; priced from step counts under a step
            budget, so the run is bit-reproducible).
        search_fraction: Fraction of the budget the peak search may use, in (0, 1].
        peak_max: Largest peak factor the search may reach (× the user's LR), in [1, 1e4];
            ``None``: 30 for adaptive optimizers while a measured λ̂ caps the rise, else 10
            (:func:`graff.planner.search_defaults.default_peak_max`).
        backoff: Factor the LR is divided by when instability is detected at or below the
            user's LR, in (1, 1e3].
        search_headroom: The search rises only up to ``c / (search_headroom · λ̂)``; ``None``:
            optimizer-aware (4 for adaptive optimizers, 8 otherwise).
        refresh_allowance: Fraction of the run's projected training time the peak search's
            extra λ̂ refreshes may use, in [0, 1]; 0 turns them off.
        time_share: Under a wall-clock budget, the share of the run GRAFF's own time (its
            per-step work and every λ̂ estimate, the cold start included) may reach before the
            peak search's extra λ̂ refreshes stop, in [0, 1]; 1 (default): no cap beyond
            ``refresh_allowance``. A cap trades the search's reach for training time; on the
            benchmark's wall-clock runs that helped one task and hurt another
            (``docs/benchmark.md``). The cold start is always taken (the guard needs one λ̂).
            Not used under a step budget, where no measured time may decide anything.
        multiplier_max: Multipliers lie in ``[1/multiplier_max, multiplier_max]``, in [1, 10].
        residual_max: The learned residual lies in ``[1/residual_max, residual_max]``, in
            [1, 100].
        guard_c: Guard constant ``c``; ``None``: optimizer-aware (:func:`graff.guard.guard_constant`).
        loss_evidence: While the loss is healthy, an estimate λ̂ that calls the LR just taken
            more than 4× too high is set aside until the next estimate, and the peak search's
            ceiling stops a rise but pulls nothing down; an exploding or rising loss, or no loss
            at all, restores the λ̂-only rules. ``None``: on for adaptive optimizers, whose
            preconditioned sharpness is inflated while the second moments are young and tracks
            the LR in use; ``True``/``False``
            force it (``docs/concepts/guard.md``).
        keep_raised_peak: Under loss evidence, while the loss is healthy, the guard does not
            cut an LR the peak search raised above the prior alone: it stops the rise, but
            keeps the last step's LR (at most the searched peak). A λ̂ re-measured after the
            search raised the LR describes the adaptive edge of stability at that LR
            (η·λ̂ ≈ 38 for Adam at β1 = 0.9, more during the transient), not a
            coming instability; a rising or exploding loss restores the cut at once
            (``docs/concepts/guard.md``).
        search_after_hold: Whether the peak search's phase (``search_fraction`` of the budget,
            and its watch after it) counts from the last step it held waiting for the first λ̂
            (step 10 under Adam-type optimizers) instead of from the first step; the hold may
            delay it by at most ``search_fraction``. On a 120-step budget the hold is 10 of the
            18 search steps, so the search can rise only about 4×. ``None`` (default): only when
            the first λ̂ shows the user's LR far below the stability limit (the search's ceiling
            ≥ 20×, ``graff.planner.search_defaults.FAR_BELOW_CEILING``), otherwise as ``False``.
            ``True`` always: it helped LoRA at 0.1× the user's LR but cost it a little at the
            user's LR, where the ceiling is nearer (``docs/design-log.md``).
        preconditioner_floor: Under adaptive optimizers λ̂ is computed with each parameter
            tensor's preconditioner floored at this fraction of its median, in [0, 1); 0: as
            the optimizer applies it. Coordinates whose second moment is still ~0 otherwise
            inflate the early estimates by orders of magnitude (2,600× on a held-out CNN),
            and their ceiling holds the LR down; the floor costs over-fitting tasks, whose
            validation loss that accident had helped (``docs/design-log.md``).

    Raises:
        GraffConfigError, GraffTypeError: On a bad value or a contradiction between fields
            (the message names them).
    """

    planner: bool = True
    online: bool = True
    edges: bool = True
    budget_feature: bool = True
    peak_search: bool = True
    block_multipliers: bool = False
    entropy: bool = True
    planner_lr: float = 1e-3
    learn_every: int = 1
    plan_every: int = 10
    probe_every: int | None = None
    curvature_every: int | str = "auto"
    search_fraction: float = 0.15
    peak_max: float | None = None
    backoff: float = 3.0
    search_headroom: float | None = None
    refresh_allowance: float = 0.1
    time_share: float = 1.0
    multiplier_max: float = 2.0
    residual_max: float = 1.25
    guard_c: float | None = None
    loss_evidence: bool | None = None
    keep_raised_peak: bool = True
    search_after_hold: bool | None = None
    preconditioner_floor: float = 0.01

    def __post_init__(self) -> None:
        for name in _SWITCHES:
            if not isinstance(getattr(self, name), bool):
                raise GraffTypeError(f"{name} must be True or False, got {getattr(self, name)!r}.")
        for name in ("loss_evidence", "search_after_hold"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise GraffTypeError(f"{name} must be None, True or False, got {value!r}.")
        checked: dict[str, Any] = {
            "planner_lr": check_positive("planner_lr", self.planner_lr),
            "learn_every": check_positive_int("learn_every", self.learn_every),
            "plan_every": check_positive_int("plan_every", self.plan_every),
            "search_fraction": check_in_range(
                "search_fraction", self.search_fraction, 0.0, 1.0, low_open=True
            ),
            "backoff": check_in_range("backoff", self.backoff, 1.0, 1e3, low_open=True),
            "refresh_allowance": check_in_range(
                "refresh_allowance", self.refresh_allowance, 0.0, 1.0
            ),
            "time_share": check_in_range("time_share", self.time_share, 0.0, 1.0),
            "multiplier_max": check_in_range("multiplier_max", self.multiplier_max, 1.0, 10.0),
            "residual_max": check_in_range("residual_max", self.residual_max, 1.0, 100.0),
            "preconditioner_floor": check_in_range(
                "preconditioner_floor", self.preconditioner_floor, 0.0, 1.0, high_open=True
            ),
        }
        if self.probe_every is not None:
            checked["probe_every"] = check_positive_int("probe_every", self.probe_every)
        if self.peak_max is not None:
            checked["peak_max"] = check_in_range("peak_max", self.peak_max, 1.0, 1e4)
        if self.search_headroom is not None:
            checked["search_headroom"] = check_in_range(
                "search_headroom", self.search_headroom, 1.0, 1e3
            )
        if self.guard_c is not None:
            checked["guard_c"] = check_positive("guard_c", self.guard_c)
        if self.curvature_every != "auto":
            checked["curvature_every"] = check_positive_int("curvature_every", self.curvature_every)
        for name, value in checked.items():  # the normalised values (an int given as 10.0)
            object.__setattr__(self, name, value)
        self._check_fields_agree()

    def _check_fields_agree(self) -> None:
        if self.probe_every is not None and self.probe_every > self.plan_every:
            raise GraffConfigError(
                f"probe_every={self.probe_every} exceeds plan_every={self.plan_every}: some "
                "planning windows would hold no probe sample. Keep probe_every <= plan_every "
                "(or leave it None, which follows plan_every)."
            )
        if self.block_multipliers and not self.planner:
            raise GraffConfigError(
                "block_multipliers=True needs planner=True: the planner decodes the multipliers."
            )

    @property
    def probe_interval(self) -> int:
        """The probes' sampling stride: ``probe_every``, or ``plan_every`` when it is None."""
        return self.plan_every if self.probe_every is None else self.probe_every

    @classmethod
    def field_names(cls) -> frozenset[str]:
        """The names ``GraffConfig`` accepts."""
        return frozenset(f.name for f in fields(cls))


def reject_unknown(unknown: dict[str, Any]) -> None:
    """A clear error for an argument GraffScheduler does not take (a GraffConfig field, the
    prior's warm-up, or a misspelling)."""
    if not unknown:
        return
    name, value = next(iter(unknown.items()))
    if name in GraffConfig.field_names():
        raise GraffTypeError(
            f"{name} is a GraffConfig field: pass config=graff.GraffConfig({name}={value!r})."
        )
    if name == "warmup":
        raise GraffTypeError(
            f"warmup is the prior's: pass prior=graff.BudgetPrior('wsd', warmup={value!r})."
        )
    raise GraffTypeError(f"GraffScheduler got an unexpected keyword argument {name!r}.")
