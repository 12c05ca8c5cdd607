"""Hessian-vector products, power iteration, and the int8 storage of the eigenvector.

A Hessian-vector product :math:`Hv = \\nabla_\\theta\\langle\\nabla_\\theta L(\\theta), v\\rangle`
costs one extra backward pass through the graph of the gradient (double backward; Pearlmutter,
"Fast Exact Multiplication by the Hessian", Neural Computation 6(1), 1994). The first-order
gradient graph is built once per estimate and reused by every product (``retain_graph=True``),
so ``k`` power iterations cost one forward, one backward and ``k`` double-backward passes.

Vectors are lists of tensors shaped like the parameters (no flattening copies).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from graff.errors import CheckpointError

HVP = Callable[[list[Tensor]], list[Tensor]]


def dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    """``Σ_j ⟨a_j, b_j⟩`` accumulated in float64."""
    total = torch.zeros((), dtype=torch.float64, device=a[0].device if a else "cpu")
    for x, y in zip(a, b, strict=True):
        total += torch.dot(x.reshape(-1).double(), y.reshape(-1).double())
    return float(total)


def make_hvp(loss: Tensor, params: Sequence[Tensor]) -> HVP:
    """Return ``v ↦ H v`` for the Hessian ``H`` of the scalar ``loss`` w.r.t. ``params``.

    Parameters the loss does not depend on (or depends on linearly) get a zero product.

    Args:
        loss: A scalar tensor with a grad graph reaching ``params``.
        params: The parameters ``θ``; ``v`` must be shaped like them.

    Returns:
        A function mapping a list of tensors ``v`` to the list ``H v`` (same shapes and dtypes).
    """
    grads = torch.autograd.grad(loss, list(params), create_graph=True, allow_unused=True)
    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    outputs = [grads[i] for i in live]

    def hvp(v: list[Tensor]) -> list[Tensor]:
        out = [torch.zeros_like(p) for p in params]
        if not live:
            return out
        hv = torch.autograd.grad(
            outputs,
            list(params),
            grad_outputs=[v[i].to(grads[i].dtype) for i in live],
            retain_graph=True,
            allow_unused=True,
        )
        for j, h in enumerate(hv):
            if h is not None:
                out[j] = h
        return out

    return hvp


def power_iteration(
    hvp: HVP,
    v0: Sequence[Tensor],
    iters: int,
    scale: Sequence[Tensor] | None = None,
    shift: float = 0.0,
    *,
    return_norm: bool = False,
) -> tuple[float, list[Tensor]] | tuple[float, list[Tensor], float]:
    """Top eigenpair of ``M = D H D`` (``D = diag(scale)``, identity if None) by power iteration.

    Each iteration forms :math:`w = M v` from the normalised iterate :math:`v`, records the
    Rayleigh quotient :math:`\\lambda = v^\\top M v` and continues from :math:`w/\\lVert w\\rVert`.
    With ``scale = P^{-1/2}`` the eigenvalues of ``M`` are those of :math:`P^{-1}H`
    (similar matrices), the preconditioned sharpness.

    Args:
        hvp: ``v ↦ H v`` (see :func:`make_hvp`).
        v0: Start vector (warm start: the previous eigenvector); need not be normalised.
        iters: Number of Hessian-vector products (>= 1).
        scale: Optional diagonal ``D`` as tensors shaped like the parameters.
        shift: Iterate on ``M − shift·I`` instead; with ``shift`` a negative eigenvalue of
            ``M`` this finds the top (most positive) eigenvalue, ``λ + shift`` is returned.

        return_norm: Also return :math:`\\lVert (M - \\text{shift}\\,I) v\\rVert` of the last
            product, which tends to the largest ``|eigenvalue − shift|`` from below.

    Returns:
        ``(λ, v)``: the last Rayleigh quotient (NaN if a product was not finite) and the last
        normalised iterate (``(λ, v, ‖w‖)`` with ``return_norm``). For ``iters`` products,
        ``λ`` is the quotient at iterate ``iters−1``.
    """
    v = [x.float() for x in v0]
    norm = math.sqrt(dot(v, v))
    if not math.isfinite(norm) or norm == 0.0:
        return (math.nan, list(v0), math.nan) if return_norm else (math.nan, list(v0))
    v = torch._foreach_div(v, norm)
    lam = math.nan
    for _ in range(iters):
        u = v if scale is None else torch._foreach_mul(v, list(scale))
        w = [h.float() for h in hvp(u)]
        if scale is not None:
            w = torch._foreach_mul(w, list(scale))
        if shift != 0.0:
            w = torch._foreach_sub(w, torch._foreach_mul(v, shift))
        lam = dot(v, w) + shift
        norm = math.sqrt(max(dot(w, w), 0.0))  # of (M − shift·I) v
        if not (math.isfinite(lam) and math.isfinite(norm)):
            return (math.nan, v, math.nan) if return_norm else (math.nan, v)
        if norm == 0.0:  # v in the null space: the quotient 0 is exact for this direction
            return (lam, v, norm) if return_norm else (lam, v)
        v = torch._foreach_div(w, norm)
    return (lam, v, norm) if return_norm else (lam, v)


def quantize_int8(x: Tensor) -> tuple[Tensor, float]:
    """``x ≈ q · s`` with ``q`` int8 in [-127, 127] and ``s`` a power of two (``2^⌈log2(max|x|/127)⌉``).

    A quarter of a float32 copy. With a power-of-two scale, ``q · s`` is exact in bfloat16 and
    float32, and quantizing it again returns the same ``q`` and ``s`` (``max|q| ≥ 64``), so a
    state saved as ``q · s`` round-trips bitwise. Relative resolution: 1/64 to 1/127 of max|x|.
    """
    amax = float(x.detach().abs().max()) if x.numel() else 0.0
    if not math.isfinite(amax) or amax == 0.0:
        return torch.zeros_like(x, dtype=torch.int8), 1.0
    scale = 2.0 ** math.ceil(math.log2(amax / 127.0))
    q = torch.round(x.detach().float() / scale).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: Tensor, scale: float, dtype: torch.dtype = torch.float32) -> Tensor:
    """``q · scale`` in ``dtype`` (the inverse of :func:`quantize_int8` up to its rounding)."""
    return q.to(dtype) * scale


def save_eigenvector(v: Sequence[tuple[Tensor, float]] | None) -> Tensor | None:
    """The int8 eigenvector as one flat bfloat16 CPU tensor (exact), or None without one.

    Exact: ``q · s`` with a power-of-two ``s`` is a bfloat16 number, and :func:`load_eigenvector`
    quantizes it back to the same ``(q, s)``.
    """
    if v is None:
        return None
    return torch.cat([dequantize_int8(q, s, torch.bfloat16).reshape(-1).cpu() for q, s in v])


def load_eigenvector(
    eig: Tensor | None, params: Sequence[Tensor]
) -> list[tuple[Tensor, float]] | None:
    """:func:`save_eigenvector` output back into int8 pieces shaped like ``params``.

    Raises:
        CheckpointError: if ``eig`` does not have one entry per parameter entry.
    """
    sizes = [p.numel() for p in params]
    if eig is None:
        return None
    if eig.numel() != sum(sizes):
        raise CheckpointError(
            f"eigenvector has {eig.numel()} entries, the probed parameters {sum(sizes)}."
        )
    return [
        quantize_int8(c.reshape(p.shape).to(p.device, torch.float32))
        for c, p in zip(eig.split(sizes), params, strict=True)
    ]
