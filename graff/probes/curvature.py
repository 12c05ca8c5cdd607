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
* **Every few steps**: :math:`\\hat\\lambda_{\\max}` by warm-started power iteration with
  Hessian-vector products on a fixed probe batch, of :math:`H` (SGD) or of the preconditioned
  :math:`P^{-1/2} H P^{-1/2}` (adaptive optimizers, see :mod:`graff.probes.preconditioner`).

The secant is *not* a λ_max estimator (``feasibility.md``): without noise it measures the
curvature along the update, 0.2–1.3 % of λ_max on quadratics; with minibatch noise it returns
≈ 1/η whatever the curvature. Its windowed maximum :attr:`CurvatureProbe.tripwire` is a
divergence alarm (q > 2 means the loss along the last update grew like an unstable mode), not a
bound for the guard. The guard uses :attr:`CurvatureProbe.lambda_max_safe`.

Memory: one copy of the trainable parameters (the Δθ buffer, parameter dtype, in one flat
parameter-padded tensor: :mod:`graff.probes._flat`) plus the warm-start eigenvector in int8 with
a power-of-two scale per tensor (a quarter of a float32 copy); during a sampled step's hooks, a
transient copy of the gradients in the buffer's layout; during an estimate, the double-backward
graph of the probe batch and a few float32 vectors. Per sampled update the hooks run a fixed
number of kernels whatever the number of parameters: a copy of θ_t and a subtraction (with a
narrower buffer, θ_t and θ_{t+1} are gathered into the buffer's flat layout by one concatenation
each, and Δθ is rounded into the buffer by one cast), two concatenations of the gradients, row
reductions and ``index_add`` over the rows.

References:
    Baydin et al., "Online Learning Rate Adaptation with Hypergradient Descent", ICLR 2018,
    https://arxiv.org/abs/1703.04782.
    Cohen et al., "Gradient Descent on Neural Networks Typically Occurs at the Edge of
    Stability", ICLR 2021, https://arxiv.org/abs/2103.00065.
    Cohen et al., "Adaptive Gradient Methods at the Edge of Stability", 2022,
    https://arxiv.org/abs/2207.14484.
    Pearlmutter, "Fast Exact Multiplication by the Hessian", Neural Computation, 1994.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from graff._hooks import HookSet, hook_state, restore_hooks
from graff._validation import check_in_range, check_optimizer_and_model, check_positive_int
from graff.blocks import Block, discover_blocks
from graff.distributed import RankSync, is_sharded, local_shard, unwrap_data_parallel
from graff.errors import CheckpointError, GraffConfigError, GraffTypeError, ProbeError
from graff.probes._context import probing
from graff.probes._flat import FlatBlockBuffer
from graff.probes._hvp import (
    InputCapture,
    dequantize_int8,
    make_hvp,
    power_iteration,
    quantize_int8,
)
from graff.probes.preconditioner import inverse_sqrt_preconditioner, preconditioner_kind

FORMAT_VERSION = 1
#: Least fraction of ``overhead_target`` the ``auto`` interval leaves the λ̂ estimates when
#: ``share_step_costs`` is on and the per-step costs take (nearly) all of it.
MIN_ESTIMATE_SHARE = 0.25
#: Cost of one Hessian-vector product in training steps (``cost_model="steps"``): one double
#: backward through the probe batch's gradient graph, about two forward and backward passes.
HVP_STEPS = 2.0
#: Cost of building that graph (one forward and one backward of the probe batch with
#: ``create_graph=True``) in training steps, paid once per estimate.
GRAPH_STEPS = 1.0
COST_MODELS = ("steps", "seconds")


def estimate_cost_steps(products: int) -> float:
    """Cost of one λ̂ estimate of ``products`` Hessian-vector products, in training steps.

    ``GRAPH_STEPS + HVP_STEPS · products``: a price from counts alone, so that decisions taken
    from it (the ``auto`` interval under ``cost_model="steps"``, GraffScheduler's refresh
    allowance under a step budget) are the same on every run, whatever the machine is doing.
    It takes the probe batch to be about one training batch, as a captured one is (the inputs of
    a training forward pass); a ``loss_fn`` on a larger batch costs proportionally more.
    """
    return GRAPH_STEPS + HVP_STEPS * products


_STATE_KEYS = frozenset(
    {
        "format_version",
        "kind",
        "eigenvector",
        "lambda_max",
        "step",
        "last_attempt_step",
        "interval",
        "n_estimates",
        "dropped_estimates",
        "dropped_samples",
        "overhead_seconds",
        "probe_inputs",
        "update",
        "grad_dot_update",
        "window",
        "last",
        "cold_iters_done",
    }
)


