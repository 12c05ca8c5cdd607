"""benchmarks/lambda_accuracy.py: its reference and its power-iteration oracle, by closed forms."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("scipy")

from benchmarks.lambda_accuracy import arpack_top, markdown, power_rayleigh, scaled


def _hvp(a: torch.Tensor):
    return lambda v: [(a @ v[0].double()).float()]


def test_arpack_finds_the_largest_algebraic_eigenvalue_of_an_indefinite_matrix() -> None:
    a = torch.diag(torch.tensor([4.0, -9.0, 1.0, 2.5, 0.5, -3.0], dtype=torch.float64))
    top, products = arpack_top(_hvp(a), [torch.zeros(6)])
    assert top == pytest.approx(4.0, rel=1e-4)
    assert products >= 1


def test_power_iteration_oracle_is_the_rayleigh_quotient_of_the_iterate() -> None:
    a = torch.diag(torch.tensor([3.0, 1.0], dtype=torch.float64))
    v0 = [torch.tensor([1.0, 1.0])]
    # one product: the quotient of v0 itself, (3 + 1) / 2; two: of A v0 ∝ (3, 1), (27 + 1) / 10
    assert power_rayleigh(_hvp(a), v0, 1) == pytest.approx(2.0)
    assert power_rayleigh(_hvp(a), v0, 2) == pytest.approx(2.8)
    # a negative eigenvalue larger in size wins: the quotient tends to −9, not to 4
    b = torch.diag(torch.tensor([4.0, -9.0], dtype=torch.float64))
    assert power_rayleigh(_hvp(b), v0, 40) == pytest.approx(-9.0, rel=1e-3)
    assert math.isnan(power_rayleigh(_hvp(torch.zeros(2, 2, dtype=torch.float64)), v0, 2))


def test_scaled_product_is_d_h_d() -> None:
    a = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    d = torch.tensor([0.5, 2.0])
    got = scaled(_hvp(a), [d])([torch.tensor([1.0, -1.0])])[0]
    want = torch.diag(d.double()) @ a @ torch.diag(d.double()) @ torch.tensor([1.0, -1.0]).double()
    assert torch.allclose(got.double(), want)


def test_markdown_names_every_estimator_and_its_ratio() -> None:
    ratios = {str(k): 1.0 / k for k in (3, 6, 10, 20, 40)}
    row = {
        "task": "t",
        "optimizer": "adamw",
        "step": 12,
        "top": 700.0,
        "arpack_products": 31,
        "probe": 0.91,
        "ratios": {"lanczos": ratios, "power": ratios},
    }
    meta = {
        "command": "python -m benchmarks lambda-accuracy",
        "git_commit": "0123456789abcdef",
        "date": "d",
        "machine": {"cpu_count": 2, "torch": "2"},
    }
    text = markdown(meta, [row])
    assert "| t (adamw) | 12 | 700 (31) | 0.910 | 0.333 |" in text
    assert "Lanczos 40" in text
    assert "power 40" in text
