"""The curvature probe: per-block hypergradients and secants every step, λ̂_max by HVPs.

Two kinds of signal, read through ``Optimizer.register_step_pre_hook``/``register_step_post_hook``
so that any torch optimizer works:

* **Every step, almost free** (dot products of tensors that already exist). With
  :math:`\\Delta\\theta_t = \\theta_{t+1} - \\theta_t` the update the optimizer applied and
  :math:`g_t = \\nabla L_t(\\theta_t)`, for each block :math:`i`

  .. math::

      h_i = \\langle g_{t+1,i}, \\Delta\\theta_{t,i}\\rangle = \\frac{\\partial L_{t+1}}{\\partial\\log m_{t,i}},
      \\qquad s_i = \\frac{\\langle g_{t+1,i} - g_{t,i}, \\Delta\\theta_{t,i}\\rangle}{\\lVert\\Delta\\theta_{t,i}\\rVert^2},
      \\qquad q_i = \\frac{\\langle g_{t+1,i} - g_{t,i}, \\Delta\\theta_{t,i}\\rangle}{-\\langle g_{t,i}, \\Delta\\theta_{t,i}\\rangle},

  the hypergradient of Baydin et al. for a per-block LR multiplier :math:`m_{t,i}` (the update
  is linear in the LR), the secant curvature along the update, and its dimensionless ratio.
* **Every few steps**: :math:`\\hat\\lambda_{\\max}`, estimated and scheduled by
  :class:`graff.probes.lambda_max.LambdaMaxEstimator`, which the probe holds and drives from
  its post-step hook.

The secant is *not* a λ_max estimator: it measures the curvature along the update, or, under
minibatch noise, ≈ 1/η whatever the curvature (measurements: ``docs/concepts/probes.md``). Its
windowed maximum :attr:`CurvatureProbe.tripwire` is a divergence alarm (q > 2 means the loss
along the last update grew like an unstable mode), not a bound for the guard. The guard uses
:attr:`CurvatureProbe.lambda_max_safe`.

Memory: one copy of the trainable parameters (the Δθ buffer, :mod:`graff.probes._update`) plus
the estimator's int8 eigenvector; per sampled step the hooks run a fixed number of kernels
whatever the number of parameters (``docs/concepts/probes.md``, "Memory and per-step cost").

References:
    Baydin et al., "Online Learning Rate Adaptation with Hypergradient Descent", ICLR 2018,
    https://arxiv.org/abs/1703.04782.
    Cohen et al., "Gradient Descent on Neural Networks Typically Occurs at the Edge of
    Stability", ICLR 2021, https://arxiv.org/abs/2103.00065.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from graff._checks import check_optimizer_and_model, check_positive_int
from graff._hooks import HookSet, hook_state, restore_hooks
from graff._warn import warn
from graff.blocks import Block
from graff.distributed import is_sharded, local_shard, unwrap_data_parallel
from graff.errors import (
    GraffConfigError,
    GraffTypeError,
    ProbeError,
    ProbeWarning,
)
from graff.probes._forwarding import forward_attributes
from graff.probes._inputs import (
    SHARDED_LAMBDA_OFF,
    SparseGradCheck,
    check_blocks,
    check_update_dtype,
    lambda_off_message,
    reject_sparse_modules,
)
from graff.probes._overhead import OverheadMeter
from graff.probes._state import CURVATURE_FORMAT_VERSION, check_curvature_state
from graff.probes._update import UpdateBuffer
from graff.probes.lambda_max import MIN_ESTIMATE_SHARE, LambdaMaxEstimator, estimate_cost_steps
from graff.probes.preconditioner import PRECONDITIONER_FLOOR
from graff.probes.stats import CurvatureStats, _derived_stats

__all__ = ["MIN_ESTIMATE_SHARE", "CurvatureProbe", "CurvatureStats", "estimate_cost_steps"]


@forward_attributes
class CurvatureProbe:
    """Hypergradients and secants every step, and λ̂_max (HVP Lanczos) every few steps.

    The per-step statistics come from the optimizer's pre/post-step hooks (module docstring);
    λ̂_max comes from a :class:`~graff.probes.lambda_max.LambdaMaxEstimator` the probe holds
    (:attr:`estimator`), whose public readings it forwards. The guard reads
    ``lambda_max_safe = margin × lambda_max``: a Ritz value approaches λ_max from below.

    The arguments of the λ̂ estimate and its refresh schedule (``every``, ``power_iters``,
    ``initial_iters``, ``margin``, ``overhead_target``, ``min_every``, ``max_every``,
    ``chunk_iters``, ``start_step``, ``preconditioned``, ``preconditioner_floor``,
    ``share_step_costs``, ``cost_model``, ``seed``) are documented at
    :class:`~graff.probes.lambda_max.LambdaMaxEstimator`.

    Args:
        optimizer: Any ``torch.optim.Optimizer``; hooks are registered on it. They hold the
            probe weakly and go when it is collected: keep a reference while it should probe.
        model: Optional model. Its LoRA modules become blocks, and when ``loss_fn`` is None the
            inputs of its first gradient-enabled forward pass are the probe batch, re-run as
            ``model(**inputs).loss``. The model runs in eval mode during an estimate.
        blocks: None (:func:`graff.blocks.discover_blocks`), a list of ``Block`` or a mapping.
        loss_fn: Optional closure returning the scalar loss on a fixed batch (with grad graph).
            It must not call ``backward()``.
        hvp: False turns the λ̂ estimates off (per-step statistics only).
        secant_window: Number of steps the tripwire takes its maximum over.
        stats_every: Take a per-step sample (hypergradient, secant, tripwire) for every
            ``stats_every``-th update only; 1 samples every update. The other steps cost one
            hook call: the Δθ copy is skipped. Window sums of sampled steps estimate the sums
            over all steps without bias (a fixed stride), at ``1/stats_every`` of the cost.
        update_dtype: Storage dtype of the buffered update Δθ (``None``: the parameters'
            dtype, exact). ``torch.bfloat16`` halves the probe's copy of the trainable
            parameters: Δθ_t is rounded once to bfloat16 (at most 2⁻⁹ relative error per entry;
            the sums over many entries err far less: ``docs/concepts/probes.md``).
            :meth:`scale_last_update` needs the exact update and raises then.

    Attributes:
        last: The :class:`CurvatureStats` of the last sampled update (None before one).
        estimator: The λ̂ estimator. Its readings and settings are the probe's too (read and
            write through): ``lambda_max``, ``interval``, ``n_estimates``, ``dropped_estimates``,
            ``hvp``, ``sync``, ``kind``, ``refresh_seconds``, ``cost_model`` and the arguments.
        meter: The :class:`~graff.probes._overhead.OverheadMeter`; ``overhead_seconds``,
            ``hook_seconds``, ``estimate_seconds`` and ``step_cost_seconds`` read through.

    Raises:
        GraffTypeError, GraffConfigError: On a bad argument (the message names it).
        GraffConfigError: Sparse gradients are not supported: at construction if ``model``
            has an ``nn.Embedding``/``nn.EmbeddingBag`` with ``sparse=True``, else from
            ``optimizer.step()`` (before any update) when a sparse gradient first appears.

    Examples:
        >>> p = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
        >>> opt = torch.optim.SGD([p], lr=0.1)
        >>> probe = CurvatureProbe(opt, loss_fn=lambda: 5.0 * p[0] ** 2 + 0.5 * p[1] ** 2, every=1)
        >>> round(probe.estimate_lambda_max(), 3)
        10.0
        >>> probe.remove()
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        model: nn.Module | None = None,
        blocks: Sequence[Block] | Mapping[str, Any] | None = None,
        loss_fn: Callable[[], Tensor] | None = None,
        every: int | str = "auto",
        power_iters: int = 3,
        initial_iters: int = 20,
        margin: float = 1.15,
        overhead_target: float = 0.01,
        min_every: int = 10,
        preconditioned: bool | None = None,
        hvp: bool = True,
        secant_window: int = 20,
        seed: int = 0,
        start_step: int | None = None,
        stats_every: int = 1,
        max_every: int | None = None,
        chunk_iters: int | None = None,
        update_dtype: torch.dtype | None = None,
        share_step_costs: bool = False,
        cost_model: str | None = None,
        preconditioner_floor: float = PRECONDITIONER_FLOOR,
    ) -> None:
        check_optimizer_and_model(optimizer, model)
        model = None if model is None else unwrap_data_parallel(model)  # DDP: its inner module
        if not isinstance(hvp, bool):
            raise GraffTypeError(f"hvp must be a bool, got {hvp!r}.")
        secant_window = check_positive_int("secant_window", secant_window)
        self.stats_every = check_positive_int("stats_every", stats_every)
        self.update_dtype = check_update_dtype(update_dtype)
        self.optimizer, self.model = optimizer, model
        hvp = self._init_params(model, blocks, hvp)
        self.meter = OverheadMeter()
        self.estimator = LambdaMaxEstimator(
            optimizer,
            [p for p in self._params if p.requires_grad],
            model=model,
            loss_fn=loss_fn,
            meter=self.meter,
            enabled=hvp,
            every=every,
            power_iters=power_iters,
            initial_iters=initial_iters,
            margin=margin,
            overhead_target=overhead_target,
            min_every=min_every,
            max_every=max_every,
            chunk_iters=chunk_iters,
            start_step=start_step,
            preconditioned=preconditioned,
            share_step_costs=share_step_costs,
            cost_model=cost_model,
            seed=seed,
            preconditioner_floor=preconditioner_floor,
        )
        self._init_update_buffer(secant_window)
        self.step = 0
        self.dropped_samples = 0
        self._hooks = HookSet(self)
        self._register_hooks()

    def _init_params(self, model: nn.Module | None, blocks: Any, hvp: bool) -> bool:
        """The probed blocks and parameters; returns ``hvp``, False under FSDP sharding."""
        self.blocks = check_blocks(self.optimizer, model, blocks)
        self._params = [p for b in self.blocks for p in b.params]
        reject_sparse_modules(model, self._params)
        self._block_of = torch.tensor([i for i, b in enumerate(self.blocks) for _ in b.params])
        # FSDP2: per-step dot products run on local shards and are summed over the ranks.
        self._sharded = torch.tensor([is_sharded(p) for p in self._params], dtype=torch.bool)
        self._dtensor = any(hasattr(p, "to_local") for p in self._params)
        if hvp and bool(self._sharded.any()):
            warn(SHARDED_LAMBDA_OFF, ProbeWarning)
            return False
        return hvp

    def _init_update_buffer(self, secant_window: int) -> None:
        self._update = UpdateBuffer(
            self._loc(self._params), self._block_of.tolist(), self.update_dtype
        )
        self._all = list(range(len(self._params)))
        self._blocks_of = self._block_of.tolist()
        self._sparse_check = SparseGradCheck(self._params)
        self._pending: list[int] = []
        self._window: deque[float] = deque(maxlen=secant_window)
        self.last: CurvatureStats | None = None

    def _register_hooks(self) -> None:
        """Hook the optimizer's steps (also on a copy: torch's ``Optimizer`` drops its hooks when
        copied). The hooks hold the probe weakly and go when it is collected (graff._hooks)."""
        self._hooks.add(self.optimizer.register_step_pre_hook, "_pre_hook")
        self._hooks.add(self.optimizer.register_step_post_hook, "_post_hook")

    def __getstate__(self) -> dict[str, Any]:
        return hook_state(self)

    def __setstate__(self, state: dict[str, Any]) -> None:
        """A copy (``deepcopy``, pickle) hooks the optimizer it holds."""
        restore_hooks(self, state)

    # ------------------------------------------------------------------ public readings
    @property
    def lambda_max_safe(self) -> float | None:
        """``margin × lambda_max`` (the value the guard should use), or None before an estimate."""
        return self.estimator.lambda_max_safe

    @property
    def tripwire(self) -> float | None:
        """Max of the global secant ratio q over the last ``secant_window`` steps (None before).

        A divergence alarm, not a λ_max estimate: on a quadratic q = η·(curvature along the
        update), which exceeds 2 only when the update excites an unstable direction, and under
        minibatch noise q ≈ 1 whatever λ_max is (``docs/concepts/probes.md``).
        """
        return max(self._window) if self._window else None

    @property
    def _collective(self) -> bool:
        """Per-step statistics are partial sums over FSDP shards, reduced over the ranks."""
        return self._dtensor and self.sync is not None

    def _loc(self, ts: list[Tensor]) -> list[Tensor]:
        """``ts``, or their local shards if the probed parameters are DTensors (FSDP2)."""
        return [local_shard(t) for t in ts] if self._dtensor else ts

    # ------------------------------------------------------------------ per-step statistics
    def _pre_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        t0 = time.perf_counter()
        update = self._update
        sample = self.step % self.stats_every == 0
        if not (sample or update.valid or update.has_update):  # nothing buffered, nothing to take
            self._pending = []
            self.meter.add_hook(time.perf_counter() - t0)
            return
        with torch.no_grad():
            grads = [p.grad for p in self._params]
            n = len(grads)
            have = [j for j, g in enumerate(grads) if g is not None]
            if self._collective and update.has_update:
                # FSDP: every rank must take part in the reduction of this sample, so the
                # decision to drop it is made after the all-reduce, from the reduced data.
                self._record(grads, [j for j in have if j in update.valid], False)
            elif update.has_update and update.incomplete:
                self.dropped_samples += 1  # the last update had non-finite entries
            elif update.valid:
                full = len(have) == n and len(update.valid) == n
                both = self._all if full else [j for j in have if j in update.valid]
                if both:
                    self._record(grads, both, full)
            update.valid = set()
            update.incomplete = update.has_update = False
            self._pending = have if have and sample else []
            if self._pending:
                self._sparse_check.check(have)
                self._update.hold(self._loc(self._params), have)
        self.meter.add_hook(time.perf_counter() - t0)

    def _record(self, grads: list[Tensor | None], idx: list[int], full: bool) -> None:
        """Turn the buffered Δθ_t and the new gradients into one per-block sample.

        The buffer holds ``D = −Δθ_t`` (the post-step hook skips the negation: one pass less).
        The new gradients are brought into the buffer's layout by one concatenation, then
        ``⟨g_{t+1}, D⟩`` and ``‖g_{t+1}‖²`` per parameter are two row reductions and one
        ``index_add`` (see :mod:`graff.probes._flat`); ``⟨g_t, Δθ_t⟩`` and ``‖Δθ_t‖²`` come from
        the post-step hook. The parameters in ``idx`` are summed into blocks and the few ratios
        formed on the host (float64, then rounded to float32 once).
        Drops the sample if a statistic is not finite in float32. Under FSDP the block sums are
        partial sums over this rank's shards, summed over the ranks in one all-reduce
        (replicated parameters count on rank 0 only).
        """
        if self._collective and self.sync is not None and self.sync.rank != 0:
            idx = [j for j in idx if bool(self._sharded[j])]
            full = False
        gs = self._loc([grads[j] for j in idx])
        nb = len(self.blocks)
        raw = [[0.0] * nb for _ in range(4)]  # −hyper, usq, gsq, gdu per block
        if gs:
            flat = self._update.flat
            # g_{t+1} in the buffer's layout (entries outside idx multiply zeros or are ignored)
            full_grads = gs if full else list(flat.views)
            if not full:
                for j, g in zip(idx, gs, strict=True):
                    full_grads[j] = g
            rows = flat.dots_with(full_grads, self_dot=True)
            per_param = flat.param_totals(rows)  # −⟨g_{t+1}, Δθ_t⟩, ‖g_{t+1}‖² per parameter
            neg_h, gsq, usq, gdu = torch.cat(
                [per_param, self._update.usq[None], self._update.gdu[None]]
            ).tolist()
            block_of = self._blocks_of
            for j in idx:
                b = block_of[j]
                raw[0][b] += neg_h[j]
                raw[1][b] += usq[j]
                raw[2][b] += gsq[j]
                raw[3][b] += gdu[j]
        if self._collective and self.sync is not None:
            flag = [[float(self._update.incomplete)] * nb]
            packed = torch.tensor(raw + flag, dtype=torch.float32).reshape(-1)
            packed = self.sync.sum_partials(packed, torch.ones(len(packed), dtype=torch.bool))
            reduced = packed.view(5, nb).tolist()
            raw = reduced[:4]
            if reduced[4][0] > 0:  # some rank's last update had non-finite entries
                self.dropped_samples += 1
                return
        stats, q = _derived_stats(raw)
        if stats is None:
            self.dropped_samples += 1
            return
        self.last = CurvatureStats(self.step - 1, *stats.unbind(0))
        self._window.append(q)  # q of the whole update

    def _post_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        t0 = time.perf_counter()
        if self._pending:
            self._buffer_update(self._pending)
        self.step += 1
        self.meter.add_hook(time.perf_counter() - t0)
        self.meter.close_step(t0)
        if self.estimator.due(self.step):
            self._scheduled_estimate()
        self.meter.hooks_done()

    def _buffer_update(self, idx: list[int]) -> None:
        """Δθ_t of the parameters in ``idx`` into the buffer, with ⟨g_t, Δθ_t⟩ and ‖Δθ_t‖²."""
        with torch.no_grad():
            grads = self._loc([self._params[j].grad for j in idx])
            self._update.take(self._loc(self._params), idx, grads)

    # ------------------------------------------------------------------ λ̂_max
    def add_step_cost(self, seconds: float) -> None:
        """Count ``seconds`` of per-step work outside the probe (``share_step_costs``).

        A scheduler reports its own per-step time here, so the ``auto`` interval leaves the
        λ̂ estimates only what the per-step costs leave of ``overhead_target``.
        """
        self.meter.add_step_cost(seconds)

    def _follow_budget(self, kind: str) -> None:
        """:meth:`LambdaMaxEstimator.follow_budget`: price refreshes as the scheduler's budget."""
        self.estimator.follow_budget(kind)

    def estimate_lambda_max(self, iters: int | None = None) -> float | None:
        """Run ``iters`` Lanczos steps now (default: ``initial_iters`` first, then ``power_iters``).

        Returns:
            The new raw estimate (also in :attr:`lambda_max`); the previous one (possibly None)
            if a Hessian-vector product was not finite (counted in ``dropped_estimates``).

        Raises:
            ProbeError: If the probe cannot evaluate the loss (no ``loss_fn``, no ``model``, or
                ``hvp=False``), no probe batch has been captured yet, or an adaptive optimizer
                has no state yet.
        """
        return self._timed_estimate(self.estimator.requested_iters(iters))

    def _timed_estimate(self, iters: int, publish: bool = True) -> float | None:
        """Every λ̂ estimate runs through here (one place to meter them, as benchmarks do)."""
        return self.estimator.timed_estimate(iters, self.step, publish)

    def _scheduled_estimate(self) -> None:
        """The post-step hook's estimate; a ProbeError turns λ̂ off (never crash training)."""
        try:
            self.estimator.run_scheduled(self._timed_estimate)
        except ProbeError as err:  # e.g. the model's output has no .loss
            self.hvp = False
            warn(lambda_off_message(err), ProbeWarning)

    def scale_last_update(self, scales: Tensor) -> None:
        """Rescale the update just applied, block by block: θ ← θ + (s_i − 1)·Δθ_i.

        For an optimizer whose update is linear in the LR this is exactly a per-block LR
        multiplier applied after ``optimizer.step()`` (GraffScheduler's block multipliers). The
        stored Δθ, ⟨g_t, Δθ_t⟩ and ‖Δθ_t‖² are rescaled too, so the next sample (hypergradient,
        update norm, secant) refers to the update that was really applied. Call it after ``optimizer.step()`` and before the next one.

        Args:
            scales: Positive finite factors, one per block (shape ``[n_blocks]``).
        """
        if self._update.narrow:
            raise GraffConfigError(
                f"scale_last_update rescales the applied update exactly, but this probe stores "
                f"it in {self.update_dtype}; build it with update_dtype=None."
            )
        if (
            scales.shape != (len(self.blocks),)
            or not bool(torch.isfinite(scales).all())
            or bool((scales <= 0).any())
        ):
            raise GraffConfigError(
                f"scales must hold {len(self.blocks)} finite positive factors, got {scales!r}."
            )
        idx = sorted(self._update.valid)
        factors = scales.double()[self._block_of[idx]].tolist() if idx else []
        with torch.no_grad():
            self._update.rescale(self._loc([self._params[j] for j in idx]), factors)

    # ------------------------------------------------------------------ lifecycle
    def remove(self) -> None:
        """Detach every hook this probe registered (idempotent; also done when it is collected)."""
        self._hooks.remove()
        self.estimator.remove()

    def state_dict(self) -> dict[str, Any]:
        """Named tensors and numbers, with ``format_version``; loadable with ``weights_only=True``.

        The last applied update Δθ (so the first step after a resume has statistics), counters,
        and the estimator's state (eigenvector, estimate, interval, probe batch).
        """
        return {
            "format_version": CURVATURE_FORMAT_VERSION,
            "step": self.step,
            "dropped_samples": self.dropped_samples,
            "overhead_seconds": self.overhead_seconds,
            "update": self._update.saved(),
            "grad_dot_update": self._update.gdu.clone(),
            "window": list(self._window),
            "last": None if self.last is None else dataclasses.asdict(self.last),
            "estimator": self.estimator.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output; checks version, keys and the eigenvector size."""
        check_curvature_state(state)
        self.estimator.load_state_dict(state["estimator"])
        self.step = int(state["step"])
        self.dropped_samples = int(state["dropped_samples"])
        self.overhead_seconds = float(state["overhead_seconds"])
        self._load_update_state(state)

    def _load_update_state(self, state: Mapping[str, Any]) -> None:
        """Restore the last applied update Δθ, so the first step after a resume has statistics."""
        self._update.load(state["update"], state["grad_dot_update"], self._loc(self._params))
        self._window.clear()
        self._window.extend(float(q) for q in state["window"])
        last = state["last"]
        self.last = None if last is None else CurvatureStats(**last)