@dataclass(frozen=True)
class CurvatureStats:
    """Per-block statistics of one update, tensors of shape ``[n_blocks]`` (float32, CPU).

    Attributes:
        step: Index ``t`` of the optimizer step whose update :math:`\\Delta\\theta_t` is described.
        hypergrad: :math:`\\langle g_{t+1,i}, \\Delta\\theta_{t,i}\\rangle = \\partial L_{t+1}/\\partial\\log m_{t,i}`.
        grad_dot_update: :math:`\\langle g_{t,i}, \\Delta\\theta_{t,i}\\rangle`.
        update_sq_norm: :math:`\\lVert\\Delta\\theta_{t,i}\\rVert^2`.
        grad_sq_norm: :math:`\\lVert g_{t+1,i}\\rVert^2`.
        secant: :math:`\\langle g_{t+1,i}-g_{t,i}, \\Delta\\theta_{t,i}\\rangle/\\lVert\\Delta\\theta_{t,i}\\rVert^2`
            (0 where the block did not move).
        secant_ratio: :math:`q_i = \\langle g_{t+1,i}-g_{t,i}, \\Delta\\theta_{t,i}\\rangle/(-\\langle g_{t,i}, \\Delta\\theta_{t,i}\\rangle)`
            (0 where the denominator is 0).
    """

    step: int
    hypergrad: Tensor
    grad_dot_update: Tensor
    update_sq_norm: Tensor
    grad_sq_norm: Tensor
    secant: Tensor
    secant_ratio: Tensor


_F32_LIMIT = 3.4028235677973366e38  # |x| below this rounds to a finite float32


def _derived_stats(raw: list[list[float]]) -> tuple[Tensor | None, float]:
    """``([6, n_blocks] float32 statistics, q of the whole update)``, or ``(None, nan)``.

    ``raw`` holds the block sums ``[−hyper, usq, gsq, gdu]`` (lists of ``n_blocks`` floats). Rows
    of the result: hypergrad, ⟨g_t, Δθ_t⟩, ‖Δθ‖², ‖g‖², secant, ratio; the whole update's values
    are the sums over blocks. The handful of divisions are done on the host in float64 (a ratio
    is 0 where its denominator is 0), then rounded to float32 once; ``None`` if any value
    (blocks or whole update) is not finite in float32.
    """
    neg_hyper, usq, gsq, gdu = ([*row, sum(row)] for row in raw)
    hyper = [-x for x in neg_hyper]
    curv = [h - d for h, d in zip(hyper, gdu, strict=True)]
    secant = [c / u if u != 0 else 0.0 for c, u in zip(curv, usq, strict=True)]
    ratio = [c / -d if d != 0 else 0.0 for c, d in zip(curv, gdu, strict=True)]
    rows = (hyper, gdu, usq, gsq, secant, ratio)
    if not all(-_F32_LIMIT < x < _F32_LIMIT for row in rows for x in row):  # NaN fails too
        return None, math.nan
    return torch.tensor([row[:-1] for row in rows], dtype=torch.float32), ratio[-1]


def _check_update_dtype(dtype: Any) -> torch.dtype | None:
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise GraffConfigError(
            f"update_dtype must be None or a floating torch.dtype, got {dtype!r}."
        )
    return dtype


def _check_cost_model(cost_model: Any) -> str | None:
    if cost_model is not None and cost_model not in COST_MODELS:
        raise GraffConfigError(
            f"cost_model must be None, 'steps' or 'seconds', got {cost_model!r}."
        )
    return cost_model


def _check_blocks(
    optimizer: torch.optim.Optimizer, model: nn.Module | None, blocks: Any
) -> list[Block]:
    if blocks is None or isinstance(blocks, Mapping):
        return discover_blocks(optimizer, model, blocks)
    blocks = list(blocks)
    if not blocks or not all(isinstance(b, Block) for b in blocks):
        raise GraffTypeError(
            f"blocks must be None, a mapping {{name: parameters}} or a non-empty list of "
            f"graff.blocks.Block, got {blocks!r}."
        )
    return blocks


_SPARSE_HINT = (
    "graff's curvature probe (used by GraffScheduler and ReactorScheduler) reads dense "
    "gradients only; build the module with sparse=False, or use graff.BudgetScheduler, "
    "which reads no gradients."
)


def _reject_sparse_modules(model: nn.Module | None, params: Sequence[Tensor]) -> None:
    """Raise if ``model`` has an embedding with ``sparse=True`` whose weight is probed."""
    if model is None:
        return
    ids = {id(p) for p in params}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse and id(m.weight) in ids:
            raise GraffConfigError(f"{name or type(m).__name__} has sparse=True: {_SPARSE_HINT}")


def _reject_sparse_grad(p: Tensor) -> None:
    """Raise (before the optimizer step runs) if ``p`` has a sparse gradient."""
    if p.grad is not None and p.grad.layout != torch.strided:
        raise GraffConfigError(
            f"a parameter of shape {tuple(p.shape)} has a sparse gradient ({p.grad.layout}): "
            + _SPARSE_HINT
        )


