"""Run one (task, scheduler, LR, seed) training run, and whole suites across worker processes."""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from benchmarks.loop import step_budget, task_step, train_loop
from benchmarks.meta import runs_of_commit
from benchmarks.schedulers import ANCHORS, MissingAnchorPackage, make
from benchmarks.suites import Suite, task_optimizer

_TASKS: dict[str, Any] = {}
_EVAL_POINTS = 10


def setup_worker(suite: Suite, data_dir: str | None, threads: int = 1) -> None:
    """Per-process set-up: load data (and pre-train the LoRA base) once for all runs."""
    global _EVAL_POINTS
    torch.set_num_threads(threads)
    _EVAL_POINTS = suite.eval_points
    for task in suite.build_tasks():
        task.setup(Path(data_dir) if data_dir else None)
        _TASKS[task.name] = task


MAX_CURVE_POINTS = 200  # a stored curve never has more points than this (results stay small)


def _subsample(values: list[float], points: int = 100) -> list[list[float]]:
    """Every ``stride``-th value (and the last), ≤ 2 × ``points`` points, 6 significant digits."""
    stride = max(1, -(-len(values) // points))
    return [
        [i, float(f"{v:.6g}")]
        for i, v in enumerate(values)
        if i % stride == 0 or i == len(values) - 1
    ]


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    """Train one run; never raises (errors and skips are recorded in the result)."""
    result = dict(spec)
    try:
        result.update(_train(spec))
        result["status"] = "ok"
    except MissingAnchorPackage as err:  # an optional benchmark extra, not a failure
        result.update(status="skipped", error=str(err))
    except Exception as err:
        result.update(status="error", error=f"{type(err).__name__}: {err}")
        result["traceback"] = traceback.format_exc(limit=4)
    return result


def _train(spec: dict[str, Any]) -> dict[str, Any]:
    task = _TASKS[spec["task"]]
    kind, default_lr, weight_decay = task_optimizer(task)
    steps, lr = task.steps, default_lr * spec["lr_mult"]
    model = task.build(spec["seed"])
    gen = torch.Generator().manual_seed(1000 + spec["seed"])
    train_losses, lrs, val_curve, extra = [], [], [], {}
    start = time.perf_counter()
    if spec["scheduler"] == "lr_range_wsd":  # the range test spends the first steps of the budget
        from benchmarks import lr_range

        range_gen = torch.Generator().manual_seed(2000 + spec["seed"])
        setup, found = lr_range.make_setup(
            model,
            steps,
            lambda m: task.train_loss(m, range_gen),
            seed=spec["seed"],
            optimizer=kind,
            weight_decay=weight_decay,
        )
        lr, done = found.lr, found.steps
        train_losses, lrs = [min(v, 1e9) for v in found.raw_losses], list(found.lrs)
        lrs += [found.lrs[-1]] * (done - len(lrs))  # a non-finite last step has no smoothed entry
        extra["range_test"] = {"steps": done, "picked_lr": lr, "rule": found.rule}
    else:
        setup = make(
            spec["scheduler"],
            model,
            lr,
            steps,
            seed=spec["seed"],
            loss_fn=task.probe_loss_fn(model),
            graff_kwargs=spec.get("graff_kwargs"),
            optimizer=kind,
            weight_decay=weight_decay,
        )
        done = 0
    if spec["scheduler"] in ANCHORS and spec["scheduler"] != "lr_range_wsd":
        group = setup.optimizer.param_groups[0]  # its own LR (1.0, or 0.0025 for SF AdamW)
        lr = float(group.get("initial_lr", group["lr"]))
    evaluated = setup.eval_model or model  # DoG: its averaged iterate
    eval_every = max(1, steps // _EVAL_POINTS)

    def evaluate(done: int) -> None:
        if done % eval_every == 0 or done == steps:
            setup.eval_mode()
            val_curve.append([done, task.val_loss(evaluated)])

    model.train()
    trace = train_loop(
        lambda: task_step(task, model, setup, gen),
        setup,
        step_budget(steps),
        done=done,
        after_step=evaluate,
    )
    seconds = time.perf_counter() - start
    train_losses += trace.losses
    lrs += trace.lrs
    diverged = trace.diverged
    final = (
        float("nan")
        if diverged
        else task.val_loss(evaluated)
        if not val_curve
        else val_curve[-1][1]
    )
    if not math.isfinite(final):
        diverged = True
    return {
        **extra,
        "optimizer": kind,
        "lr": lr,
        "lr_taken": spec["scheduler"] not in ANCHORS,
        "steps": steps,
        "final_val_loss": None if diverged else final,
        "diverged": diverged,
        "seconds": seconds,
        "val_curve": [[s, v if math.isfinite(v) else None] for s, v in val_curve],
        "train_curve": _subsample([v if math.isfinite(v) else 1e9 for v in train_losses]),
        "lr_curve": _subsample(lrs),
    }


def _spec_key(run: dict[str, Any]) -> str:
    """A run's identity: its spec's fields (task, scheduler, LR multiplier, seed, GRAFF kwargs)."""
    return json.dumps({k: run.get(k) for k in SPEC_FIELDS}, sort_keys=True)


#: The fields of a spec (:meth:`benchmarks.suites.Suite.specs`, plus ``--graff-kwargs``).
SPEC_FIELDS = ("task", "scheduler", "lr_mult", "seed", "graff_kwargs")


def finished_runs(log: Path, specs: list[dict[str, Any]], resume_key: str | None) -> list[dict]:
    """The runs of ``log`` (a suite's ``runs.jsonl``) that a resumed suite keeps.

    A run is kept if it finished (``ok`` or ``skipped``), belongs to one of ``specs``, and was
    written under the same ``resume_key`` (the git commit of clean code): results of other code
    are never mixed into one table. ``resume_key=None`` (``--fresh``, or uncommitted changes to
    graff/ or benchmarks/) keeps nothing. A torn last line (a run killed while writing) is
    ignored.
    """
    wanted = {_spec_key(spec) for spec in specs}
    kept: dict[str, dict[str, Any]] = {}
    for run in runs_of_commit(log, resume_key, ("ok", "skipped")):
        if _spec_key(run) in wanted:
            kept[_spec_key(run)] = run
    return list(kept.values())


def run_suite(
    suite: Suite,
    out: Path,
    *,
    seeds: int | None,
    data_dir: str | None,
    workers: int,
    progress: bool = True,
    graff_kwargs: dict[str, Any] | None = None,
    resume_key: str | None = None,
    only: tuple[str, ...] = (),
    tasks: tuple[str, ...] = (),
) -> tuple[list[dict[str, Any]], int]:
    """Run every spec of ``suite``; results are appended to ``out/runs.jsonl`` as they finish.

    With ``resume_key`` (the git commit of clean code), the runs an earlier, interrupted call
    finished under the same key are kept (:func:`finished_runs`) and only the others run, so a
    suite cut off by the end of a session goes on where it stopped; each new run records the key.
    Returns every run (kept and new) and the number kept.

    ``graff_kwargs`` (recorded in every result) are passed to every GRAFF variant; ``only``
    (scheduler names) and ``tasks`` (task names) keep just their runs.
    """
    from tqdm import tqdm

    specs = suite.specs(seeds)
    if only:
        specs = [spec for spec in specs if spec["scheduler"] in only]
    if tasks:
        specs = [spec for spec in specs if spec["task"] in tasks]
    if graff_kwargs:
        specs = [{**spec, "graff_kwargs": dict(graff_kwargs)} for spec in specs]
    out.mkdir(parents=True, exist_ok=True)
    log = out / "runs.jsonl"
    results = finished_runs(log, specs, resume_key)
    kept = len(results)
    done = {_spec_key(r) for r in results}
    specs = [spec for spec in specs if _spec_key(spec) not in done]
    if results and progress:
        print(f"resuming {out}: {len(results)} runs done at {resume_key}, {len(specs)} to go")
    log.write_text("".join(json.dumps(r) + "\n" for r in results))
    bar = tqdm(total=len(specs), desc=f"{suite.name} suite", disable=not progress)
    if workers <= 1:
        setup_worker(suite, data_dir)
        iterator = map(run_one, specs)
        pool = None
    else:
        ctx = mp.get_context("spawn")
        pool = ctx.Pool(workers, initializer=setup_worker, initargs=(suite, data_dir))
        iterator = pool.imap_unordered(run_one, specs)
    try:
        for result in iterator:
            if resume_key is not None:
                result["resume_key"] = resume_key
            results.append(result)
            with log.open("a") as f:
                f.write(json.dumps(result) + "\n")
            bar.set_postfix_str(f"{result['task']}/{result['scheduler']}")
            bar.update()
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()
    return results, kept
