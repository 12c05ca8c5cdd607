"""Closed-form check of the guard: GD on ½xᵀAx diverges iff η·λ_max > 2.

Unguarded, η = 5/λ_max multiplies the top mode by |1 − 5| = 4 per step. Guarded with the
CurvatureProbe's λ̂, η·λ_max ≤ c·λ_max/(margin·λ̂) < 2 whenever λ̂ > c/(2·margin)·λ_max, so every
mode contracts and the loss (a sum of non-negative per-mode terms) falls at every step.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from graff.guard import guard_constant, max_stable_lr
from graff.probes.curvature import CurvatureProbe


def problem(d: int, lam_max: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A = Q diag(λ) Qᵀ with λ uniform in [λ_max/10, λ_max], top = λ_max; a random start x0."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    eigs = lam_max * (0.1 + 0.9 * torch.rand(d, generator=g, dtype=torch.float64))
    eigs[0] = lam_max
    return q @ torch.diag(eigs) @ q.T, torch.randn(d, generator=g, dtype=torch.float64)


def run(a: torch.Tensor, x0: torch.Tensor, steps: int, guarded: bool) -> list[float]:
    lam_max = float(torch.linalg.eigvalsh(a).max())
    x = nn.Parameter(x0.clone())
    opt = torch.optim.SGD([x], lr=5.0 / lam_max)
    probe = CurvatureProbe(opt, loss_fn=lambda: 0.5 * x @ a @ x, every=10) if guarded else None
    if probe is not None:
        probe.estimate_lambda_max()
    losses = []
    for _ in range(steps):
        loss = 0.5 * x @ a @ x
        losses.append(float(loss.detach()))
        if probe is not None:
            bound = max_stable_lr(probe.lambda_max_safe, guard_constant(opt))
            opt.param_groups[0]["lr"] = min(5.0 / lam_max, bound)
        opt.zero_grad()
        loss.backward()
        opt.step()
    losses.append(float(0.5 * x.detach() @ a @ x.detach()))
    return losses


@pytest.mark.parametrize("lam_max", [10.0, 100.0, 1000.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_unguarded_sgd_diverges_at_five_over_lambda(lam_max: float, seed: int) -> None:
    a, x0 = problem(50, lam_max, seed)
    losses = run(a, x0, steps=30, guarded=False)
    assert losses[-1] > 1e6 * losses[0]


@pytest.mark.parametrize("lam_max", [10.0, 100.0, 1000.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_guarded_sgd_converges_monotonically(lam_max: float, seed: int) -> None:
    a, x0 = problem(50, lam_max, seed)
    losses = run(a, x0, steps=200, guarded=True)
    assert all(b < a_ for a_, b in itertools.pairwise(losses))
    assert losses[-1] < 1e-8 * losses[0]
