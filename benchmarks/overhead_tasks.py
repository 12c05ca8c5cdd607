"""Steady-state per-step overhead of GRAFF on every task of the ``anchors`` suite, runs alone.

Issue 18 asks for GRAFF's overhead in the steady state, λ̂ refreshes included, *on every task*;
the interleaved tables of :mod:`benchmarks.overhead` cover only the tiny-Qwen3 LoRA task. Here
each of the ``anchors`` suite's tasks (its own model, optimizer, batch and step budget) is
trained by AdamW/SGD + cosine and by GRAFF, one run after the other, each alone in the process,
as a user's run is (interleaving a dozen models can evict a scheduler's state from the caches
between its steps; the interleaved tables keep that reading for comparing schedulers side by
side).

Per task and repeat:

- **direct**: thread-CPU seconds inside GRAFF's hooks and ``step()``, λ̂ estimates excluded
  (:class:`benchmarks.meters.CpuMeter`), per step, net of the reference's own
  ``scheduler.step()`` (LambdaLR, which GRAFF replaces), over cosine's median CPU step;
- **refreshes**: the CPU time of one scheduled λ̂ refresh, timed once after the run (the
  estimate the probe's ``auto`` interval schedules: ``power_iters`` products, warm-started), over
  (the interval the ``auto`` rule chose × cosine's median CPU step) — one refresh per interval,
  which is what they cost once the cold start is paid off (a budget run shorter than the interval
  never reaches one).

The steady state is direct + refreshes; the median over repeats is reported. Not included: the
one-off cold start and the extra refreshes the peak search asks for while it runs (both in the
step-budget suites' run-time column and in the wall-clock suite's own-time column).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.loop import advance, task_step
from benchmarks.markdown import markdown_table
from benchmarks.meters import CpuMeter
from benchmarks.suites import SUITES, make_for_task

REFERENCE = "cosine"
REPEATS = 3


def _run(task: Any, name: str, seed: int) -> dict[str, Any]:
    """Train ``name`` for the task's step budget alone; per-step CPU times and graff's costs."""
    with CpuMeter() as meter:  # entered before the scheduler is built: hooks bind then
        model = task.build(seed)
        setup, _ = make_for_task(name, task, model, seed)
        gen = torch.Generator().manual_seed(1000 + seed)
        model.train()
        cpu = []
        for _ in range(task.steps):
            t0 = time.thread_time()
            loss = task_step(task, model, setup, gen)
            if loss is None:
                raise RuntimeError(f"{task.name}: {name} diverged while timing its steps")
            setup.after_step()
            advance(setup, loss)
            cpu.append(time.thread_time() - t0)
        hooks, _ = meter.of(setup.scheduler)
    out: dict[str, Any] = {
        "median_step_s": statistics.median(cpu),
        "direct_s_per_step": hooks / task.steps,
    }
    probe = getattr(setup.scheduler, "curvature", None)
    if probe is not None and probe.lambda_max is not None:
        t0 = time.thread_time()
        probe.estimate_lambda_max()  # a scheduled refresh: power_iters products, warm-started
        out["refresh_s"] = time.thread_time() - t0
        out["interval"] = int(probe.interval)
    if hasattr(setup.scheduler, "remove"):
        setup.scheduler.remove()
    return out


def measure_task(task: Any, repeats: int = REPEATS, seed: int = 0) -> dict[str, Any]:
    """Cosine and GRAFF alone on ``task``, alternating, ``repeats`` times; medians."""
    runs: dict[str, list[dict[str, Any]]] = {REFERENCE: [], "graff": []}
    for r in range(repeats):
        order = [REFERENCE, "graff"] if r % 2 == 0 else ["graff", REFERENCE]
        for name in order:
            runs[name].append(_run(task, name, seed))
    return summarise(runs, task.steps)


def summarise(runs: dict[str, list[dict[str, Any]]], steps: int) -> dict[str, Any]:
    """Per repeat: GRAFF's net direct cost and its refresh share, over the same repeat's cosine
    median CPU step; the median over repeats of each (and of their sum)."""
    direct, refresh, total, net_us, ref_share = [], [], [], [], []
    for ref, run in zip(runs[REFERENCE], runs["graff"], strict=True):
        step = ref["median_step_s"]
        ref_share.append(ref["direct_s_per_step"] / step * 100)
        net = run["direct_s_per_step"] - ref["direct_s_per_step"]
        share = (
            run["refresh_s"] / (run["interval"] * step)
            if run.get("interval") and "refresh_s" in run
            else 0.0
        )
        net_us.append(net * 1e6)
        direct.append(net / step * 100)
        refresh.append(share * 100)
        total.append(direct[-1] + refresh[-1])
    graff = runs["graff"]
    return {
        "steps": steps,
        "repeats": len(graff),
        "cosine_step_ms": statistics.median(r["median_step_s"] for r in runs[REFERENCE]) * 1e3,
        "net_us_per_step": statistics.median(net_us),
        "direct_percent": statistics.median(direct),
        # LambdaLR's own step(): what any torch LRScheduler costs per step on this task
        "reference_us_per_step": statistics.median(r["direct_s_per_step"] for r in runs[REFERENCE])
        * 1e6,
        "reference_percent": statistics.median(ref_share),
        "refresh_ms": statistics.median(r.get("refresh_s", 0.0) for r in graff) * 1e3,
        "interval": int(statistics.median(r.get("interval", 0) for r in graff)),
        "refresh_percent": statistics.median(refresh),
        "total_percent": statistics.median(total),
    }


def measure(data_dir: Path | None, repeats: int = REPEATS) -> dict[str, Any]:
    """:func:`measure_task` on every task of the ``anchors`` suite."""
    from tqdm import tqdm

    results = {}
    for task in tqdm(SUITES["anchors"].build_tasks(), desc="overhead: every task, alone"):
        task.setup(data_dir)
        results[task.name] = measure_task(task, repeats)
    return {"results": results, "repeats": repeats}


def markdown(data: dict[str, Any], target: float = 1.0) -> list[str]:
    """The section of ``overhead.md`` for :func:`measure`'s results."""
    rows = []
    for name, r in data["results"].items():
        rows.append(
            (
                f"`{name}`",
                f"{r['cosine_step_ms']:.2f}",
                f"{r['reference_percent']:.2f} % ({r['reference_us_per_step']:.0f} µs)",
                f"{r['direct_percent']:.2f} % ({r['net_us_per_step']:.0f} µs)",
                f"{r['refresh_ms']:.0f}",
                r["interval"] or "—",
                f"{r['refresh_percent']:.2f} %",
                f"**{r['total_percent']:.2f} %**",
                "yes" if r["total_percent"] <= target else "no",
            )
        )
    header = (
        "task",
        "cosine's step (CPU ms)",
        "LambdaLR's own `step()`",
        "direct, per step",
        "one refresh (CPU ms)",
        "refresh interval (steps)",
        "refreshes, per step",
        "steady state",
        f"≤ {target:g} %",
    )
    return [
        f"Each task of the `anchors` suite at its own step budget; cosine and GRAFF alone in the "
        f"process, alternating, {data['repeats']} repeats, medians. Direct: GRAFF's hooks and "
        "`step()` (λ̂ estimates excluded) net of LambdaLR's `step()`, over cosine's median CPU "
        "step. Refreshes: one scheduled λ̂ refresh, timed after the run, per `auto` interval. "
        "Steady state = direct + refreshes (cold start and the search's extra refreshes "
        "excluded: see the run-time and own-time columns of the suites). LambdaLR's own "
        "`step()`: the CPU time of the torch scheduler cosine runs on, per step, over its median "
        "step — what any `LRScheduler` written in Python costs there, and so a floor under "
        "the target on tasks whose steps take a few milliseconds.",
        "",
        *markdown_table(header, rows),
    ]
