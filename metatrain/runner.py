"""One meta-training run (a task spec under a planner vector or planner-off), the normalised
loss, and the evaluator that runs a batch of them in worker processes.

Normalised loss (lower is better, 0 = level with planner-off on the same task and seed)::

    s = log((L + f) / (L_off + f)),   f = 0.01 · L_init,

where ``L`` is the run's final validation loss, ``L_off`` the planner-off run's on the same spec
(same seed, data order and model init: cached, run once per spec), ``L_init`` the untrained
model's validation loss, and a run that diverged (non-finite, or above ``FAIL_FACTOR · L_init``)
counts as ``FAIL_FACTOR · L_init``. A log ratio is scale-free (cross-entropy in nats over 2 or 31
classes, standardised MSE), so no task dominates by its loss scale; the floor ``f`` keeps a task
that planner-off nearly solves (``L_off → 0``) from turning a negligible absolute difference into
a huge ratio; the failure cap bounds ``|s|`` (≤ log 301 ≈ 5.7).
"""

from __future__ import annotations

import math
import multiprocessing
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from metatrain import graff_api
from metatrain.sampler import TaskSpec
from metatrain.tasks import make_optimizer, make_task

FAIL_FACTOR = 3.0
FLOOR = 0.01
MAX_BAD_STEPS = 20  # consecutive non-finite training losses that end a run as failed


@dataclass(frozen=True)
class Job:
    """A run to do: the task, and the planner vector (``None``: planner-off)."""

    spec: TaskSpec
    planner: torch.Tensor | None
    residual_max: float = 1.25  # the planner's authority (GraffConfig.residual_max)


@dataclass(frozen=True)
class RunResult:
    final: float  # final validation loss (may be non-finite)
    initial: float  # validation loss of the untrained model
    seconds: float


def normalised(final: float, baseline: float, initial: float) -> float:
    """``log((L + f) / (L_off + f))`` with failures capped (module docstring)."""
    cap = FAIL_FACTOR * initial
    floor = FLOOR * initial

    def clean(x: float) -> float:
        return cap if not math.isfinite(x) or x > cap else x

    return math.log((clean(final) + floor) / (clean(baseline) + floor))


def run_task(spec: TaskSpec, planner: torch.Tensor | None, residual_max: float = 1.25) -> RunResult:
    """Train ``spec`` for its budget under GRAFF and return its final validation loss."""

    def build(opt: torch.optim.Optimizer, model: torch.nn.Module, task: Any) -> Any:
        return graff_api.build_scheduler(
            opt,
            spec.steps,
            model=model,
            loss_fn=task.probe_loss_fn(model),
            planner=planner,
            seed=spec.seed,
            residual_max=residual_max,
        )

    return run_with(spec, build)


def run_with(spec: TaskSpec, build: Callable[[torch.optim.Optimizer, Any, Any], Any]) -> RunResult:
    """Train ``spec`` for its budget under the scheduler ``build(optimizer, model, task)``."""
    start = time.perf_counter()
    task = make_task(spec.family, spec.arch, spec.seed)
    model = task.build(spec.seed)
    initial = task.val_loss(model)
    opt = make_optimizer(spec.arch, spec.optimizer, spec.lr, model)
    sched = build(opt, model, task)
    gen = torch.Generator().manual_seed(spec.seed)  # common random numbers: same data order
    bad = 0
    try:
        for _ in range(spec.steps):
            loss = task.train_loss(model, gen)
            loss.backward()
            opt.step()
            sched.step(loss)
            opt.zero_grad(set_to_none=True)
            bad = 0 if math.isfinite(float(loss.detach())) else bad + 1
            if bad >= MAX_BAD_STEPS:
                return RunResult(math.inf, initial, time.perf_counter() - start)
    finally:
        sched.remove()
    return RunResult(task.val_loss(model), initial, time.perf_counter() - start)


def _run_job(job: Job) -> RunResult:
    return run_task(job.spec, job.planner, job.residual_max)


def _init_worker() -> None:
    torch.set_num_threads(1)


Evaluator = Callable[[Sequence[Job]], list[RunResult]]


class PoolEvaluator:
    """Runs jobs in ``workers`` processes (one torch thread each); 1 worker runs them inline.

    Results do not depend on the number of workers: each run is seeded by its spec alone.
    """

    def __init__(self, workers: int = 1, progress: Callable[[int], None] | None = None) -> None:
        self.workers = workers
        self.progress = progress
        self._pool: ProcessPoolExecutor | None = None
        if workers > 1:
            self._pool = ProcessPoolExecutor(
                workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker
            )
        else:
            _init_worker()

    def __call__(self, jobs: Sequence[Job]) -> list[RunResult]:
        if self._pool is None:
            out = []
            for job in jobs:
                out.append(_run_job(job))
                if self.progress:
                    self.progress(1)
            return out
        futures = [self._pool.submit(_run_job, job) for job in jobs]
        for future in futures:
            future.add_done_callback(lambda _f: self.progress and self.progress(1))
        return [f.result() for f in futures]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
