"""Behaviour cloning of the best constant LR correction: meta-training attempt 3.

Two ES runs (``runs/main``, ``runs/decoder``) did not learn: the residual's effect on one run's
final loss is small against that run's noise, and ES sees one scalar per run. Behaviour cloning
turns the same question into supervised learning with a dense signal:

1. **Sweep.** For every task of a meta-train set and of a meta-validation set, run planner-off
   GRAFF at the user's LR shifted by ``exp(s)``, ``s ∈ log{1/4, 1/2, 1, 2, 4}`` (:data:`SHIFTS`),
   recording the planner's inputs at every plan (:func:`graff_api.build_recording_scheduler`:
   the LR is planner-off's, step for step). Score each run against the unshifted one,
   ``log((L + f)/(L_off + f))`` (:func:`metatrain.runner.normalised`).
2. **Targets.** The best shift ``s*`` of a task is the minimum of a parabola through the grid's
   best point and its neighbours (the grid point itself at an edge), clipped to ``±log 4``. The
   planner's residual is the *total* log-LR correction: in use, a planner that has set the
   residual ``r`` sees features of a run at ``exp(r)`` × the user's LR, with ``r`` inside its
   ``log_lr_factor`` input. A run shifted by ``s`` is exactly that situation with ``r = s``, so
   its recorded ``log_lr_factor`` gets ``s`` added (the other inputs are ratios to the LR in use
   or to the stability limit, the same in both views) and its target is ``s*`` whatever ``s``:
   the fixed point of the planner in use is then the best shift. Every shifted run is a training
   sequence (5 per task), showing the planner its inputs below and above the best LR. A task's
   weight is ``clip(spread / 0.1, 0.1, 1)``, ``spread`` the range of its five scores: tasks whose
   LR barely matters teach little.
3. **Fit.** The planner (graph-recurrent encoder + linear decoder, :class:`PlannerNet`) is
   unrolled over each sequence from a zero state, as the scheduler runs it, and trained by Adam on
   the weighted squared error of its residual ``r_t`` against the target at every plan.
   Meta-train and meta-validation regression losses are logged per epoch.
4. **Evaluate** (the curve that matters). Chosen epochs' planners run the meta-validation tasks as
   a user would run them (``warm_start=`` the file, online learning on, ``residual_max`` 4), scored
   against planner-off on the same task and seed. Epoch 0 is the fresh planner.

Every stage is resumable: sweep runs are files, the fit is deterministic and checkpointed, each
evaluated (epoch, task) is cached.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import random
import statistics
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from metatrain import graff_api
from metatrain.report import atomic_write
from metatrain.runner import RunResult, normalised, run_task, run_with
from metatrain.sampler import TaskSampler, TaskSpec, meta_val_specs

SHIFTS: tuple[float, ...] = tuple(math.log(f) for f in (0.25, 0.5, 1.0, 2.0, 4.0))
BASE = SHIFTS.index(0.0)
RESIDUAL_MAX = 4.0  # the planner's authority in evaluation runs (GraffConfig.residual_max)
SPREAD_SCALE = 0.1  # a task whose five scores span this much gets full weight
MIN_WEIGHT = 0.1
VAL_SEEDS = (12345, 54321)  # meta_val_specs draws: the standard 11 tasks, then 11 more


# ----------------------------------------------------------------------------- task sets
def train_specs(n: int, seed: int, max_steps: int | None) -> list[TaskSpec]:
    sampler = TaskSampler(seed, max_steps)
    return [sampler.sample() for _ in range(n)]


def val_specs(max_steps: int | None, sets: int = len(VAL_SEEDS)) -> list[TaskSpec]:
    """The standard meta-validation set, then ``sets − 1`` more draws from the same combos."""
    return [s for seed in VAL_SEEDS[:sets] for s in meta_val_specs(max_steps, seed=seed)]


def shifted(spec: TaskSpec, shift: float) -> TaskSpec:
    """``spec`` at the user's LR × exp(shift)."""
    return replace(spec, lr_factor=spec.lr_factor * math.exp(shift))


