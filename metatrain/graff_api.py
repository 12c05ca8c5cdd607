"""Every touch-point of metatrain with graff, in one place (port this module alone on an API change).

metatrain sees a planner only as a flat float32 vector (what ES perturbs); this module turns such
a vector into a scheduler, a planner file, and back.

Public graff names only (``graff.GraffScheduler``, ``graff.GraffConfig``, ``graff.save_planner``,
``graff.load_planner``), plus :class:`graff.planner.net.PlannerNet` for the weights' layout.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from graff import BudgetClock, GraffConfig, GraffScheduler, load_planner, save_planner
from graff.errors import ProbeWarning
from graff.planner.net import FEATURE_NAMES, PlannerNet

#: The column of the planner input holding the current log-LR factor (``/ ln 10``).
LOG_LR_FACTOR = FEATURE_NAMES.index("log_lr_factor")


def to_planner(vector: Tensor) -> PlannerNet:
    """A planner with the weights of ``vector``."""
    planner = PlannerNet()
    expected = sum(p.numel() for p in planner.parameters())
    if vector.numel() != expected:
        raise ValueError(f"planner vector has {vector.numel()} entries, the planner {expected}")
    torch.nn.utils.vector_to_parameters(vector.detach().float().clone(), planner.parameters())
    return planner


def to_vector(planner: nn.Module) -> Tensor:
    """A planner's weights as one flat float32 vector."""
    return torch.nn.utils.parameters_to_vector(planner.parameters()).detach().clone().float()


def fresh_vector(seed: int = 0) -> Tensor:
    """A fresh planner's weights (the scheduler's own initialisation: zero decoder)."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return to_vector(PlannerNet())
    finally:
        torch.random.set_rng_state(state)


def load_vector(path: str | Path) -> Tensor:
    """The weights of a planner file (or ``"default"``, the shipped planner) as a vector."""
    return to_vector(load_planner(path))


def save_vector(vector: Tensor, path: str | Path) -> Path:
    """Write a planner vector as a graff planner file (loadable by ``warm_start=path``)."""
    return save_planner(to_planner(vector), path)


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    steps: int,
    *,
    model: nn.Module,
    loss_fn: Callable[[], Tensor],
    planner: Tensor | None,
    seed: int,
    residual_max: float = 1.25,
) -> GraffScheduler:
    """GRAFF with the planner ``planner`` (a vector), or planner-off when ``planner`` is None.

    With a planner: the scheduler's defaults (online learning on), warm-started from the vector
    exactly as a user's ``warm_start=path`` would load it. Planner-off:
    ``GraffConfig(planner=False)`` — peak search + prior + guard, no planner at all.
    ``residual_max``: the planner's authority (``GraffConfig.residual_max``; 1.25 is graff's
    default), ignored by planner-off.
    """
    clock = BudgetClock(steps=steps)
    common = {"model": model, "loss_fn": loss_fn, "seed": seed}
    with warnings.catch_warnings():
        # MLPs and CNNs have no early decoder layer: GRAFF runs without the entropy probe
        warnings.simplefilter("ignore", ProbeWarning)
        if planner is None:
            return GraffScheduler(optimizer, clock, config=GraffConfig(planner=False), **common)
        with tempfile.TemporaryDirectory() as tmp:
            path = save_vector(planner, Path(tmp) / "planner.safetensors")
            config = GraffConfig(planner=True, residual_max=residual_max)
            return GraffScheduler(optimizer, clock, warm_start=path, config=config, **common)


def build_recording_scheduler(
    optimizer: torch.optim.Optimizer,
    steps: int,
    *,
    model: nn.Module,
    loss_fn: Callable[[], Tensor],
    seed: int,
    record: list[Tensor],
) -> GraffScheduler:
    """Planner-off's LR trajectory, with the planner's inputs recorded (behaviour cloning).

    A fresh planner (zero decoder, so the residual is 0), not trained online, whose guard
    projection is switched off (it would move the zero decoder): the LR is planner-off's step for
    step, while every plan's node features ``x_t`` (shape ``(N, F)``) are appended to ``record``.
    The graph the planner runs on is ``scheduler.runtime.adjacency``.
    """
    clock = BudgetClock(steps=steps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ProbeWarning)
        sched = GraffScheduler(
            optimizer,
            clock,
            model=model,
            loss_fn=loss_fn,
            seed=seed,
            warm_start=None,
            config=GraffConfig(planner=True, online=False),
        )
    runtime = sched.runtime
    plan = runtime.plan

    def recording_plan(x: Tensor, kappa: Tensor | None) -> None:
        record.append(x.detach().clone())
        plan(x, kappa)

    runtime.plan = recording_plan  # type: ignore[method-assign]
    runtime.project = lambda log_target: None  # type: ignore[method-assign]
    return sched


#: The planner's linear decoder of the global log-LR residual (``r = w · h̄ + b``).
DECODER = ("lr_w", "lr_b")


def decoder_mask() -> Tensor:
    """A bool vector over a planner vector: True on the decoder's entries (:data:`DECODER`)."""
    return torch.cat(
        [
            torch.full((p.numel(),), name in DECODER, dtype=torch.bool)
            for name, p in PlannerNet().named_parameters()
        ]
    )


def planner_size() -> int:
    """Number of entries of a planner vector."""
    return fresh_vector().numel()
