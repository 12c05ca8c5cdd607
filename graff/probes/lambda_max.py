"""λ̂_max, the top eigenvalue the guard reads, and when to estimate it again.

:class:`LambdaMaxEstimator` estimates

.. math::

    \\hat\\lambda_{\\max} = \\lambda_{\\max}(T_k),\\qquad M = H \\text{ (SGD, unknown)}\\ \\text{or}\\
    M = P^{-1/2} H P^{-1/2} \\text{ (Adam-type, RMSprop, Adagrad)},

the largest Ritz value of ``k`` Lanczos steps on ``M`` (:func:`graff.probes._hvp.lanczos`, one
Hessian-vector product each) on a fixed probe batch (a ``loss_fn`` closure or the inputs of the
model's first training forward pass, :class:`graff.probes._capture.InputCapture`), warm-started
from the previous Ritz vector, which it stores in int8. ``P`` is the optimizer's diagonal
preconditioner (:mod:`graff.probes.preconditioner`). A Ritz value approaches
:math:`\\lambda_{\\max}` from below, so the guard reads
:math:`\\text{margin}\\cdot\\hat\\lambda_{\\max}`.

It also decides when to refresh: every ``every`` optimizer steps, or, with ``every="auto"``, as
rarely as keeps the estimates inside an overhead target, priced in training steps from the
number of products (:func:`estimate_cost_steps`, reproducible) or from measured seconds. The
first estimate (the cold start, more products) may be spread over a few steps.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from graff._checks import check_in_range, check_positive_int
from graff.distributed import RankSync
from graff.errors import CheckpointError, GraffConfigError, GraffTypeError, ProbeError
from graff.probes._capture import InputCapture
from graff.probes._context import eager, probing
from graff.probes._estimator_args import (
    check_cost_model,
    check_every,
    check_flags,
    check_non_negative_int,
    preconditioner_to_read,
)
from graff.probes._hvp import (
    dequantize_int8,
    lanczos,
    load_eigenvector,
    make_hvp,
    quantize_int8,
    save_eigenvector,
)
from graff.probes._overhead import OverheadMeter
from graff.probes._state import check_estimator_state
from graff.probes.preconditioner import (
    PRECONDITIONER_FLOOR,
    inverse_sqrt_preconditioner,
)

#: Least fraction of ``overhead_target`` the ``auto`` interval leaves the λ̂ estimates when
#: ``share_step_costs`` is on and the per-step costs take (nearly) all of it.
MIN_ESTIMATE_SHARE = 0.25
#: Cost of one Hessian-vector product in training steps (``cost_model="steps"``): one double
#: backward through the probe batch's gradient graph, about two forward and backward passes.
HVP_STEPS = 2.0
#: Cost of building that graph (one forward and one backward of the probe batch with
#: ``create_graph=True``) in training steps, paid once per estimate.
GRAPH_STEPS = 1.0
#: What torch's errors say when a compiled graph is asked for a double backward.
_NO_DOUBLE_BACKWARD = ("double backward", "requires create_graph=False")
#: Runs one estimate of ``iters`` products (``publish``: make it the new λ̂); returns λ or None.
Runner = Callable[[int, bool], "float | None"]


def estimate_cost_steps(products: int) -> float:
    """Cost of one λ̂ estimate of ``products`` Hessian-vector products, in training steps.

    ``GRAPH_STEPS + HVP_STEPS · products``: a price from counts alone, so that decisions taken
    from it (the ``auto`` interval under ``cost_model="steps"``, GraffScheduler's refresh
    allowance under a step budget) are the same on every run, whatever the machine is doing.
    It takes the probe batch to be about one training batch, as a captured one is (the inputs of
    a training forward pass); a ``loss_fn`` on a larger batch costs proportionally more.
    """
    return GRAPH_STEPS + HVP_STEPS * products


class LambdaMaxEstimator:
    """λ̂_max by warm-started Lanczos on a fixed probe batch, and its refresh schedule.

    Built and driven by :class:`graff.probes.curvature.CurvatureProbe` (which passes its
    arguments through and forwards the readings): its post-step hook runs
    :meth:`run_scheduled` when :meth:`due`.

    Args:
        optimizer: The optimizer (its state holds the preconditioner).
        params: The trainable parameters the Hessian is taken with respect to.
        model: Optional model: run in eval mode during an estimate, and the source of the probe
            batch when ``loss_fn`` is None.
        loss_fn: Optional closure returning the scalar loss on a fixed batch (with grad graph).
        meter: The owner's overhead account: estimates are booked there, and the ``auto``
            interval reads the step time and per-step costs from it.
        enabled: False: no estimates (``hvp=False``).
        every: Refresh interval in optimizer steps, or ``"auto"`` (refresh cost / step cost
            ≤ ``overhead_target``, within ``[min_every, max_every]``, priced by ``cost_model``).
        power_iters: Hessian-vector products per refresh.
        initial_iters: Hessian-vector products for the first estimate (cold start).
        margin: Safety factor ≥ 1 of ``lambda_max_safe``.
        overhead_target: Target fraction of training time spent in estimates (``every="auto"``);
            with ``share_step_costs``, in estimates and per-step work together.
        min_every: Smallest interval ``every="auto"`` may choose.
        max_every: Largest interval ``every="auto"`` may choose (``None``: no cap); keeps λ̂
            fresh on tiny models, where the automatic interval can exceed the whole run.
        chunk_iters: Most products one step's hook runs for the cold start (``None``: all
            ``initial_iters`` at once): spreads the first estimate over
            ``ceil(initial_iters / chunk_iters)`` steps (each rebuilds the probe graph).
        start_step: No scheduled estimate before this many optimizer steps. ``None``: 10 for
            preconditioned optimizers, whose first preconditioners are meaningless
            (``docs/concepts/probes.md``), 0 otherwise. :meth:`requested_iters` ignores it.
        preconditioned: None (auto from the optimizer class), True or False.
        preconditioner_floor: Under a preconditioned optimizer, each tensor's ``P`` is floored
            at this fraction of its median for the estimate, in [0, 1); 0 reads ``P`` as the
            optimizer applies it. A coordinate whose second moment is still ~0 otherwise
            inflates λ̂ by orders of magnitude without being unstable
            (:mod:`graff.probes.preconditioner`).
        share_step_costs: The ``auto`` interval gives the estimates only what the per-step
            costs (the probe's hooks plus what the owner reports with ``add_step_cost``) leave
            of ``overhead_target``, at least ``MIN_ESTIMATE_SHARE`` of it
            (:meth:`estimate_share`). GraffScheduler turns it on, so its whole overhead keeps to
            one target.
        cost_model: How the ``auto`` interval prices a refresh. ``"steps"``: from the number of
            products (:func:`estimate_cost_steps`), ``ceil(estimate_cost_steps(power_iters) /
            share)``, so a run under a step budget is bit-reproducible (an estimate in the first
            step, having no step timed yet, leaves the interval at ``min_every``, as
            ``"seconds"`` does). ``"seconds"``: the last estimate's time over a moving average
            of the step time, which follows real costs but changes from run to run. ``None``:
            the scheduler served picks by its budget (:meth:`follow_budget`); on its own,
            ``"steps"``. Timings are measured and reported either way.
        seed: Seed of the random start vector.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        params: Sequence[Tensor],
        *,
        model: nn.Module | None,
        loss_fn: Callable[[], Tensor] | None,
        meter: OverheadMeter,
        enabled: bool,
        every: int | str,
        power_iters: int,
        initial_iters: int,
        margin: float,
        overhead_target: float,
        min_every: int,
        max_every: int | None,
        chunk_iters: int | None,
        start_step: int | None,
        preconditioned: bool | None,
        share_step_costs: bool,
        cost_model: str | None,
        seed: int,
        preconditioner_floor: float = PRECONDITIONER_FLOOR,
    ) -> None:
        if loss_fn is not None and not callable(loss_fn):
            raise GraffTypeError(f"loss_fn must be a callable returning the loss, got {loss_fn!r}.")
        self.every = check_every(every)
        check_flags(preconditioned=preconditioned, share_step_costs=share_step_costs)
        self.seed = check_non_negative_int("seed", seed)
        self._check_schedule(power_iters, initial_iters, min_every, max_every, chunk_iters)
        self.margin = check_in_range("margin", margin, 1.0, 100.0)
        self.overhead_target = check_in_range(
            "overhead_target", overhead_target, 0.0, 1.0, low_open=True
        )
        self.kind = preconditioner_to_read(optimizer, preconditioned)
        self.preconditioner_floor = check_in_range(
            "preconditioner_floor", preconditioner_floor, 0.0, 1.0, high_open=True
        )
        # preconditioned optimizers' first preconditioners are meaningless: docs/concepts/probes.md
        default_start = 10 if self.kind is not None else 0
        self.start_step = (
            default_start
            if start_step is None
            else check_non_negative_int("start_step", start_step)
        )
        self.share_step_costs = share_step_costs
        self._cost_model_given = check_cost_model(cost_model) is not None
        #: ``"steps"`` or ``"seconds"``: what prices a refresh for the ``auto`` interval.
        self.cost_model: str = cost_model or "steps"
        self.optimizer, self.model, self.loss_fn, self.meter = optimizer, model, loss_fn, meter
        self.params = list(params)
        self.hvp = enabled and bool(self.params)
        self._capture = (
            InputCapture(model) if (self.hvp and loss_fn is None and model is not None) else None
        )
        #: Under torch.distributed (set by the schedulers): HVPs are averaged over this group.
        self.sync: RankSync | None = None
        self._init_state()

    def _init_state(self) -> None:
        self.lambda_max: float | None = None
        self._v: list[tuple[Tensor, float]] | None = None  # int8 eigenvector, per-tensor scale
        self._last_attempt: int | None = None
        self._cold_done = 0  # products of a chunked cold start run so far
        self.interval = self.every if isinstance(self.every, int) else self.min_every
        self.n_estimates = self.dropped_estimates = 0
        #: Projected seconds of one refresh (``power_iters`` products + the probe graph), from
        #: the last estimate's time; ``None`` before the first estimate.
        self.refresh_seconds: float | None = None

    def _check_schedule(
        self,
        power_iters: int,
        initial_iters: int,
        min_every: int,
        max_every: int | None,
        chunk_iters: int | None,
    ) -> None:
        self.power_iters = check_positive_int("power_iters", power_iters)
        self.initial_iters = check_positive_int("initial_iters", initial_iters)
        self.min_every = check_positive_int("min_every", min_every)
        self.chunk_iters = (
            None if chunk_iters is None else check_positive_int("chunk_iters", chunk_iters)
        )
        self.max_every = None if max_every is None else check_positive_int("max_every", max_every)
        if self.max_every is not None and self.max_every < self.min_every:
            raise GraffConfigError(f"max_every={max_every!r} must be >= min_every={min_every!r}.")

    @property
    def lambda_max_safe(self) -> float | None:
        """``margin × lambda_max`` (the value the guard should use), or None before an estimate."""
        return None if self.lambda_max is None else self.margin * self.lambda_max

    # ------------------------------------------------------------------ when
    def _ready(self) -> bool:
        source = self.loss_fn is not None or (self._capture is not None and self._capture.ready)
        if not (self.hvp and source):
            return False
        return self.kind is None or any(self.optimizer.state.get(p) for p in self.params)

    def due(self, step: int) -> bool:
        """Whether the hook after optimizer step ``step`` should run :meth:`run_scheduled`."""
        if step < self.start_step or not self.hvp:
            return False
        if not (
            self._cold_done  # a cold start spread over steps continues on the next one
            or self._last_attempt is None
            or step - self._last_attempt >= self.interval
        ):
            return False
        return self._ready()

    def run_scheduled(self, run: Runner) -> None:
        """The estimate a hook runs: a refresh, the cold start, or one chunk of the cold start.

        With ``chunk_iters`` the cold start's ``initial_iters`` products are spread over
        consecutive steps, each chunk warm-started from the last one's iterate; ``lambda_max``
        is published only when all of them have run (a partial estimate underestimates).
        ``run`` runs one estimate (the owner's :meth:`timed_estimate` entry point).
        """
        if self.lambda_max is not None:
            run(self.power_iters, True)
            return
        if self.chunk_iters is None:
            run(self.initial_iters, True)
            return
        left = self.initial_iters - self._cold_done
        iters = min(self.chunk_iters, left)
        lam = run(iters, iters == left)
        self._cold_done = 0 if (iters == left or lam is None) else self._cold_done + iters

    def requested_iters(self, iters: int | None) -> int:
        """The products of an estimate asked for now (raises ProbeError if none can run).

        Default: ``initial_iters`` before the first estimate, ``power_iters`` after. A
        requested estimate restarts a chunked cold start.
        """
        if iters is not None:
            iters = check_positive_int("iters", iters)
        if not self.hvp:
            raise ProbeError(
                "this CurvatureProbe was built with hvp=False (or no trainable parameters)."
            )
        if self.loss_fn is None and self._capture is None:
            raise ProbeError(
                "CurvatureProbe needs a way to re-evaluate the loss: pass loss_fn= "
                "(a closure returning the loss on a fixed batch) or model=."
            )
        if self.loss_fn is None and not self._capture.ready:
            raise ProbeError(
                "no probe batch captured yet: run a forward pass of the model with "
                "gradients enabled first, or pass loss_fn=."
            )
        if not self._ready():
            raise ProbeError(
                f"{type(self.optimizer).__name__} has no state yet, so its "
                "preconditioner is unknown: call after the first optimizer.step()."
            )
        self._cold_done = 0
        return iters or (self.initial_iters if self.lambda_max is None else self.power_iters)

    def timed_estimate(self, iters: int, step: int, publish: bool = True) -> float | None:
        """:meth:`_estimate`, booked in the meter; with ``every="auto"``, sets the interval."""
        t0 = time.perf_counter()
        try:
            return self._estimate(iters, publish)
        finally:
            spent = time.perf_counter() - t0
            self.meter.add_estimate(spent)
            self._last_attempt = step
            per_refresh = spent * (self.power_iters + 1) / (iters + 1)
            self.refresh_seconds = per_refresh  # cost of one refresh, from this estimate's time
            if self.every == "auto":
                self._set_auto_interval(per_refresh, step)

    def estimate_share(self) -> float:
        """The fraction of the step time the ``auto`` interval gives the λ̂ estimates.

        ``overhead_target``, less the per-step costs when ``share_step_costs`` is on (so the
        probe, its owner and the estimates together keep to the target), but never less than
        ``MIN_ESTIMATE_SHARE`` of it: the guard needs fresh estimates even when the per-step
        costs alone exceed the target. Under ``cost_model="steps"`` no timing enters: with
        ``share_step_costs`` it is that least share, else the whole target.
        """
        target = self.overhead_target
        if self.share_step_costs and self.cost_model == "steps":
            return MIN_ESTIMATE_SHARE * target
        step_cost, step_time = self.meter.step_cost_seconds, self.meter.step_time
        if not (self.share_step_costs and step_cost and step_time):
            return target
        return max(target - step_cost / step_time, MIN_ESTIMATE_SHARE * target)

    def _set_auto_interval(self, refresh_seconds: float, step: int) -> None:
        """The ``auto`` interval after an estimate, priced by :attr:`cost_model`."""
        need: float | None = None  # None: keep the interval (min_every before any refresh)
        if self.cost_model == "steps":  # counts only: the same on every run
            if step > 1:  # as below, where an estimate in the first step finds no timing
                need = estimate_cost_steps(self.power_iters) / self.estimate_share()
        elif self.meter.step_time is not None:
            need = refresh_seconds / (self.estimate_share() * self.meter.step_time)
        if need is not None:
            self.interval = max(self.min_every, math.ceil(need))
            if self.max_every is not None:
                self.interval = min(self.interval, self.max_every)
        if self.sync is not None and self.cost_model == "seconds":  # timings differ: rank 0's
            self.interval = round(self.sync.from_rank0(self.interval))

    def follow_budget(self, kind: str) -> None:
        """Price refreshes as the serving scheduler's budget counts (``"steps"``/``"seconds"``).

        A probe built with ``cost_model=None`` takes ``kind``; an explicit ``"steps"`` is kept
        under any budget. An explicit ``"seconds"`` under a step budget raises: measured times
        would decide the interval, and the run would not be reproducible.
        """
        if not self._cost_model_given:
            self.cost_model = kind
        elif self.cost_model == "seconds" and kind == "steps":
            raise GraffConfigError(
                "this CurvatureProbe was built with cost_model='seconds', but the scheduler "
                "has a step budget, under which no measured time may decide anything (runs "
                "are reproducible); use cost_model=None or 'steps', or a wall-clock budget."
            )

    # ------------------------------------------------------------------ how
    def _start_vector(self) -> list[Tensor]:
        if self._v is not None:
            return [
                dequantize_int8(q.to(p.device), scale)
                for (q, scale), p in zip(self._v, self.params, strict=True)
            ]
        gen = torch.Generator().manual_seed(self.seed)
        return [torch.randn(p.shape, generator=gen).to(p.device) for p in self.params]

    def _probe_loss(self) -> Tensor:
        loss = self.loss_fn() if self.loss_fn is not None else self._capture.loss()
        if not isinstance(loss, Tensor) or loss.numel() != 1 or not loss.requires_grad:
            raise ProbeError(
                f"the probe loss must be a scalar tensor with a grad graph, got {loss!r}."
            )
        return loss.reshape(())

    def _top_eigenpair(self, iters: int, scale: list[Tensor] | None) -> tuple[float, list[Tensor]]:
        """Build the probe graph (model in eval mode) and iterate; the top eigenpair of ``M``."""
        modules = list(self.model.modules()) if self.model is not None else []
        modes = [m.training for m in modules]
        try:
            # Neither fused attention kernels (flash, memory-efficient) nor compiled graphs have
            # a double backward: the math kernel, and a compiled model run eagerly.
            with probing(), eager(), torch.enable_grad(), sdpa_kernel([SDPBackend.MATH]):
                if self.model is not None:
                    self.model.eval()
                hvp = make_hvp(self._probe_loss(), self.params)
                if self.sync is not None:  # the Hessian of the mean of the ranks' probe losses
                    hvp = self.sync.averaged_hvp(hvp)
                # the largest Ritz value: an indefinite Hessian needs no second, shifted run
                lam, v = lanczos(hvp, self._start_vector(), iters, scale)
        except RuntimeError as err:
            if not any(sign in str(err) for sign in _NO_DOUBLE_BACKWARD):
                raise
            raise ProbeError(
                "λ̂ needs a double backward through the model, which a torch.compile-d graph does "
                "not have, and this torch cannot run the compiled model eagerly "
                "(torch.compiler.set_stance, torch >= 2.6). Upgrade torch, or pass loss_fn= "
                "computing the probe loss with the uncompiled model."
            ) from err
        finally:
            for m, mode in zip(modules, modes, strict=True):
                m.training = mode
        return lam, v

    def _estimate(self, iters: int, publish: bool = True) -> float | None:
        """``iters`` Lanczos steps; ``publish=False`` keeps only the Ritz vector (returns λ or None)."""
        scale = None
        if self.kind is not None:
            scale = inverse_sqrt_preconditioner(
                self.optimizer, self.params, self.kind, self.preconditioner_floor
            )
            if scale is None:
                return self.lambda_max if publish else None
        lam, v = self._top_eigenpair(iters, scale)
        if not math.isfinite(lam):
            self.dropped_estimates += 1
            return self.lambda_max if publish else None
        self._v = [quantize_int8(x) for x in v]
        if not publish:
            return lam
        self.lambda_max = lam
        self.n_estimates += 1
        return lam

    # ------------------------------------------------------------------ lifecycle
    def remove(self) -> None:
        """Detach the probe-batch capture's forward hook (idempotent)."""
        if self._capture is not None:
            self._capture.remove()

    def state_dict(self) -> dict[str, Any]:
        """The eigenvector (bfloat16, exact), estimate, counters, interval and probe batch."""
        return {
            "kind": self.kind,
            "eigenvector": save_eigenvector(self._v),
            "lambda_max": self.lambda_max,
            "last_attempt_step": self._last_attempt,
            "interval": self.interval,
            "cold_iters_done": self._cold_done,
            "n_estimates": self.n_estimates,
            "dropped_estimates": self.dropped_estimates,
            "probe_inputs": None if self._capture is None else self._capture.get(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output; checks keys, preconditioner and eigenvector size."""
        check_estimator_state(state)
        if state["kind"] != self.kind:
            raise CheckpointError(
                f"state was saved with preconditioner {state['kind']!r}, this probe uses {self.kind!r}."
            )
        self._v = load_eigenvector(state["eigenvector"], self.params)
        self.lambda_max = None if state["lambda_max"] is None else float(state["lambda_max"])
        last_attempt = state["last_attempt_step"]
        if last_attempt is not None and (
            isinstance(last_attempt, bool) or not isinstance(last_attempt, int)
        ):
            raise CheckpointError(
                f"CurvatureProbe state has invalid last_attempt_step={last_attempt!r:.40}."
            )
        self._last_attempt = last_attempt
        self.interval = int(state["interval"])
        self._cold_done = int(state["cold_iters_done"])
        self.n_estimates = int(state["n_estimates"])
        self.dropped_estimates = int(state["dropped_estimates"])
        if self._capture is not None:
            self._capture.set(state["probe_inputs"])