# ----------------------------------------------------------------------------- 1. sweep
def record(spec: TaskSpec) -> tuple[RunResult, Tensor, Tensor]:
    """A planner-off run of ``spec`` with the planner inputs recorded: (result, X, adjacency)."""
    xs: list[Tensor] = []
    adjacency: list[Tensor] = []

    def build(opt: torch.optim.Optimizer, model: Any, task: Any) -> Any:
        sched = graff_api.build_recording_scheduler(
            opt, spec.steps, model=model, loss_fn=task.probe_loss_fn(model), seed=spec.seed,
            record=xs,
        )  # fmt: skip
        adjacency.append(sched.runtime.adjacency.clone())
        return sched

    result = run_with(spec, build)
    return result, torch.stack(xs) if xs else torch.zeros(0), adjacency[0]


def _sweep_path(out: Path, spec: TaskSpec, k: int) -> Path:
    name = spec.key().replace("/", "_") + f"_s{k}.pt"
    return out / "sweep" / name


def _sweep_one(spec: TaskSpec, k: int, path: Path) -> dict[str, Any]:
    torch.set_num_threads(1)
    result, xs, adjacency = record(shifted(spec, SHIFTS[k]))
    entry = {"final": result.final, "initial": result.initial, "seconds": result.seconds}
    tmp = path.with_name(path.name + ".tmp")
    torch.save({**entry, "x": xs.to(torch.float32), "adjacency": adjacency}, tmp)
    os.replace(tmp, path)
    return entry


def _pool_map(
    fn: Callable[..., Any], jobs: list[tuple[Any, ...]], workers: int, desc: str
) -> list[Any]:
    """``fn(*job)`` for every job, in ``workers`` spawned processes (1: inline), with progress."""
    from tqdm import tqdm

    bar = tqdm(total=len(jobs), desc=desc, unit="run")
    if workers <= 1:
        torch.set_num_threads(1)
        out = []
        for job in jobs:
            out.append(fn(*job))
            bar.update(1)
        bar.close()
        return out
    results: list[Any] = [None] * len(jobs)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        futures = {pool.submit(fn, *job): i for i, job in enumerate(jobs)}
        for future in as_completed(futures):
            results[futures[future]] = future.result()
            bar.update(1)
    bar.close()
    return results


def sweep(out: Path, specs: Iterable[TaskSpec], workers: int) -> None:
    """Run every (task, shift) not on disk yet."""
    (out / "sweep").mkdir(parents=True, exist_ok=True)
    jobs = [
        (spec, k, _sweep_path(out, spec, k))
        for spec in specs
        for k in range(len(SHIFTS))
        if not _sweep_path(out, spec, k).is_file()
    ]
    _pool_map(_sweep_one, jobs, workers, "sweep runs")


# ----------------------------------------------------------------------------- 2. targets
def best_shift(scores: list[float]) -> float:
    """The minimum of the parabola through the grid's best point and its neighbours.

    At an edge of the grid, the best grid point (no extrapolation past the grid).
    """
    k = min(range(len(scores)), key=scores.__getitem__)
    if 0 < k < len(scores) - 1:
        below, here, above = scores[k - 1], scores[k], scores[k + 1]
        curvature = below - 2 * here + above
        if curvature > 0:
            h = SHIFTS[k + 1] - SHIFTS[k]
            offset = 0.5 * h * (below - above) / curvature
            return SHIFTS[k] + max(-h, min(h, offset))
    return SHIFTS[k]


@dataclass
class Sequence:
    """One recorded run: planner inputs ``x`` (T, N, F), the graph, the target, its weight."""

    key: str
    x: Tensor
    adjacency: Tensor
    target: float
    weight: float


@dataclass
class TaskSweep:
    spec: TaskSpec
    scores: list[float]  # normalised loss of each shift against the unshifted run
    best: float  # s*
    sequences: list[Sequence]


def as_deployed(x: Tensor, shift: float) -> Tensor:
    """The inputs of a run shifted by ``shift`` as a planner holding the residual ``shift`` sees
    them: ``log_lr_factor`` (stored ``/ ln 10``, :func:`graff.planner.features.node_features`)
    includes the residual."""
    x = x.clone()
    x[..., graff_api.LOG_LR_FACTOR] += shift / math.log(10.0)
    return x


