"""The mechanics of GraffScheduler's online planner update: backward, clip, one Adam step.

The planner has a dozen tiny tensors, so what an update costs is Python, not arithmetic:
``Optimizer.zero_grad`` and ``Optimizer.step`` each enter a profiler range, run the hook
machinery and rebuild per-tensor lists on every call (``Adam._init_group``). Measured on the
tiny LoRA benchmark task, right after a training step: ``zero_grad`` 158 µs, ``step`` 392 µs,
``clip`` 281 µs per update, against 750 µs for the backward itself. :class:`PlannerUpdate`
keeps the parameter lists once and calls torch's functional Adam
(:func:`torch.optim.adam.adam`, the function ``Adam.step`` calls) on the ``torch.optim.Adam``'s
own state, so the arithmetic, the state and the checkpoint format are exactly torch's (a test
checks bit-identical weights and moments). Anything the shortcut does not cover (no state yet,
several groups, AMSGrad, complex or differentiable settings) goes through ``Adam.step``.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn
from torch.optim.adam import adam

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
