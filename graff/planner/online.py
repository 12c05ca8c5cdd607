"""The planner at run time: its latent state, the planning step, the online update, the guard's
projection of its decoder, and the decoded residual and block multipliers.

The online update (``docs/concepts/graff.md`` derives it) learns from the hypergradient cosine
:math:`\\kappa` of the window that followed a plan, minus its slow running mean
:math:`\\bar\\kappa` (a de-biased, bounded correction: the one-step horizon of the raw
hypergradient biases it toward small LRs):

.. math::

    J = (\\kappa - \\bar\\kappa)\\, r + \\tfrac1N \\textstyle\\sum_i (\\kappa_i - \\bar\\kappa_i)
        \\log m_i + \\gamma\\,(r^2 + \\overline{\\log^2 m}),

back-propagated through the kept encoder step, then one clipped Adam step
(:class:`PlannerUpdate`: torch's own Adam arithmetic and state, without the per-call machinery
of ``Optimizer.step`` that costs more than the arithmetic for the planner's dozen tiny tensors).
"""

from __future__ import annotations

import copy
import inspect
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.optim.adam import adam

from graff._checks import is_count
from graff.errors import CheckpointError
from graff.guard import project_to_halfspace
from graff.planner.net import FEATURE_NAMES, PlannerNet, load_planner

if TYPE_CHECKING:
    from graff.planner.config import GraffConfig

#: Keyword arguments of this torch's functional Adam; older releases (graff allows torch >= 2.2)
#: lack some, and then every step goes through ``Adam.step`` itself.
_ADAM_ARGS = frozenset(inspect.signature(adam).parameters)
_NEEDED = frozenset(
    {"amsgrad", "has_complex", "beta1", "beta2", "lr", "weight_decay", "eps", "maximize"}
    | {"foreach", "capturable", "differentiable", "fused", "grad_scale", "found_inf"}
)
_FUNCTIONAL = _NEEDED <= _ADAM_ARGS


class PlannerUpdate:
    """One clipped Adam step of ``params`` on the gradient of an objective.

    Args:
        params: The planner's parameters (all of them; held in this order).
        encoder: The encoder's parameters (their version counters tell an in-place edit).
        optimizer: The ``torch.optim.Adam`` over ``params`` (its state and hyperparameters are
            the ones used, so ``optimizer.state_dict()`` stays the checkpoint).
    """

    def __init__(
        self, params: list[nn.Parameter], encoder: list[nn.Parameter], optimizer: torch.optim.Adam
    ) -> None:
        self.params, self.encoder, self.optimizer = list(params), list(encoder), optimizer
        self._complex = any(p.is_complex() for p in self.params)

    def encoder_version(self) -> int:
        """Sum of the encoder weights' in-place version counters (changes when they change)."""
        return sum(p._version for p in self.encoder)

    def zero_grad(self) -> None:
        """``optimizer.zero_grad(set_to_none=True)`` without the per-call machinery."""
        for p in self.params:
            p.grad = None

    def step(self, objective: Tensor, max_norm: float) -> bool:
        """Backpropagate ``objective``, clip the gradient norm to ``max_norm``, take one step.

        Returns False (and takes no step, leaving no gradient behind) when the gradient is not
        finite: the total norm is finite iff every entry is, so one check covers them all.
        """
        self.zero_grad()
        objective.backward()
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return True
        total = clip_grad_norm(grads, max_norm)
        if not bool(torch.isfinite(total)):
            self.zero_grad()
            return False
        self._adam_step()
        return True

    def _adam_step(self) -> None:
        opt = self.optimizer
        params = [p for p in self.params if p.grad is not None]
        states = [opt.state.get(p) for p in params]
        group = opt.param_groups[0]
        decoupled = group.get("decoupled_weight_decay", False)
        plain = (
            _FUNCTIONAL
            and (not decoupled or "decoupled_weight_decay" in _ADAM_ARGS)
            and len(opt.param_groups) == 1
            and all(states)
            and not (group["amsgrad"] or group["differentiable"] or group["capturable"])
            and not self._complex
            and getattr(opt, "grad_scale", None) is None
            and getattr(opt, "found_inf", None) is None
        )
        if not plain:  # the first step creates the state; exotic settings: torch's own path
            opt.step()
            return
        beta1, beta2 = group["betas"]
        extra = (
            {"decoupled_weight_decay": decoupled} if "decoupled_weight_decay" in _ADAM_ARGS else {}
        )
        with torch.no_grad():  # as in Adam.step: the weights are leaves that require grad
            adam(
                params,
                [p.grad for p in params],
                [s["exp_avg"] for s in states],
                [s["exp_avg_sq"] for s in states],
                [],
                [s["step"] for s in states],
                amsgrad=False,
                has_complex=False,
                beta1=beta1,
                beta2=beta2,
                lr=group["lr"],
                weight_decay=group["weight_decay"],
                eps=group["eps"],
                maximize=group["maximize"],
                foreach=group["foreach"],
                capturable=False,
                differentiable=False,
                fused=group["fused"],
                grad_scale=None,
                found_inf=None,
                **extra,
            )