def load_task(out: Path, spec: TaskSpec) -> TaskSweep:
    runs = [torch.load(_sweep_path(out, spec, k), weights_only=True) for k in range(len(SHIFTS))]
    base = runs[BASE]
    scores = [normalised(r["final"], base["final"], base["initial"]) for r in runs]
    best = best_shift(scores)
    limit = math.log(RESIDUAL_MAX)
    spread = max(scores) - min(scores)
    weight = min(1.0, max(MIN_WEIGHT, spread / SPREAD_SCALE))
    target = max(-limit, min(limit, best))
    sequences = [
        Sequence(f"{spec.key()}@{k}", as_deployed(r["x"], shift), r["adjacency"], target, weight)
        for k, (r, shift) in enumerate(zip(runs, SHIFTS, strict=True))
        if r["x"].numel()
    ]
    return TaskSweep(spec, scores, best, sequences)


# ----------------------------------------------------------------------------- 3. fit
def sequence_loss(net: torch.nn.Module, seq: Sequence) -> Tensor:
    """Weighted mean squared error of the unrolled planner's residual against the target."""
    h = net.initial_state(seq.adjacency.shape[0])
    preds = []
    for x in seq.x:
        h = net(x, h, seq.adjacency)
        preds.append(net.decode_residual(h))
    return seq.weight * (torch.stack(preds) - seq.target).pow(2).mean()


def mean_loss(net: torch.nn.Module, seqs: list[Sequence]) -> float:
    with torch.no_grad():
        return statistics.fmean(float(sequence_loss(net, s)) for s in seqs)


@dataclass(frozen=True)
class FitConfig:
    epochs: int = 30
    lr: float = 3e-3
    batch: int = 16
    seed: int = 0


def fit(
    train: list[Sequence],
    val: list[Sequence],
    config: FitConfig,
    state: dict[str, Any],
    checkpoint: Callable[[dict[str, Any]], None],
) -> None:
    """Train from the state's last epoch to ``config.epochs``; ``checkpoint`` after each epoch.

    ``state`` holds ``vectors`` (the planner after each epoch, epoch 0 = fresh), ``adam``,
    ``log`` (per-epoch train/val regression loss). Deterministic given the config.
    """
    net = graff_api.to_planner(state["vectors"][-1])
    adam = torch.optim.Adam(net.parameters(), lr=config.lr)
    if state.get("adam") is not None:
        adam.load_state_dict(state["adam"])
    if not state["log"]:
        state["log"].append(
            {"epoch": 0, "train": mean_loss(net, train), "val": mean_loss(net, val)}
        )
        checkpoint(state)
    from tqdm import tqdm

    for epoch in tqdm(range(len(state["vectors"]), config.epochs + 1), desc="fit epochs"):
        order = list(range(len(train)))
        random.Random(config.seed * 100_003 + epoch).shuffle(order)
        for start in range(0, len(order), config.batch):
            adam.zero_grad()
            batch = order[start : start + config.batch]
            loss = sum(sequence_loss(net, train[i]) for i in batch) / len(batch)
            loss.backward()  # type: ignore[union-attr]
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            adam.step()
        state["vectors"].append(graff_api.to_vector(net))
        state["adam"] = adam.state_dict()
        state["log"].append(
            {"epoch": epoch, "train": mean_loss(net, train), "val": mean_loss(net, val)}
        )
        checkpoint(state)


