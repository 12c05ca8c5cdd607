"""graff.probes._hvp.lanczos against closed forms, dense eigensolvers and power iteration."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from graff.probes._hvp import lanczos


def symmetric(eigs: torch.Tensor, seed: int) -> torch.Tensor:
    """``Q diag(eigs) Qᵀ`` with a random orthogonal ``Q`` (float64)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=g, dtype=torch.float64))
    return q @ torch.diag(eigs) @ q.T


def matrix_hvp(a: torch.Tensor):
    """``v ↦ A v`` for a one-tensor parameter list, in the vector's dtype."""
    return lambda v: [(a @ v[0].double()).to(v[0].dtype)]


def power_rayleigh(a: torch.Tensor, v0: torch.Tensor, products: int) -> float:
    """The Rayleigh quotient power iteration reports after ``products`` products (float64)."""
    v = v0 / v0.norm()
    lam = math.nan
    for _ in range(products):
        w = a @ v
        lam = float(v @ w)
        v = w / w.norm()
    return lam


def test_diagonal_matrix_is_exact_once_the_krylov_space_is_whole() -> None:
    eigs = torch.tensor([3.0, -7.0, 1.0, 5.5, 0.25], dtype=torch.float64)
    a = torch.diag(eigs)
    lam, v = lanczos(matrix_hvp(a), [torch.ones(5)], iters=5)
    assert lam == pytest.approx(5.5, rel=1e-5)
    # the Ritz vector is the top eigenvector e_4 (int8-stored basis: ~1 % per entry)
    assert abs(float(v[0][3])) == pytest.approx(1.0, abs=2e-2)
    assert float(v[0].norm()) == pytest.approx(1.0, rel=1e-5)


def test_a_start_on_an_eigenvector_stops_at_once_and_is_exact() -> None:
    """β₁ = 0: the Krylov space is invariant after one product; no division by ~0."""
    a = torch.diag(torch.tensor([2.0, 9.0, 4.0], dtype=torch.float64))
    lam, v = lanczos(matrix_hvp(a), [torch.tensor([0.0, 3.0, 0.0])], iters=10)
    assert lam == pytest.approx(9.0, rel=1e-6)
    assert torch.allclose(v[0], torch.tensor([0.0, 1.0, 0.0]), atol=1e-2)


def test_a_dominant_negative_eigenvalue_does_not_hide_the_top_one() -> None:
    """|λ_min| = 30 > λ_max = 10: power iteration finds −30; the largest Ritz value is 10."""
    eigs = torch.linspace(-2.0, 4.0, 20, dtype=torch.float64)
    eigs[0], eigs[1] = 10.0, -30.0
    a = symmetric(eigs, seed=3)
    v0 = torch.randn(20, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert power_rayleigh(a, v0, 20) < 0  # the rule the old shifted second run was for
    lam, _ = lanczos(matrix_hvp(a), [v0.float()], iters=12)
    assert 0.99 * 10.0 <= lam <= 10.0 * (1 + 1e-5)


def test_the_diagonal_scale_gives_the_eigenvalue_of_dhd() -> None:
    eigs = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    a = symmetric(eigs, seed=1)
    d = torch.tensor([0.5, 2.0, 1.0, 3.0])
    dense = torch.linalg.eigvalsh(torch.diag(d.double()) @ a @ torch.diag(d.double()))
    lam, _ = lanczos(matrix_hvp(a), [torch.ones(4)], iters=4, scale=[d])
    assert lam == pytest.approx(float(dense.max()), rel=1e-5)


def test_a_non_finite_product_gives_nan_and_a_zero_start_changes_nothing() -> None:
    def broken(v):
        return [torch.full_like(v[0], math.nan)]

    lam, _ = lanczos(broken, [torch.ones(3)], iters=3)
    assert math.isnan(lam)
    start = [torch.zeros(3)]
    lam, v = lanczos(matrix_hvp(torch.eye(3, dtype=torch.float64)), start, iters=3)
    assert math.isnan(lam)
    assert v[0] is start[0]


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(2, 30),
    k=st.integers(1, 12),
    seed=st.integers(0, 10_000),
    indefinite=st.booleans(),
)
def test_ritz_value_lies_between_the_power_iterate_and_the_top_eigenvalue(
    n: int, k: int, seed: int, indefinite: bool
) -> None:
    """The Krylov space of k products holds power iteration's k-th iterate, so the largest Ritz
    value is never below its Rayleigh quotient, and never above λ_max (Cauchy interlacing)."""
    g = torch.Generator().manual_seed(seed)
    eigs = torch.rand(n, generator=g, dtype=torch.float64) * 10.0
    if indefinite:
        eigs -= 6.0
    a = symmetric(eigs, seed)
    v0 = torch.randn(n, generator=g, dtype=torch.float64)
    lam, v = lanczos(matrix_hvp(a), [v0.float()], iters=k)
    top = float(eigs.max())
    size = float(eigs.abs().max())
    tol = 1e-4 * size  # float32 products
    assert lam <= top + tol
    assert lam >= power_rayleigh(a, v0, k) - tol
    assert float(v[0].norm()) == pytest.approx(1.0, rel=1e-4)
    if k >= n:  # the whole space: exact up to rounding
        assert lam == pytest.approx(top, abs=10 * tol)
