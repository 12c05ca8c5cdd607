"""Shared pieces of the hostile-input tests: setups, event streams and the invariant checks.

A *setup* is a tiny parameter set (several dtypes, zero-size, grad-less, empty groups), one torch
optimizer and one graff scheduler. An *event* is one training step as a hostile world may run
it: a NaN/inf/huge/tiny/negative loss, NaN/inf/spiked/missing gradients, an optimizer step that
is skipped (as ``GradScaler`` does on overflow) or applied with NaN gradients, a user who writes
``lr × 1000`` into a parameter group, and a wall clock that stands still, jumps backwards or
returns junk. :func:`check_invariants` is what graff promises after every ``scheduler.step()``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from hypothesis import strategies as st
from torch import Tensor, nn

import graff
from graff.errors import GraffError

OPTIMIZERS = {
    "SGD": lambda ps, lr: torch.optim.SGD(ps, lr=lr),
    "SGD-momentum": lambda ps, lr: torch.optim.SGD(ps, lr=lr, momentum=0.9, nesterov=True),
    "Adam": lambda ps, lr: torch.optim.Adam(ps, lr=lr),
    "AdamW": lambda ps, lr: torch.optim.AdamW(ps, lr=lr),
    "RMSprop": lambda ps, lr: torch.optim.RMSprop(ps, lr=lr),
    "Adagrad": lambda ps, lr: torch.optim.Adagrad(ps, lr=lr),
}
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
SCHEDULERS = ("graff", "graff-guarded", "reactor", "reactor-guarded", "budget")

#: Losses a hostile training loop may report.
LOSSES = st.one_of(
    st.sampled_from(
        [
            None,
            math.nan,
            math.inf,
            -math.inf,
            -1.0,
            0.0,
            1e308,
            -1e308,
            1e-308,
            5e-324,  # the smallest subnormal double
            1.0,
            2.5,
        ]
    ),
    st.floats(allow_nan=True, allow_infinity=True),
)
GRADS = st.sampled_from(["ok", "ok", "nan", "inf", "spike", "none", "nan-skipped", "skip"])
#: Seconds the fake wall clock moves per step: standing still, backwards, junk, huge.
TIME_STEPS = st.sampled_from([0.05, 0.05, 0.0, -10.0, math.nan, math.inf, -math.inf, 1e300])


@dataclass
class Setup:
    """Parameters, optimizer, scheduler and the fake time source of one hostile run."""

    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    now: list[float]
    initial_lrs: list[float]
    kind: str
    target: list[Tensor] = field(default_factory=list)

    def loss(self) -> Tensor:
        """A real quadratic loss of the trainable parameters (float32)."""
        total = torch.zeros(())
        for p, t in zip(self.params, self.target, strict=True):
            if p.requires_grad and p.numel():
                total = total + (p.float() - t).pow(2).sum()
        return total


@st.composite
def setups(draw: st.DrawFn, kinds: tuple[str, ...] = SCHEDULERS) -> Setup:
    """A random tiny setup (see module docstring)."""
    kind = draw(st.sampled_from(kinds))
    dtype = draw(st.sampled_from(DTYPES))
    opt_name = draw(st.sampled_from(sorted(OPTIMIZERS)))
    lr = draw(st.sampled_from([1e-3, 0.05, 0.3]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 1000)))
    main = nn.Parameter(torch.randn(3, generator=g).to(dtype))
    params = [main]
    if draw(st.booleans()):
        params.append(nn.Parameter(torch.zeros(0, dtype=dtype)))  # zero-size
    if draw(st.booleans()):
        params.append(nn.Parameter(torch.ones(2, dtype=dtype)))  # never gets a gradient
    layout = draw(st.sampled_from(["one", "two-groups", "empty-group"]))
    if layout == "one":
        groups: list[dict[str, Any]] = [{"params": params}]
    elif layout == "two-groups":
        other = nn.Parameter(torch.randn(2, generator=g).to(dtype))
        params.append(other)
        groups = [{"params": params[:-1]}, {"params": [other], "lr": lr * 0.1}]
    else:
        groups = [{"params": params}, {"params": []}]
    optimizer = OPTIMIZERS[opt_name](groups, lr)
    target = [torch.full(p.shape, 0.5) for p in params]
    now = [100.0]
    budget_steps = draw(st.one_of(st.none(), st.integers(1, 30)))
    budget = (
        graff.BudgetClock(steps=budget_steps)
        if budget_steps is not None
        else graff.BudgetClock(
            seconds=draw(st.sampled_from([0.5, 3.0, 1e6])), time_fn=lambda: now[0]
        )
    )
    holder: dict[str, Setup] = {}

    def loss_fn() -> Tensor:
        return holder["setup"].loss()

    clamp = draw(st.sampled_from([(1e-3, 100.0), (0.5, 2.0), (1.0, 1.0)]))
    common = {"lr_min_factor": clamp[0], "lr_max_factor": clamp[1]}
    if kind.startswith("graff"):
        planner = draw(st.booleans())
        scheduler = graff.GraffScheduler(
            optimizer,
            budget,
            loss_fn=loss_fn if kind == "graff-guarded" else None,
            warm_start=draw(st.sampled_from(["default", None])),
            **common,
            config=graff.GraffConfig(
                plan_every=draw(st.sampled_from([1, 3])),
                curvature_every=draw(st.sampled_from([1, 4])),
                planner=planner,
                block_multipliers=planner and draw(st.booleans()),
                planner_lr=draw(st.sampled_from([1e-3, 1.0])),
            ),
        )
    elif kind.startswith("reactor"):
        scheduler = graff.ReactorScheduler(
            optimizer,
            budget,
            loss_fn=loss_fn if kind == "reactor-guarded" else None,
            guard=kind == "reactor-guarded",
            config=graff.ReactorConfig(  # draws in the same order as before
                decision_interval=draw(st.sampled_from([1, 2])),
                controller_lr=draw(st.sampled_from([1e-4, 1.0])),
            ),
            prior=draw(st.sampled_from([None, "cosine"])),
            seed=3,
            **common,
        )
    else:
        scheduler = graff.BudgetScheduler(
            optimizer, budget, prior=draw(st.sampled_from(["cosine", "linear", "wsd"])), **common
        )
    setup = Setup(
        params,
        optimizer,
        scheduler,
        now,
        [float(gr["initial_lr"]) for gr in optimizer.param_groups],
        kind,
        target,
    )
    holder["setup"] = setup
    return setup


EVENTS = st.fixed_dictionaries(
    {
        "loss": LOSSES,
        "grad": GRADS,
        "dt": TIME_STEPS,
        "lr_spike": st.sampled_from([False, False, False, True]),
        "as_tensor": st.booleans(),
    }
)


def _corrupt_grads(params: list[nn.Parameter], mode: str) -> None:
    for p in params:
        if p.grad is None:
            continue
        if mode in ("nan", "nan-skipped"):
            p.grad.fill_(math.nan)
        elif mode == "inf":
            p.grad.fill_(math.inf)
        elif mode == "spike":
            p.grad.mul_(1e4)


def run_event(setup: Setup, event: Mapping[str, Any]) -> None:
    """Play one hostile training step, ending with ``scheduler.step(loss)``."""
    opt, params = setup.optimizer, setup.params
    opt.zero_grad(set_to_none=True)
    mode = event["grad"]
    if mode != "none":
        setup.loss().backward()
    _corrupt_grads(params, mode)
    if event["lr_spike"]:
        for group in opt.param_groups:
            group["lr"] = group["lr"] * 1000.0  # someone writes into the param group
    if mode not in ("nan-skipped", "skip"):  # GradScaler skips the step on overflow
        saved = [p.detach().clone() for p in params]
        opt.step()
        if mode in ("nan", "inf"):  # the user's optimizer applied it; the user restores params
            with torch.no_grad():
                for p, s in zip(params, saved, strict=True):
                    p.copy_(s)
    setup.now[0] += event["dt"]
    loss = event["loss"]
    if event["as_tensor"] and loss is not None:
        loss = torch.tensor(loss)
    setup.scheduler.step(loss)


def tensors_in(obj: Any, path: str = "") -> Iterator[tuple[str, Tensor]]:
    """Every tensor in a nest of dicts/lists/tuples, with its path."""
    if isinstance(obj, Tensor):
        yield path, obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from tensors_in(v, f"{path}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from tensors_in(v, f"{path}[{i}]")


#: State entries that hold the *user's* data (the captured probe batch), not graff's state.
USER_DATA = (".probe_inputs",)


def check_invariants(setup: Setup) -> None:
    """What graff promises after every ``scheduler.step()`` (see docs/guarantees.md)."""
    sched = setup.scheduler
    lo, hi = sched.lr_min_factor, sched.lr_max_factor
    lrs = [float(g["lr"]) for g in setup.optimizer.param_groups]
    assert lrs == sched.get_last_lr()
    for lr, base in zip(lrs, setup.initial_lrs, strict=True):
        assert math.isfinite(lr), lrs
        assert lr > 0, lrs
        assert base * lo <= lr <= base * hi, (lr, base, lo, hi)
    for name, t in tensors_in(sched.state_dict()):
        if t.is_floating_point() and not any(u in name for u in USER_DATA):
            assert bool(torch.isfinite(t).all()), f"non-finite state tensor {name}: {t}"
    for module in _planner_modules(sched):
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            assert bool(torch.isfinite(t).all()), f"non-finite planner tensor {name}"


def _planner_modules(sched: Any) -> list[nn.Module]:
    return [m for m in (getattr(sched, "planner", None), getattr(sched, "policy", None)) if m]


def is_documented(err: BaseException) -> bool:
    """Whether ``err`` is an error graff raises on purpose (a GraffError subclass)."""
    return isinstance(err, GraffError)
