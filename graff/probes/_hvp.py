"""Hessian-vector products, the Lanczos estimate of the top eigenpair, and its int8 storage.

A Hessian-vector product :math:`Hv = \\nabla_\\theta\\langle\\nabla_\\theta L(\\theta), v\\rangle`
costs one extra backward pass through the graph of the gradient (double backward; Pearlmutter,
"Fast Exact Multiplication by the Hessian", Neural Computation 6(1), 1994). The first-order
gradient graph is built once per estimate and reused by every product (``retain_graph=True``),
so ``k`` Lanczos steps cost one forward, one backward and ``k`` double-backward passes.

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

    Parameters the loss does not depend on (or depends on linearly), and parameters that do not
    require gradients now (frozen after the probe was built), get a zero product.

    Args:
        loss: A scalar tensor with a grad graph reaching ``params``.
        params: The parameters ``θ``; ``v`` must be shaped like them.

    Returns:
        A function mapping a list of tensors ``v`` to the list ``H v`` (same shapes and dtypes).
    """
    trainable = [i for i, p in enumerate(params) if p.requires_grad]
    wrt = [params[i] for i in trainable]
    grads = torch.autograd.grad(loss, wrt, create_graph=True, allow_unused=True) if wrt else ()
    live = [k for k, g in enumerate(grads) if g is not None and g.requires_grad]
    outputs = [grads[k] for k in live]

    def hvp(v: list[Tensor]) -> list[Tensor]:
        out = [torch.zeros_like(p) for p in params]
        if not live:
            return out
        hv = torch.autograd.grad(
            outputs,
            wrt,
            grad_outputs=[v[trainable[k]].to(grads[k].dtype) for k in live],
            retain_graph=True,
            allow_unused=True,
        )
        for k, h in enumerate(hv):
            if h is not None:
                out[trainable[k]] = h
        return out

    return hvp


def lanczos(
    hvp: HVP,
    v0: Sequence[Tensor],
    iters: int,
    scale: Sequence[Tensor] | None = None,
) -> tuple[float, list[Tensor]]:
    r"""Top eigenpair of ``M = D H D`` (``D = diag(scale)``, identity if None) by Lanczos.

    ``iters`` steps of the Lanczos process from ``v0`` (Lanczos, 1950; Golub & Van Loan,
    *Matrix Computations*, §10.1) build the tridiagonal :math:`T_k = Q_k^\top M Q_k` of ``M``
    on the Krylov space :math:`\mathcal K_k(M, v_0)`, one Hessian-vector product per step:

    .. math:: \beta_{j} q_{j+1} = M q_j - \alpha_j q_j - \beta_{j-1} q_{j-1},\qquad
              \alpha_j = q_j^\top M q_j .

    The estimate is the largest Ritz value :math:`\theta = \lambda_{\max}(T_k)`, and the
    Ritz vector :math:`Q_k s` (``s`` its eigenvector of :math:`T_k`) is the next warm start.
    Why not power iteration: :math:`\mathcal K_k` contains the ``k``-th power iterate, so
    :math:`\theta` is never below that iterate's Rayleigh quotient and converges far faster
    when the top of the spectrum is crowded (measured: ``docs/concepts/probes.md``); and it
    finds the largest *algebraic* eigenvalue, so a negative eigenvalue of larger size (an
    indefinite Hessian away from a minimum) needs no second, shifted run. Like a Rayleigh
    quotient, :math:`\theta \le \lambda_{\max}(M)` (Cauchy interlacing), up to rounding.

    Memory: the current and previous Lanczos vectors in float32, and every ``q_j`` in int8
    (:func:`quantize_int8`, a quarter of a float32 copy each) to form the Ritz vector, which is
    stored in int8 anyway. No full re-orthogonalisation (it would need the ``q_j`` exactly):
    each new vector is orthogonalised twice against the two it follows, which keeps the top
    Ritz value accurate for the few dozen steps used here; the process stops early when the
    Krylov space is invariant (:math:`\beta_j \approx 0`).

    Args:
        hvp: ``v ↦ H v`` (see :func:`make_hvp`).
        v0: Start vector (warm start: the previous Ritz vector); need not be normalised.
        iters: Number of Hessian-vector products (>= 1).
        scale: Optional diagonal ``D`` as tensors shaped like the parameters.

    Returns:
        ``(θ, y)``: the largest Ritz value (NaN if a product was not finite) and the normalised
        Ritz vector (``v0`` unchanged if ``v0`` is zero or not finite; the last Lanczos vector
        if a product was not finite).
    """
    q = [x.float() for x in v0]
    norm = math.sqrt(dot(q, q))
    if not math.isfinite(norm) or norm == 0.0:
        return math.nan, list(v0)
    q = torch._foreach_div(q, norm)
    alphas: list[float] = []
    betas: list[float] = []
    basis: list[list[tuple[Tensor, float]]] = []
    q_prev: list[Tensor] | None = None
    beta = 0.0
    for _ in range(iters):
        basis.append([quantize_int8(x) for x in q])
        u = q if scale is None else torch._foreach_mul(q, list(scale))
        w = [h.float() for h in hvp(u)]
        if scale is not None:
            w = torch._foreach_mul(w, list(scale))
        alpha = dot(q, w)
        if not math.isfinite(alpha):
            return math.nan, q
        alphas.append(alpha)
        for _ in range(2):  # orthogonalise against q_j and q_{j-1}, twice (rounding)
            torch._foreach_add_(w, q, alpha=-dot(q, w))
            if q_prev is not None:
                torch._foreach_add_(w, q_prev, alpha=-dot(q_prev, w))
        beta = math.sqrt(max(dot(w, w), 0.0))
        if not math.isfinite(beta):
            return math.nan, q
        size = max(abs(a) for a in alphas) + max(betas, default=0.0)  # ~ ‖T_k‖
        if len(alphas) == iters or beta <= 1e-6 * size:  # done, or an invariant subspace
            break
        betas.append(beta)
        q_prev, q = q, torch._foreach_div(w, beta)
    k = len(alphas)
    tri = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if k > 1:
        off = torch.tensor(betas[: k - 1], dtype=torch.float64)
        tri += torch.diag(off, 1) + torch.diag(off, -1)
    evals, evecs = torch.linalg.eigh(tri)
    s = evecs[:, -1].tolist()
    ritz = [torch.zeros_like(x) for x in q]
    for coefficient, pieces in zip(s, basis, strict=True):
        torch._foreach_add_(ritz, [dequantize_int8(qi, sc) for qi, sc in pieces], alpha=coefficient)
    norm = math.sqrt(dot(ritz, ritz))
    if not math.isfinite(norm) or norm == 0.0:
        return float(evals[-1]), q
    return float(evals[-1]), torch._foreach_div(ritz, norm)


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