class CurvatureProbe:
    """Hypergradients and secants every step, and λ̂_max (HVP power iteration) every few steps.

    The top eigenvalue is estimated by power iteration on the fixed probe batch, warm-started
    from the previous eigenvector (stored in int8), with the Rayleigh quotient

    .. math::

        \\hat\\lambda_{\\max} = v^\\top M v,\\qquad M = H \\text{ (SGD, unknown)}\\ \\text{or}\\
        M = P^{-1/2} H P^{-1/2} \\text{ (Adam-type, RMSprop, Adagrad)},

    and the guard reads :math:`\\text{margin}\\cdot\\hat\\lambda_{\\max}` (``lambda_max_safe``):
    power iteration approaches :math:`\\lambda_{\\max}` from below, so a margin (1.1–1.2) makes
    the guard safe. See the module docstring for the per-step statistics and memory use.

    Args:
        optimizer: Any ``torch.optim.Optimizer``; hooks are registered on it. They hold the
            probe weakly and go when it is collected: keep a reference while it should probe.
        model: Optional model. Its LoRA modules become blocks, and when ``loss_fn`` is None the
            inputs of its first gradient-enabled forward pass are the probe batch, re-run as
            ``model(**inputs).loss``. The model runs in eval mode during an estimate.
        blocks: None (:func:`graff.blocks.discover_blocks`), a list of ``Block`` or a mapping.
        loss_fn: Optional closure returning the scalar loss on a fixed batch (with grad graph).
            It must not call ``backward()``.
        every: Refresh interval in optimizer steps, or ``"auto"`` (refresh cost / step cost
            ≤ ``overhead_target``, never below ``min_every``; priced as ``cost_model`` says).
        power_iters: Hessian-vector products per refresh.
        initial_iters: Hessian-vector products for the first estimate (cold start).
        margin: Safety factor ≥ 1 of ``lambda_max_safe``.
        overhead_target: Target fraction of training time spent in estimates (``every="auto"``);
            with ``share_step_costs``, in estimates and per-step work together.
        min_every: Smallest interval ``every="auto"`` may choose.
        preconditioned: None (auto from the optimizer class), True or False.
        hvp: False turns the λ̂ estimates off (per-step statistics only).
        secant_window: Number of steps the tripwire takes its maximum over.
        seed: Seed of the random start vector.
        stats_every: Take a per-step sample (hypergradient, secant, tripwire) for every
            ``stats_every``-th update only; 1 samples every update. The other steps cost one
            hook call: the Δθ copy is skipped. Window sums of sampled steps estimate the sums
            over all steps without bias (a fixed stride), at ``1/stats_every`` of the cost.
        max_every: Largest interval ``every="auto"`` may choose (``None``: no cap). On tiny
            models the automatic interval can exceed the whole run; a cap keeps λ̂ fresh at the
            price of more than ``overhead_target``.
        chunk_iters: Most Hessian-vector products one step's hook runs for the cold start
            (``None``: all ``initial_iters`` at once). Spreads the first estimate's one long
            step over ``ceil(initial_iters / chunk_iters)`` consecutive steps (each rebuilds the
            probe graph: one forward and backward more per chunk).
        update_dtype: Storage dtype of the buffered update Δθ (``None``: the parameters'
            dtype, exact). ``torch.bfloat16`` halves the probe's one copy of the trainable
            parameters: θ_t is then held in the parameters' dtype only from the pre-step to the
            post-step hook, and Δθ_t = θ_t − θ_{t+1} is rounded once to bfloat16 (a relative
            error of at most 2⁻⁹ per entry; the per-step statistics are sums over many entries,
            so their error is far smaller: ``docs/concepts/probes.md``). :meth:`scale_last_update`
            needs the exact update and raises with a lower-precision buffer.
        share_step_costs: The ``auto`` interval gives the estimates only what the per-step costs
            leave of ``overhead_target``: this probe's hooks plus what the owner reports with
            :meth:`add_step_cost` (a moving average per step, ``step_cost_seconds``), but at
            least ``MIN_ESTIMATE_SHARE`` (1/4) of it. GraffScheduler turns it on, so its whole
            overhead — probes, planner, guard and λ̂ — keeps to one target. Under
            ``cost_model="steps"`` the per-step costs are not measured into the decision: the
            estimates get ``MIN_ESTIMATE_SHARE`` of the target (the per-step work is taken to
            use the rest, as it does on small models).
        cost_model: How the ``auto`` interval prices a refresh. ``"steps"``: in training steps,
            from the number of Hessian-vector products (:func:`estimate_cost_steps`), so the
            interval is a function of the settings alone and a run under a step budget is
            bit-reproducible; the interval is
            ``ceil(estimate_cost_steps(power_iters) / share)``, ``share`` the fraction of
            ``overhead_target`` above (all of it without ``share_step_costs``), within
            ``[min_every, max_every]``; an estimate in the first optimizer step (SGD's cold
            start, at the initialization, whose sharpness moves fast) leaves it at
            ``min_every``, as ``"seconds"`` does, having no step timed yet then.
            ``"seconds"``: from measured times (the last estimate's
            time over a moving average of the step time), which follows the real costs but
            changes from run to run. ``None`` (default): the scheduler the probe serves picks
            by its budget, ``"seconds"`` under a wall-clock budget and ``"steps"`` under a step
            budget (an explicit ``"seconds"`` there is refused); a probe used on its own counts
            steps. Timings are measured and reported (``overhead_seconds`` and the like) either way.
        start_step: No scheduled estimate before this many optimizer steps. ``None``: 10 for
            preconditioned optimizers, whose first preconditioners are meaningless (measured on
            a char-level transformer with AdamW: λ̂ = 2.6e5 after one step, 2.2e3 after ten),
            0 otherwise. :meth:`estimate_lambda_max` can always be called directly.

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
    ) -> None:
        check_optimizer_and_model(optimizer, model)
        model = None if model is None else unwrap_data_parallel(model)  # DDP: its inner module
        if loss_fn is not None and not callable(loss_fn):
            raise GraffTypeError(f"loss_fn must be a callable returning the loss, got {loss_fn!r}.")
        if every != "auto":
            if isinstance(every, str):
                raise GraffConfigError(
                    f"every must be 'auto' or a positive integer, got {every!r}."
                )
            every = check_positive_int("every", every)
        flags = (("preconditioned", preconditioned), ("hvp", hvp))
        for name, value in (*flags, ("share_step_costs", share_step_costs)):
            optional = name == "preconditioned"
            if not (isinstance(value, bool) or (optional and value is None)):
                raise GraffTypeError(
                    f"{name} must be a bool{' or None' if optional else ''}, got {value!r}."
                )
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise GraffConfigError(f"seed must be a non-negative integer, got {seed!r}.")
        self.power_iters = check_positive_int("power_iters", power_iters)
        self.initial_iters = check_positive_int("initial_iters", initial_iters)
        self.min_every = check_positive_int("min_every", min_every)
        self.margin = check_in_range("margin", margin, 1.0, 100.0)
        self.overhead_target = check_in_range(
            "overhead_target", overhead_target, 0.0, 1.0, low_open=True
        )
        secant_window = check_positive_int("secant_window", secant_window)
        self.stats_every = check_positive_int("stats_every", stats_every)
        self.chunk_iters = (
            None if chunk_iters is None else check_positive_int("chunk_iters", chunk_iters)
        )
        self._cold_done = 0  # products of a chunked cold start run so far
        self.max_every = None if max_every is None else check_positive_int("max_every", max_every)
        if self.max_every is not None and self.max_every < self.min_every:
            raise GraffConfigError(f"max_every={max_every!r} must be >= min_every={min_every!r}.")
        kind = preconditioner_kind(optimizer)
        if preconditioned and kind is None:
            raise GraffConfigError(
                f"preconditioned=True, but graff reads no diagonal preconditioner from "
                f"{type(optimizer).__name__}; use preconditioned=None or False."
            )
        self.kind = kind if preconditioned is not False else None
        if start_step is None:
            start_step = 10 if self.kind is not None else 0
        elif isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise GraffConfigError(
                f"start_step must be a non-negative integer, got {start_step!r}."
            )
        self.start_step = start_step
        self.share_step_costs = share_step_costs
        self._cost_model_given = _check_cost_model(cost_model) is not None
        #: ``"steps"`` or ``"seconds"``: what prices a refresh for the ``auto`` interval.
        self.cost_model: str = cost_model or "steps"
        #: Moving average of the seconds per step spent in this probe's hooks (estimates
        #: excluded) plus what :meth:`add_step_cost` reported; ``None`` before the first step.
        self.step_cost_seconds: float | None = None
        self._step_costs = 0.0  # accumulated since the last post-step hook
        #: Seconds spent since construction in the per-step hooks (estimates excluded) and in
        #: λ̂ estimates (timings, not state: not saved).
        self.hook_seconds = self.estimate_seconds = 0.0
        #: Projected seconds of one refresh (``power_iters`` products + the probe graph), from
        #: the last estimate's time; ``None`` before the first estimate.
        self.refresh_seconds: float | None = None
        self.optimizer, self.model, self.loss_fn, self.every, self.seed = (
            optimizer,
            model,
            loss_fn,
            every,
            seed,
        )
        self.blocks = _check_blocks(optimizer, model, blocks)
        self._params = [p for b in self.blocks for p in b.params]
        _reject_sparse_modules(model, self._params)
        self._block_of = torch.tensor([i for i, b in enumerate(self.blocks) for _ in b.params])
        self._hvp_params = [p for p in self._params if p.requires_grad]
        # FSDP2: per-step dot products run on local shards and are summed over the ranks.
        self._sharded = torch.tensor([is_sharded(p) for p in self._params], dtype=torch.bool)
        self._dtensor = any(hasattr(p, "to_local") for p in self._params)
        if hvp and bool(self._sharded.any()):
            warnings.warn(
                "CurvatureProbe turns its λ̂ estimates off: the parameters are sharded (FSDP), "
                "and Hessian-vector products need gradients with respect to the full parameters; "
                "the per-step statistics are summed over the shards. See docs/distributed.md.",
                UserWarning,
                stacklevel=2,
            )
            hvp = False
        self.hvp = hvp and bool(self._hvp_params)
        self._capture = (
            InputCapture(model) if (self.hvp and loss_fn is None and model is not None) else None
        )
        # Δθ bookkeeping: one flat buffer; which entries hold Δθ_t; ⟨g_t, Δθ_t⟩ per parameter.
        self.update_dtype = _check_update_dtype(update_dtype)
        self._flat = FlatBlockBuffer(
            self._loc(self._params), self._block_of.tolist(), dtype=update_dtype
        )
        # a narrower buffer than the parameters: θ_t waits in the parameters' dtype (step only)
        self._narrow = update_dtype is not None and any(
            p.is_floating_point() and p.element_size() > update_dtype.itemsize for p in self._params
        )
        self._theta: list[Tensor] | None = None
        self._all = list(range(len(self._params)))
        self._usq = torch.zeros(len(self._params))  # ‖Δθ_t‖² per parameter (post-step hook)
        self._blocks_of = self._block_of.tolist()
        self._valid: set[int] = set()
        self._incomplete = False  # the last update had non-finite entries (dropped)
        self._has_update = False  # the post-step hook buffered an update (a sample is due)
        self._checked = [False] * len(self._params)  # gradient layout checked (sparse)
        self._all_checked = not self._params
        self._pending: list[int] = []
        self._gdu = torch.zeros(len(self._params))
        self._window: deque[float] = deque(maxlen=secant_window)
        self.last: CurvatureStats | None = None
        self.lambda_max: float | None = None
        self._v: list[tuple[Tensor, float]] | None = None  # int8 eigenvector, per-tensor scale
        self.step = 0
        self._last_attempt: int | None = None
        self.interval = every if isinstance(every, int) else self.min_every
        self.n_estimates = self.dropped_estimates = self.dropped_samples = 0
        self.overhead_seconds = 0.0
        #: Under torch.distributed (set by the schedulers): HVPs are averaged over this group.
        self.sync: RankSync | None = None
        self._step_time: float | None = None
        self._t_post: float | None = None
        self._probe_since_post = 0.0
        self._hooks = HookSet(self)
        self._register_hooks()

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

    # ------------------------------------------------------------------ per-step statistics
    @property
    def lambda_max_safe(self) -> float | None:
        """``margin × lambda_max`` (the value the guard should use), or None before an estimate."""
        return None if self.lambda_max is None else self.margin * self.lambda_max

    @property
    def tripwire(self) -> float | None:
        """Max of the global secant ratio q over the last ``secant_window`` steps (None before).

        A divergence alarm, not a λ_max estimate: on a quadratic q = η·(curvature along the
        update), which exceeds 2 only when the update excites an unstable direction, and under
        minibatch noise q ≈ 1 whatever λ_max is (feasibility.md).
        """
        return max(self._window) if self._window else None

    @property
    def _collective(self) -> bool:
        """Per-step statistics are partial sums over FSDP shards, reduced over the ranks."""
        return self._dtensor and self.sync is not None

    def _loc(self, ts: list[Tensor]) -> list[Tensor]:
        """``ts``, or their local shards if the probed parameters are DTensors (FSDP2)."""
        return [local_shard(t) for t in ts] if self._dtensor else ts

    def _pre_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        t0 = time.perf_counter()
        sample = self.step % self.stats_every == 0
        if not (sample or self._valid or self._has_update):  # nothing buffered, nothing to take
            self._pending = []
            self._count_hook(time.perf_counter() - t0)
            return
        with torch.no_grad():
            grads = [p.grad for p in self._params]
            n = len(grads)
            have = [j for j, g in enumerate(grads) if g is not None]
            if self._collective and self._has_update:
                # FSDP: every rank must take part in the reduction of this sample, so the
                # decision to drop it is made after the all-reduce, from the reduced data.
                self._record(grads, [j for j in have if j in self._valid], False)
            elif self._has_update and self._incomplete:
                self.dropped_samples += 1  # the last update had non-finite entries
            elif self._valid:
                full = len(have) == n and len(self._valid) == n
                both = self._all if full else [j for j in have if j in self._valid]
                if both:
                    self._record(grads, both, full)
            self._valid = set()
            self._incomplete = self._has_update = False
            self._pending = have if have and sample else []
            if self._pending:
                if not self._all_checked:
                    for j in have:
                        if not self._checked[j]:  # first gradient of this parameter
                            _reject_sparse_grad(self._params[j])
                            self._checked[j] = True
                    self._all_checked = all(self._checked)
                if self._narrow:  # θ_t in the parameters' dtype, buffer layout, until post-step
                    self._theta = self._flat.gather(self._loc(self._params))
                else:
                    if len(have) < n:
                        self._flat.zero_()  # entries of parameters without a gradient stay 0
                    views = self._flat.views
                    params = self._loc(
                        [self._params[j] for j in have] if len(have) < n else self._params
                    )
                    torch._foreach_copy_(
                        [views[j] for j in have] if len(have) < n else views, params
                    )
        self._count_hook(time.perf_counter() - t0)

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
            flat = self._flat
            # g_{t+1} in the buffer's layout (entries outside idx multiply zeros or are ignored)
            full_grads = gs if full else list(flat.views)
            if not full:
                for j, g in zip(idx, gs, strict=True):
                    full_grads[j] = g
            rows = flat.dots_with(full_grads, self_dot=True)
            per_param = flat.param_totals(rows)  # −⟨g_{t+1}, Δθ_t⟩, ‖g_{t+1}‖² per parameter
            neg_h, gsq, usq, gdu = torch.cat([per_param, self._usq[None], self._gdu[None]]).tolist()
            block_of = self._blocks_of
            for j in idx:
                b = block_of[j]
                raw[0][b] += neg_h[j]
                raw[1][b] += usq[j]
                raw[2][b] += gsq[j]
                raw[3][b] += gdu[j]
        if self._collective and self.sync is not None:
            flag = [[float(self._incomplete)] * nb]
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
        idx = self._pending
        if idx:
            with torch.no_grad():
                flat = self._flat
                full = len(idx) == len(self._params)
                if self._theta is not None:  # D in the parameters' dtype, stored rounded
                    now = flat.gather(self._loc(self._params))
                    for buffer, before, after in zip(flat.flats, self._theta, now, strict=True):
                        buffer.copy_(before.sub_(after))  # outside idx: ignored by the sums
                    self._theta = None
                else:
                    views = flat.views if full else [flat.views[j] for j in idx]
                    params = self._loc(self._params if full else [self._params[j] for j in idx])
                    torch._foreach_sub_(views, params)  # D = θ_t − θ_{t+1} = −Δθ_t (0 elsewhere)
                # ⟨g_t, D⟩ and ‖D‖² per parameter: row reductions while the buffer is in cache
                grads = self._loc([p.grad for p in self._params]) if full else list(flat.views)
                if not full:  # entries outside idx are 0: any tensor of the shape will do
                    for j, g in zip(
                        idx, self._loc([self._params[j].grad for j in idx]), strict=True
                    ):
                        grads[j] = g
                rows = flat.dots_with(grads, buffer_sq=True)
                per_param = flat.param_totals(rows)
                per_param[0].neg_()  # ⟨g_t, Δθ_t⟩ = −⟨g_t, D⟩
                # A NaN/inf gradient or update is not kept: no NaN in the state, no sample from
                # it. The sum is finite only if every term is (one host read in the usual case).
                if math.isfinite(float(per_param.sum())) or bool(per_param.isfinite().all()):
                    self._valid = set(idx)
                else:
                    finite = torch.isfinite(per_param[0]).tolist()
                    self._valid = {j for j in idx if finite[j]}
                    self._incomplete = True  # the next sample is then dropped
                    per_param = torch.nan_to_num(per_param, 0.0, 0.0, 0.0)
                self._gdu, self._usq = per_param[0], per_param[1]
                self._has_update = True
        self.step += 1
        self._count_hook(time.perf_counter() - t0)
        self._time_step(t0)
        if self._due():
            try:
                self._scheduled_estimate()
            except ProbeError as err:  # e.g. the model's output has no .loss: never crash training
                self.hvp = False
                warnings.warn(
                    f"CurvatureProbe turns its λ̂ estimates off: {err} Pass loss_fn= to enable them.",
                    RuntimeWarning,
                    stacklevel=2,
                )
        self._t_post = time.perf_counter()
        self._probe_since_post = 0.0  # this hook's estimates lie before _t_post already

    def _count_hook(self, seconds: float) -> None:
        """Book the time of one hook call (its estimates excluded) in every account it feeds."""
        self.overhead_seconds += seconds
        self.hook_seconds += seconds
        self._step_costs += seconds

    def _time_step(self, now: float) -> None:
        if self._t_post is not None:
            dt = max(now - self._t_post - self._probe_since_post, 1e-9)
            self._step_time = dt if self._step_time is None else 0.9 * self._step_time + 0.1 * dt
            cost, old = self._step_costs, self.step_cost_seconds
            # a slow average: the sampled steps (one in ``stats_every``) cost far more than the rest
            self.step_cost_seconds = cost if old is None else 0.98 * old + 0.02 * cost
        self._step_costs = 0.0
        self._probe_since_post = 0.0

    def add_step_cost(self, seconds: float) -> None:
        """Count ``seconds`` of per-step work outside the probe (``share_step_costs``).

        A scheduler reports its own per-step time here, so the ``auto`` interval leaves the
        λ̂ estimates only what the per-step costs leave of ``overhead_target``.
        """
        if seconds > 0:  # NaN and negative timings are dropped
            self._step_costs += seconds

    def _estimate_share(self) -> float:
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
        if not (self.share_step_costs and self.step_cost_seconds and self._step_time):
            return target
        return max(target - self.step_cost_seconds / self._step_time, MIN_ESTIMATE_SHARE * target)

    # ------------------------------------------------------------------ λ̂_max
    def _ready(self) -> bool:
        source = self.loss_fn is not None or (self._capture is not None and self._capture.ready)
        if not (self.hvp and source):
            return False
        return self.kind is None or any(self.optimizer.state.get(p) for p in self._hvp_params)

    def _due(self) -> bool:
        if self.step < self.start_step or not self.hvp:
            return False
        if not (
            self._cold_done  # a cold start spread over steps continues on the next one
            or self._last_attempt is None
            or self.step - self._last_attempt >= self.interval
        ):
            return False
        return self._ready()

    def _scheduled_estimate(self) -> None:
        """The estimate a hook runs: a refresh, the cold start, or one chunk of the cold start.

        With ``chunk_iters`` the cold start's ``initial_iters`` products are spread over
        consecutive steps, each chunk warm-started from the last one's iterate; ``lambda_max``
        is published only when all of them have run (a partial power iteration underestimates).
        """
        if self.lambda_max is not None:
            self._timed_estimate(self.power_iters)
            return
        if self.chunk_iters is None:
            self._timed_estimate(self.initial_iters)
            return
        left = self.initial_iters - self._cold_done
        iters = min(self.chunk_iters, left)
        lam = self._timed_estimate(iters, publish=iters == left)
        self._cold_done = 0 if (iters == left or lam is None) else self._cold_done + iters

    def _timed_estimate(self, iters: int, publish: bool = True) -> float | None:
        t0 = time.perf_counter()
        try:
            return self._estimate(iters, publish)
        finally:
            spent = time.perf_counter() - t0
            self.overhead_seconds += spent
            self.estimate_seconds += spent
            self._probe_since_post += spent
            self._last_attempt = self.step
            per_refresh = spent * (self.power_iters + 1) / (iters + 1)
            self.refresh_seconds = per_refresh  # cost of one refresh, from this estimate's time
            if self.every == "auto":
                self._set_auto_interval(per_refresh)

    def _set_auto_interval(self, refresh_seconds: float) -> None:
        """The ``auto`` interval after an estimate, priced by :attr:`cost_model`."""
        need: float | None = None  # None: keep the interval (min_every before any refresh)
        if self.cost_model == "steps":  # counts only: the same on every run
            if self.step > 1:  # as below, where an estimate in the first step finds no timing
                need = estimate_cost_steps(self.power_iters) / self._estimate_share()
        elif self._step_time is not None:
            need = refresh_seconds / (self._estimate_share() * self._step_time)
        if need is not None:
            self.interval = max(self.min_every, math.ceil(need))
            if self.max_every is not None:
                self.interval = min(self.interval, self.max_every)
        if self.sync is not None and self.cost_model == "seconds":  # timings differ: rank 0's
            self.interval = round(self.sync.from_rank0(self.interval))

    def _follow_budget(self, kind: str) -> None:
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

    def estimate_lambda_max(self, iters: int | None = None) -> float | None:
        """Run ``iters`` power iterations now (default: ``initial_iters`` first, then ``power_iters``).

        Returns:
            The new raw estimate (also in :attr:`lambda_max`); the previous one (possibly None)
            if a Hessian-vector product was not finite (counted in ``dropped_estimates``).

        Raises:
            ProbeError: If the probe cannot evaluate the loss (no ``loss_fn``, no ``model``, or
                ``hvp=False``), no probe batch has been captured yet, or an adaptive optimizer
                has no state yet.
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
        default = self.initial_iters if self.lambda_max is None else self.power_iters
        self._cold_done = 0
        return self._timed_estimate(iters or default)

    def _start_vector(self, fresh: bool = False) -> list[Tensor]:
        if self._v is not None and not fresh:
            return [
                dequantize_int8(q.to(p.device), scale)
                for (q, scale), p in zip(self._v, self._hvp_params, strict=True)
            ]
        gen = torch.Generator().manual_seed(self.seed)
        return [torch.randn(p.shape, generator=gen).to(p.device) for p in self._hvp_params]

    def _estimate(self, iters: int, publish: bool = True) -> float | None:
        """``iters`` power iterations; ``publish=False`` keeps only the iterate (returns λ or None)."""
        scale = None
        if self.kind is not None:
            scale = inverse_sqrt_preconditioner(self.optimizer, self._hvp_params, self.kind)
            if scale is None:
                return self.lambda_max if publish else None
        modules = list(self.model.modules()) if self.model is not None else []
        modes = [m.training for m in modules]
        try:
            # Fused attention kernels (flash, memory-efficient) have no double backward.
            with probing(), torch.enable_grad(), sdpa_kernel([SDPBackend.MATH]):
                if self.model is not None:
                    self.model.eval()
                loss = self.loss_fn() if self.loss_fn is not None else self._capture.loss()
                if not isinstance(loss, Tensor) or loss.numel() != 1 or not loss.requires_grad:
                    raise ProbeError(
                        f"the probe loss must be a scalar tensor with a grad graph, got {loss!r}."
                    )
                hvp = make_hvp(loss.reshape(()), self._hvp_params)
                if self.sync is not None:  # the Hessian of the mean of the ranks' probe losses
                    hvp = self.sync.averaged_hvp(hvp)
                start = self._start_vector()
                lam, v, norm = power_iteration(hvp, start, iters, scale, return_norm=True)
                if lam < 0.9 * norm:
                    # v^T M v well below ‖Mv‖: not converged to the top eigenvalue. A negative
                    # eigenvalue at least as large in size dominates, or the iterate swings
                    # between ±λ and the quotient stays wherever the start put it (measured on a
                    # char-level transformer under AdamW: 0.2 where 20 products from a fresh
                    # start gave 5e2). Iterate on M + ‖Mv‖·I: spectrum ≥ ~0, top eigenvector M's.
                    lam, v = power_iteration(hvp, v, iters, scale, shift=-norm)
        finally:
            for m, mode in zip(modules, modes, strict=True):
                m.training = mode
        if not math.isfinite(lam):
            self.dropped_estimates += 1
            return self.lambda_max if publish else None
        self._v = [quantize_int8(x) for x in v]
        if not publish:
            return lam
        self.lambda_max = lam
        self.n_estimates += 1
        return lam

    def scale_last_update(self, scales: Tensor) -> None:
        """Rescale the update just applied, block by block: θ ← θ + (s_i − 1)·Δθ_i.

        For an optimizer whose update is linear in the LR this is exactly a per-block LR
        multiplier applied after ``optimizer.step()`` (GraffScheduler's block multipliers). The
        stored Δθ, ⟨g_t, Δθ_t⟩ and ‖Δθ_t‖² are rescaled too, so the next sample (hypergradient,
        update norm, secant) refers to the update that was really applied. Call it after ``optimizer.step()`` and before the next one.

        Args:
            scales: Positive finite factors, one per block (shape ``[n_blocks]``).
        """
        if self._narrow:
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
        idx = sorted(self._valid)
        factors = scales.double()[self._block_of[idx]].tolist() if idx else []
        with torch.no_grad():
            params = self._loc([self._params[j] for j in idx])
            for j, f, param in zip(idx, factors, params, strict=True):
                if f != 1.0:
                    param.add_(self._flat.views[j], alpha=1.0 - f)  # D = −Δθ
                    self._flat.views[j].mul_(f)
                    self._gdu[j] *= f
                    self._usq[j] *= f * f

    # ------------------------------------------------------------------ lifecycle
    def remove(self) -> None:
        """Detach every hook this probe registered (idempotent; also done when it is collected)."""
        self._hooks.remove()
        if self._capture is not None:
            self._capture.remove()

    def state_dict(self) -> dict[str, Any]:
        """Named tensors and numbers, with ``format_version``; loadable with ``weights_only=True``.

        The Δθ buffer is not saved (one step after a resume yields no per-step sample); the
        eigenvector, estimate, counters, interval and captured probe batch are.
        """
        eig = (
            None
            if self._v is None
            else torch.cat(
                [dequantize_int8(q, s, torch.bfloat16).reshape(-1).cpu() for q, s in self._v]
            )
        )  # exact: q · s with a power-of-two s is a bfloat16 number
        return {
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "eigenvector": eig,
            "lambda_max": self.lambda_max,
            "step": self.step,
            "last_attempt_step": self._last_attempt,
            "interval": self.interval,
            "cold_iters_done": self._cold_done,
            "n_estimates": self.n_estimates,
            "dropped_estimates": self.dropped_estimates,
            "dropped_samples": self.dropped_samples,
            "overhead_seconds": self.overhead_seconds,
            "probe_inputs": None if self._capture is None else self._capture.get(),
            "update": {j: self._flat.views[j].detach().neg().cpu() for j in sorted(self._valid)},
            "grad_dot_update": self._gdu.clone(),
            "window": list(self._window),
            "last": None if self.last is None else dataclasses.asdict(self.last),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output; checks version, keys and the eigenvector size."""
        if not isinstance(state, Mapping) or state.get("format_version") != FORMAT_VERSION:
            got = (
                state.get("format_version") if isinstance(state, Mapping) else type(state).__name__
            )
            raise CheckpointError(
                f"expected a CurvatureProbe state with format_version {FORMAT_VERSION}, got {got!r}."
            )
        if set(state) != _STATE_KEYS:
            raise CheckpointError(
                f"CurvatureProbe state keys differ: missing {sorted(_STATE_KEYS - set(state))}, "
                f"unexpected {sorted(set(state) - _STATE_KEYS)}."
            )
        if state["kind"] != self.kind:
            raise CheckpointError(
                f"state was saved with preconditioner {state['kind']!r}, this probe uses {self.kind!r}."
            )
        eig = state["eigenvector"]
        sizes = [p.numel() for p in self._hvp_params]
        if eig is not None and eig.numel() != sum(sizes):
            raise CheckpointError(
                f"eigenvector has {eig.numel()} entries, the probed parameters {sum(sizes)}."
            )
        self._v = (
            None
            if eig is None
            else [
                quantize_int8(c.reshape(p.shape).to(p.device, torch.float32))
                for c, p in zip(eig.split(sizes), self._hvp_params, strict=True)
            ]
        )
        self.lambda_max = None if state["lambda_max"] is None else float(state["lambda_max"])
        last_attempt = state["last_attempt_step"]
        if last_attempt is not None and (
            isinstance(last_attempt, bool) or not isinstance(last_attempt, int)
        ):
            raise CheckpointError(
                f"CurvatureProbe state has invalid last_attempt_step={last_attempt!r:.40}."
            )
        self.step, self._last_attempt = int(state["step"]), last_attempt
        self.interval = int(state["interval"])
        self._cold_done = int(state["cold_iters_done"])
        self.n_estimates, self.dropped_estimates = (
            int(state["n_estimates"]),
            int(state["dropped_estimates"]),
        )
        self.dropped_samples = int(state["dropped_samples"])
        self.overhead_seconds = float(state["overhead_seconds"])
        if self._capture is not None:
            self._capture.set(state["probe_inputs"])
        self._load_update_state(state)

    def _load_update_state(self, state: Mapping[str, Any]) -> None:
        """Restore the last applied update Δθ, so the first step after a resume has statistics."""
        update, gdu = state["update"], state["grad_dot_update"]
        if (
            not isinstance(update, Mapping)
            or not isinstance(gdu, Tensor)
            or gdu.shape != self._gdu.shape
            or not gdu.is_floating_point()
        ):
            raise CheckpointError("CurvatureProbe state has an invalid saved update.")
        for j, delta in update.items():
            if (
                not (0 <= int(j) < len(self._params))
                or delta.shape != self._loc([self._params[int(j)]])[0].shape
            ):
                raise CheckpointError(f"saved update {j} does not fit the probed parameters.")
        self._flat.zero_()
        with torch.no_grad():
            for j, delta in update.items():
                self._flat.views[int(j)].copy_(delta).neg_()  # the buffer holds −Δθ
        self._usq = self._flat.param_totals(self._flat.row_sq_norms())[0]
        self._valid = {int(j) for j in update}
        self._gdu = gdu.clone()
        self._window.clear()
        self._window.extend(float(q) for q in state["window"])
        last = state["last"]
        self.last = None if last is None else CurvatureStats(**last)