# ----------------------------------------------------------------------------- diagnosis
def pooled(seq: Sequence) -> Tensor:
    """A run's inputs pooled over blocks: the first third's mean, the whole mean, the last plan."""
    m = seq.x.mean(dim=1)
    return torch.cat([m[: max(1, len(m) // 3)].mean(0), m.mean(0), m[-1]])


def _weighted_mse(pred: Tensor, y: Tensor, w: Tensor) -> float:
    return float((w * (pred - y).pow(2)).mean())


def linear_probe(train: list[Sequence], val: list[Sequence]) -> dict[str, Any]:
    """Is the target predictable from the planner's inputs at all? Weighted ridge regressions
    on :func:`pooled` features (standardised on meta-train), scored on meta-val, next to the
    zero residual (planner-off) and the meta-train mean. A model-free check of the fit: if no
    ridge beats the zero residual on meta-val, the inputs do not carry the target across tasks.
    """

    def arrays(seqs: list[Sequence]) -> tuple[Tensor, Tensor, Tensor]:
        return (
            torch.stack([pooled(s) for s in seqs]).double(),
            torch.tensor([s.target for s in seqs], dtype=torch.float64),
            torch.tensor([s.weight for s in seqs], dtype=torch.float64),
        )

    xt, yt, wt = arrays(train)
    xv, yv, wv = arrays(val)
    mu, sd = xt.mean(0), xt.std(0).clamp_min(1e-6)
    a = torch.cat([(xt - mu) / sd, torch.ones(len(xt), 1, dtype=xt.dtype)], 1)
    av = torch.cat([(xv - mu) / sd, torch.ones(len(xv), 1, dtype=xv.dtype)], 1)
    mean = float((wt * yt).sum() / wt.sum())
    out: dict[str, Any] = {
        "zero_residual": round(_weighted_mse(torch.zeros_like(yv), yv, wv), 4),
        "train_mean": round(_weighted_mse(torch.full_like(yv, mean), yv, wv), 4),
        "ridge": {},
    }
    for lam in (0.1, 1.0, 10.0, 100.0, 1000.0):
        gram = a.T @ (wt[:, None] * a) + lam * torch.eye(a.shape[1], dtype=a.dtype)
        beta = torch.linalg.solve(gram, a.T @ (wt * yt))
        out["ridge"][f"{lam:g}"] = {
            "train": round(_weighted_mse(a @ beta, yt, wt), 4),
            "val": round(_weighted_mse(av @ beta, yv, wv), 4),
        }
    return out


# ----------------------------------------------------------------------------- 4. evaluate
def _evaluate_one(spec: TaskSpec, vector: Tensor | None) -> float:
    torch.set_num_threads(1)
    return run_task(spec, vector, RESIDUAL_MAX).final


def evaluate(
    out: Path, state: dict[str, Any], epochs: list[int], tasks: list[TaskSweep], workers: int
) -> dict[int, list[float]]:
    """Normalised loss of each epoch's planner on each meta-validation task (cached)."""
    cache: dict[str, float] = state.setdefault("eval", {})
    jobs, keys = [], []
    for epoch in epochs:
        for t in tasks:
            key = f"{epoch}|{t.spec.key()}"
            if key not in cache:
                jobs.append((t.spec, state["vectors"][epoch]))
                keys.append(key)
    for key, final in zip(keys, _pool_map(_evaluate_one, jobs, workers, "eval runs"), strict=True):
        cache[key] = final
    scores: dict[int, list[float]] = {}
    for epoch in epochs:
        row = []
        for t in tasks:
            base = torch.load(_sweep_path(out, t.spec, BASE), weights_only=True)
            final = cache[f"{epoch}|{t.spec.key()}"]
            row.append(normalised(final, base["final"], base["initial"]))
        scores[epoch] = row
    return scores


def summary(scores: dict[int, list[float]], tasks: list[TaskSweep]) -> dict[str, Any]:
    """Mean normalised loss per evaluated epoch, and the hindsight best constant shift's."""
    return {
        "eval": {str(e): round(statistics.fmean(v), 5) for e, v in sorted(scores.items())},
        "eval_median": {str(e): round(statistics.median(v), 5) for e, v in sorted(scores.items())},
        "better_worse": {
            str(e): [sum(x < -0.01 for x in v), sum(x > 0.01 for x in v)]
            for e, v in sorted(scores.items())
        },
        "oracle_constant_shift": round(statistics.fmean(min(t.scores) for t in tasks), 5),
        "val_tasks": [t.spec.key() for t in tasks],
        "val_scores": {str(e): [round(x, 4) for x in v] for e, v in sorted(scores.items())},
    }


def write_json(path: Path, payload: dict[str, Any]) -> None:
    atomic_write(path, json.dumps(payload, indent=1) + "\n")