def clip_grad_norm(grads: list[Tensor], max_norm: float) -> Tensor:
    """``nn.utils.clip_grad_norm_(…, max_norm, foreach=True)`` for one CPU dtype group.

    The same arithmetic (float32 total 2-norm; gradients × min(1, max_norm / (norm + 1e-6))) in
    three multi-tensor kernels, without torch's per-call grouping by device and dtype, which
    costs more than the kernels for the planner's ~10 tiny tensors. Returns the total norm.
    """
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    torch._foreach_mul_(grads, (max_norm / (total + 1e-6)).clamp_(max=1.0))
    return total


class OnlinePlanner:
    """The planner's runtime: ``h``, the pending step awaiting feedback, κ̄, the kept graph.

    Args:
        net: The planner network (shipped, loaded or fresh).
        adjacency: Row-normalised block adjacency (:func:`graff.planner.net.mean_adjacency`).
        lr: Adam LR of the online update.
        plan_every: Steps between plans.
        learn_every: With ``online``, plans between online updates.
        online: Update the planner online.
        block_multipliers: Decode per-block multipliers too.
        multiplier_max: Multipliers lie in ``[1/multiplier_max, multiplier_max]``.
        residual_max: The residual lies in ``[1/residual_max, residual_max]``.
    """

    def __init__(
        self,
        net: PlannerNet,
        adjacency: Tensor,
        *,
        lr: float,
        plan_every: int,
        learn_every: int,
        online: bool,
        block_multipliers: bool,
        multiplier_max: float,
        residual_max: float,
    ) -> None:
        n = adjacency.shape[0]
        self.net, self.adjacency = net, adjacency
        self.plan_every, self.learn_every, self.online = plan_every, learn_every, online
        self.block_multipliers = block_multipliers
        self.log_mult_max, self.log_residual_max = math.log(multiplier_max), math.log(residual_max)
        self.optimizer = _planner_adam(net, lr)
        self._update = PlannerUpdate(
            list(net.parameters()), net.encoder_parameters(), self.optimizer
        )
        self.h = net.initial_state(n)
        self._pending: tuple[Tensor, Tensor] | None = None  # (x_t, h_{t-1}) awaiting feedback
        self._pending_graph: tuple[Tensor, int] | None = None  # (h_t with its graph, version)
        self.kappa_mean = torch.zeros(n + 1)
        self.multipliers = torch.ones(n)
        self.steps_since_plan = 0
        self.plans = 0  # planner runs so far
        self.updates = self.skipped_updates = 0  # online updates taken / skipped (non-finite)
        self.projections = 0  # plans whose guard projection moved the decoder
        self._decoded: tuple[float, Tensor | None] | None = None  # decoder output, per plan
        self._multiplier_tuple: tuple[float, ...] | None = None

    @classmethod
    def from_config(cls, net: PlannerNet, adjacency: Tensor, config: GraffConfig) -> OnlinePlanner:
        """The runtime a :class:`~graff.GraffConfig` asks for."""
        return cls(
            net,
            adjacency,
            lr=config.planner_lr,
            plan_every=config.plan_every,
            learn_every=config.learn_every,
            online=config.online,
            block_multipliers=config.block_multipliers,
            multiplier_max=config.multiplier_max,
            residual_max=config.residual_max,
        )

    def replan_due(self) -> bool:
        """Count a step; True when a plan is due (the first step, then every ``plan_every``)."""
        self.steps_since_plan += 1
        return self._pending is None or self.steps_since_plan >= self.plan_every

    def _learn_due(self) -> bool:
        """Whether the plan after ``plans`` completed ones updates the planner online."""
        return self.online and self.plans % self.learn_every == 0

    def plan(self, x: Tensor, kappa: Tensor | None) -> None:
        """Learn from the window that followed the last plan (``kappa``: its cosines), then
        run the encoder on the features ``x``; the graph is kept when the next plan learns."""
        if kappa is not None and self._pending is not None and self._learn_due():
            self._learn(kappa)
        self.plans += 1
        keep = self._learn_due()  # the next plan learns from this window
        with torch.set_grad_enabled(keep):
            h = self.net(x, self.h, self.adjacency)
        self._pending, self.h = (x, self.h), h.detach()
        # the next online update backpropagates through this very forward pass (the encoder
        # does not change in between) instead of re-running it
        self._pending_graph = (h, self._update.encoder_version()) if keep else None
        self.steps_since_plan = 0

    def _learn(self, kappa: Tensor) -> None:
        """One clipped Adam step on the de-biased objective (module docstring)."""
        if not bool(torch.isfinite(kappa).all()):
            self.skipped_updates += 1
            return
        advantage = kappa - self.kappa_mean
        self.kappa_mean.mul_(0.99).add_(kappa, alpha=0.01)
        x, h_prev = self._pending  # type: ignore[misc]
        graph, self._pending_graph = self._pending_graph, None
        if graph is not None and graph[1] == self._update.encoder_version():
            h = graph[0]
        else:  # after a resume (graphs are not saved) or an edit of the weights: re-run it
            h = self.net(x, h_prev, self.adjacency)
        if self.block_multipliers:
            residual, logits = self.net.decode(h)
        else:
            residual, logits = self.net.decode_residual(h), None
        objective = advantage[0] * residual + 1e-2 * residual.pow(2)
        if logits is not None:
            log_m = self.log_mult_max * torch.tanh(logits)
            objective = objective + (advantage[1:] * log_m).mean() + 1e-2 * log_m.pow(2).mean()
        if self._update.step(objective, max_norm=1.0):
            self.updates += 1
        else:
            self.skipped_updates += 1

    def project(self, log_target: float) -> None:
        """The guard on the decoder: project ``(w, b)`` onto ``w · h̄ + b ≤ log_target``.

        Never below the residual's clip range: the scheduler's hard min enforces the rest, and
        the decoder stays where online learning can move it back.
        """
        target = max(log_target, -self.log_residual_max)
        net = self.net
        w, b = project_to_halfspace(net.lr_w.data, net.lr_b.data, self.h.mean(0), target)
        if not (torch.equal(w, net.lr_w.data) and torch.equal(b, net.lr_b.data)):
            self.projections += 1
            net.lr_w.data.copy_(w)
            net.lr_b.data.copy_(b)

    def residual(self, replanned: bool) -> tuple[float, Tensor | None]:
        """The clipped log-LR residual and the multiplier logits (``None`` without multipliers),
        decoded once per plan."""
        if replanned or self._decoded is None:  # h and the decoder change only when planning
            with torch.no_grad():
                if self.block_multipliers:
                    residual, logits = self.net.decode(self.h)
                    logits = torch.nan_to_num(logits)
                else:
                    residual, logits = self.net.decode_residual(self.h), None
            r = float(residual.clamp(-self.log_residual_max, self.log_residual_max))
            self._decoded = (r if math.isfinite(r) else 0.0), logits
        return self._decoded

    def update_multipliers(self, logits: Tensor | None, replanned: bool) -> tuple[float, ...]:
        """Decode the block multipliers ``exp(ρ tanh ℓ)`` after a plan; returns them as floats."""
        if (
            self.block_multipliers
            and logits is not None
            and (replanned or self._multiplier_tuple is None)
        ):
            self.multipliers = torch.exp(self.log_mult_max * torch.tanh(logits)).float()
            self._multiplier_tuple = None
        if self._multiplier_tuple is None:
            self._multiplier_tuple = tuple(self.multipliers.tolist())
        return self._multiplier_tuple

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles drop the kept planning graph (an autograd graph cannot be copied);
        a copy's next online update re-runs the encoder."""
        state = self.__dict__.copy()
        state["_pending_graph"] = None
        return state

    def state_dict(self) -> dict[str, Any]:
        """Weights, optimizer, ``h``, the pending step, κ̄, multipliers and counters."""
        return {
            "features": list(FEATURE_NAMES),
            "weights": {k: v.clone() for k, v in self.net.state_dict().items()},
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "h": self.h.clone(),
            "pending": None if self._pending is None else [t.clone() for t in self._pending],
            "kappa_mean": self.kappa_mean.clone(),
            "multipliers": self.multipliers.clone(),
            "counts": [getattr(self, k) for k in _COUNTS],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; :class:`CheckpointError` before changing anything if it
        does not fit (an optimizer state torch refuses raises last: the scheduler rolls back)."""
        pending = self._check_state(state)
        self.net.load_state_dict(state["weights"])
        self.h = state["h"].clone()
        self._pending = None if pending is None else (pending[0].clone(), pending[1].clone())
        self._pending_graph = self._decoded = self._multiplier_tuple = None
        self.kappa_mean = state["kappa_mean"].clone()
        self.multipliers = state["multipliers"].clone()
        for key, value in zip(_COUNTS, state["counts"], strict=True):
            setattr(self, key, int(value))
        self.optimizer.load_state_dict(state["optimizer"])  # torch checks it fits

    def _check_state(self, state: dict[str, Any]) -> tuple[Tensor, Tensor] | None:
        """Validate a state; returns its pending step."""
        if state["features"] != list(FEATURE_NAMES):
            raise CheckpointError("state was saved by a planner with other input features.")
        net = self.net
        try:
            PlannerNet(net.num_features, net.hidden, net.message_size).load_state_dict(
                state["weights"]
            )
        except (RuntimeError, TypeError, AttributeError) as err:
            raise CheckpointError(f"planner weights in the state do not fit: {err}") from err
        n, pending = self.h.shape[0], state["pending"]
        shapes = {"h": self.h.shape, "kappa_mean": (n + 1,), "multipliers": (n,)}
        tensors = {k: state[k] for k in shapes}
        if pending is not None:
            if not isinstance(pending, (list, tuple)) or len(pending) != 2:
                raise CheckpointError("GraffScheduler state has an invalid pending planner step.")
            tensors |= {"pending[0]": pending[0], "pending[1]": pending[1]}
            shapes |= {"pending[0]": (n, len(FEATURE_NAMES)), "pending[1]": self.h.shape}
        for key, t in tensors.items():
            if not (isinstance(t, Tensor) and t.is_floating_point() and t.shape == shapes[key]):
                raise CheckpointError(
                    f"GraffScheduler state {key} must be a float tensor of shape "
                    f"{tuple(shapes[key])}, got {t!r:.80}."
                )
        if not bool((state["multipliers"] > 0).all()):
            raise CheckpointError("GraffScheduler state has non-positive block multipliers.")
        counts = state["counts"]
        if not (
            isinstance(counts, list)
            and len(counts) == len(_COUNTS)
            and all(is_count(c) for c in counts)
        ):
            raise CheckpointError(
                f"GraffScheduler planner state has invalid counts {counts!r:.80}."
            )
        return pending


_COUNTS = ("steps_since_plan", "plans", "updates", "skipped_updates", "projections")


def make_planner(warm_start: str | Path | None, *, edges: bool, seed: int) -> PlannerNet:
    """The shipped planner (``"default"``), one loaded from a file, or a fresh one (``None``:
    zero decoder, encoder drawn from ``seed`` without touching the global RNG)."""
    if warm_start is not None:
        planner = load_planner(warm_start)
        planner.edges = edges
        return planner
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    planner = PlannerNet(edges=edges)
    torch.random.set_rng_state(generator_state)
    return planner


def _planner_adam(planner: PlannerNet, lr: float) -> torch.optim.Adam:
    """Adam for the planner's small tensors: fused (one kernel) where torch supports it, else
    the multi-tensor path."""
    try:
        return torch.optim.Adam(planner.parameters(), lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):  # fused Adam needs torch >= 2.4 on CPU
        return torch.optim.Adam(planner.parameters(), lr=lr, foreach=True)
