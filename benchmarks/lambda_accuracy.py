"""How close does λ̂ come to the top eigenvalue? Lanczos and power iteration against ARPACK.

``python -m benchmarks lambda-accuracy [--out DIR]`` trains each task of the ``anchors`` suite
with GRAFF at the user's LR until its first λ̂ is published (step 12 under AdamW, whose first
estimate is spread over steps 10-12; step 1 under SGD), then, on that state and the probe's own
fixed batch and (floored) preconditioner, computes the top eigenvalue of ``M = P^{-1/2} H
P^{-1/2}`` (SGD: ``H``) three ways:

- ARPACK's implicitly restarted Lanczos (``scipy.sparse.linalg.eigsh``, tolerance 1e-4): the
  reference, at whatever number of products it needs;
- :func:`graff.probes._hvp.lanczos` (what the probe runs) with k products from a random start;
- power iteration with k products from the same start (the probe's estimator before Lanczos;
  written here, since graff no longer has it), which finds the eigenvalue largest in *size*.

It also reports the probe's published λ̂ at that step, and writes ``results.json`` (compact)
and ``results.md`` to ``DIR`` (default ``benchmarks/results/lambda_accuracy``). About a minute
on two CPU cores.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from benchmarks.loop import advance, task_step
from benchmarks.markdown import markdown_table
from benchmarks.meta import provenance
from benchmarks.schedulers import make
from benchmarks.suites import SUITES, task_optimizer
from benchmarks.tasks import REPO

PRODUCTS = (3, 6, 10, 20, 40)


def power_rayleigh(hvp: Any, v0: list[Tensor], products: int) -> float:
    """The Rayleigh quotient ``vᵀMv`` power iteration reports after ``products`` products."""
    v = [x.double() for x in v0]
    norm = math.sqrt(sum(float((x * x).sum()) for x in v))
    v = [x / norm for x in v]
    lam = math.nan
    for _ in range(products):
        w = [h.double() for h in hvp([x.float() for x in v])]
        lam = sum(float((a * b).sum()) for a, b in zip(v, w, strict=True))
        norm = math.sqrt(sum(float((x * x).sum()) for x in w))
        if not (math.isfinite(norm) and norm > 0):
            return math.nan
        v = [x / norm for x in w]
    return lam


def arpack_top(hvp: Any, params: list[Tensor]) -> tuple[float, int]:
    """The largest algebraic eigenvalue of ``v ↦ hvp(v)`` by ARPACK, and its product count."""
    from scipy.sparse.linalg import LinearOperator, eigsh

    shapes, sizes = [p.shape for p in params], [p.numel() for p in params]
    count = 0

    def matvec(x: np.ndarray) -> np.ndarray:
        nonlocal count
        count += 1
        flat = torch.from_numpy(np.asarray(x, dtype=np.float32).reshape(-1))
        v = [c.reshape(s) for c, s in zip(flat.split(sizes), shapes, strict=True)]
        return torch.cat([h.float().reshape(-1) for h in hvp(v)]).double().numpy()

    n = sum(sizes)
    operator = LinearOperator((n, n), matvec=matvec, dtype=np.float64)
    top = eigsh(operator, k=1, which="LA", tol=1e-4, maxiter=500, return_eigenvectors=False)
    return float(top[0]), count


def scaled(hvp: Any, scale: list[Tensor] | None) -> Any:
    """``v ↦ D H D v`` for the diagonal ``D = scale`` (identity if None)."""
    if scale is None:
        return hvp

    def product(v: list[Tensor]) -> list[Tensor]:
        inner = hvp([s * x for s, x in zip(scale, v, strict=True)])
        return [s * h for s, h in zip(scale, inner, strict=True)]

    return product


def measure(task: Any) -> dict[str, Any]:
    """One task: its state after the first λ̂, the reference and every estimator."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from graff.probes._context import probing
    from graff.probes._hvp import lanczos, make_hvp
    from graff.probes.preconditioner import inverse_sqrt_preconditioner

    kind, lr, weight_decay = task_optimizer(task)
    model = task.build(0)
    setup = make(
        "graff",
        model,
        lr,
        task.steps,
        seed=0,
        loss_fn=task.probe_loss_fn(model),
        optimizer=kind,
        weight_decay=weight_decay,
    )
    probe = setup.scheduler.curvature
    estimator = probe.estimator
    gen = torch.Generator().manual_seed(1000)
    step = 0
    while probe.lambda_max is None and step < 50:
        advance(setup, task_step(task, model, setup, gen))
        step += 1
    params = estimator.params
    scale = None
    if estimator.kind is not None:
        scale = inverse_sqrt_preconditioner(
            estimator.optimizer, params, estimator.kind, estimator.preconditioner_floor
        )
    model.eval()
    with probing(), torch.enable_grad(), sdpa_kernel([SDPBackend.MATH]):
        hvp = scaled(make_hvp(estimator._probe_loss(), params), scale)
        start = time.perf_counter()
        top, arpack_products = arpack_top(hvp, params)
        seconds = (time.perf_counter() - start) / arpack_products
        gen = torch.Generator().manual_seed(0)
        v0 = [torch.randn(p.shape, generator=gen) for p in params]
        rows = {
            "lanczos": {k: lanczos(hvp, v0, k)[0] / top for k in PRODUCTS},
            "power": {k: power_rayleigh(hvp, v0, k) / top for k in PRODUCTS},
        }
    return {
        "task": task.name,
        "optimizer": kind,
        "step": step,
        "top": top,
        "arpack_products": arpack_products,
        "seconds_per_product": seconds,
        "probe": probe.lambda_max / top,
        "ratios": {name: {str(k): v for k, v in r.items()} for name, r in rows.items()},
    }


def markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    header = ("task", "step", "top eigenvalue (ARPACK, products)", "probe's λ̂")
    header += tuple(f"Lanczos {k}" for k in PRODUCTS) + tuple(f"power {k}" for k in PRODUCTS)
    table = []
    for r in rows:
        cells = [
            f"{r['task']} ({r['optimizer']})",
            str(r["step"]),
            f"{r['top']:.4g} ({r['arpack_products']})",
            f"{r['probe']:.3f}",
        ]
        for name in ("lanczos", "power"):
            cells += [f"{r['ratios'][name][str(k)]:.3f}" for k in PRODUCTS]
        table.append(tuple(cells))
    lines = [
        "# λ̂ against the top eigenvalue",
        "",
        f"`{meta['command']}` at commit `{meta['git_commit'][:12]}`, {meta['date']}, "
        f"{meta['machine']['cpu_count']} CPUs ({meta['machine'].get('cpu', 'CPU not recorded')}), torch {meta['machine']['torch']}.",
        "",
        "Each task trained with GRAFF at the user's LR until its first λ̂ is published; on that "
        "state, the ratio of each estimate to the top eigenvalue of the (preconditioned) Hessian "
        "on the probe's batch, by ARPACK. Lanczos and power iteration start from the same random "
        "vector with k Hessian-vector products; a negative ratio is power iteration caught by a "
        "negative eigenvalue larger in size. The probe's λ̂ is the first estimate GRAFF "
        "published (20 Lanczos products, chunked over steps 10-12 under AdamW, so on slightly "
        "older states).",
        "",
        *markdown_table(header, table),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks lambda-accuracy")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "lambda_accuracy"))
    parser.add_argument("--data-dir")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    meta = provenance()
    rows = []
    for task in SUITES["anchors"].build_tasks():
        task.setup(Path(args.data_dir) if args.data_dir else None)
        rows.append(measure(task))
        print(f"{task.name}: top {rows[-1]['top']:.4g}, probe {rows[-1]['probe']:.3f}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}) + "\n")
    (out / "results.md").write_text(markdown(meta, rows))
    print(f"wrote {out}/results.md")
