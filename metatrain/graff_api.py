"""Every touch-point of metatrain with graff, in one place (port this module alone on an API change).

metatrain sees a planner only as a flat float32 vector (what ES perturbs); this module turns such
a vector into a scheduler, a planner file, and back.

Written against today's API: ``GraffScheduler(**kwargs)``, ``graff.planner_net.PlannerNet``,
``graff.planner_io.save_planner/load_planner``. For the ``graff.GraffConfig`` API the lead
changes :func:`build_scheduler` (kwargs -> ``config=GraffConfig(...)``; the planner-off baseline
-> ``GraffConfig(planner=False)``) and the two imports below (``graff.planner.net``).
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from graff.clock import BudgetClock
from graff.graff_scheduler import GraffScheduler
from graff.planner_io import load_planner, save_planner  # TODO(GraffConfig): graff.planner.io
from graff.planner_net import PlannerNet  # TODO(GraffConfig): graff.planner.net


def _to_planner(vector: Tensor) -> PlannerNet:
    planner = PlannerNet()
    expected = sum(p.numel() for p in planner.parameters())
    if vector.numel() != expected:
        raise ValueError(f"planner vector has {vector.numel()} entries, the planner {expected}")
    torch.nn.utils.vector_to_parameters(vector.detach().float().clone(), planner.parameters())
    return planner


def _to_vector(planner: nn.Module) -> Tensor:
    return torch.nn.utils.parameters_to_vector(planner.parameters()).detach().clone().float()


def fresh_vector(seed: int = 0) -> Tensor:
    """A fresh planner's weights (the scheduler's own initialisation: zero decoder)."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return _to_vector(PlannerNet())
    finally:
        torch.random.set_rng_state(state)


def load_vector(path: str | Path) -> Tensor:
    """The weights of a planner file (or ``"default"``, the shipped planner) as a vector."""
    return _to_vector(load_planner(path))


def save_vector(vector: Tensor, path: str | Path) -> Path:
    """Write a planner vector as a graff planner file (loadable by ``warm_start=path``)."""
    return save_planner(_to_planner(vector), path)


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    steps: int,
    *,
    model: nn.Module,
    loss_fn: Callable[[], Tensor],
    planner: Tensor | None,
    seed: int,
) -> GraffScheduler:
    """GRAFF with the planner ``planner`` (a vector), or planner-off when ``planner`` is None.

    With a planner: the scheduler's defaults (online learning on), warm-started from the vector
    exactly as a user's ``warm_start=path`` would load it. Planner-off: ``warm_start=None,
    online=False`` — a zero decoder that never learns, so the residual is 0 and the multipliers
    1: peak search + prior + guard, the same LRs as planner-off (it still pays the planner's
    forward cost, which changes no LR under a step budget).
    """
    clock = BudgetClock(steps=steps)
    common = {"model": model, "loss_fn": loss_fn, "seed": seed}
    with warnings.catch_warnings():
        # small non-HF models have no early decoder layer: GRAFF runs without the entropy probe
        warnings.simplefilter("ignore")
        if planner is None:
            # TODO(GraffConfig): GraffScheduler(optimizer, clock, config=GraffConfig(planner=False))
            return GraffScheduler(optimizer, clock, warm_start=None, online=False, **common)
        with tempfile.TemporaryDirectory() as tmp:
            path = save_vector(planner, Path(tmp) / "planner.safetensors")
            return GraffScheduler(optimizer, clock, warm_start=path, **common)


def planner_size() -> int:
    """Number of entries of a planner vector."""
    return fresh_vector().numel()
