"""Wall-clock-budget table: every scheduler under the same *time* budget per task.

``python -m benchmarks run --suite wallclock`` (or ``wallclock-quick``). Per task, the budget is
``B_task = step budget × median per-step time of plain AdamW + cosine``, measured once at set-up in
this process. Each run gets ``graff.BudgetClock(seconds=B_task)``; it trains until the clock is
exhausted (capped at 5 × the step budget) and evaluates inside ``clock.paused()``. Step-based
baselines become time-based (``LambdaLR`` over ``clock.fraction_used`` with the same
``graff.priors.BudgetPrior`` shapes); GRAFF / prior-only / REACTOR get the clock directly;
schedule-free keeps its warm-up in steps (5 % of the step budget). One worker process, one torch
thread, runs one after another (timing fairness).
"""

from __future__ import annotations

import json
import math
import statistics
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from benchmarks.loop import advance, clock_budget, task_step, train_loop
from benchmarks.markdown import markdown_table
from benchmarks.schedulers import make
from benchmarks.suites import SUITES, Suite, make_for_task, task_optimizer
from graff import BudgetClock

SCHEDULERS = (
    "graff",
    "prior_only",
    "reactor",
    "fixed",
    "cosine",
    "linear",
    "wsd",
    "schedule_free",
)
BASELINES = ("fixed", "cosine", "linear", "wsd", "schedule_free")
STEP_CAP = 5  # a run stops after STEP_CAP × the step budget even if time is left
TIMING_STEPS = 40  # AdamW + cosine steps timed per task at set-up (after 5 warm-up steps)
EVAL_POINTS = 5

# suite name -> (task configs taken from this step suite, seeds)
WALLCLOCK_SUITES: dict[str, tuple[str, int]] = {
    "wallclock": ("full", 3),
    "wallclock-quick": ("quick", 1),
    "wallclock-60": ("anchors", 1),
}
#: Realistic budgets (issue 18): every run gets at least this many seconds, no step cap, and
#: only the schedulers the overhead question needs (GRAFF, and GRAFF with its own time capped
#: at 2 % of B, against the two plain schedules).
LONG_SUITES = {"wallclock-60": 60.0}
LONG_SCHEDULERS = ("graff", "graff_time_share", "cosine", "wsd")


def _suite(name: str) -> Suite:
    return SUITES[WALLCLOCK_SUITES[name][0]]


def _time_steps(task: Any, steps: int) -> float:
    """Median seconds per training step of plain AdamW + cosine (seed 0) on ``task``."""
    kind, lr, weight_decay = task_optimizer(task)
    model = task.build(0)
    setup = make("cosine", model, lr, task.steps, seed=0, optimizer=kind, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(999)
    model.train()
    times = []
    for i in range(min(steps, task.steps) + 5):
        t0 = time.perf_counter()
        loss = task_step(task, model, setup, gen)
        if loss is None:
            raise RuntimeError(f"{task.name}: AdamW + cosine diverged while timing the budget")
        advance(setup, loss)
        if i >= 5:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _train(
    task: Any, name: str, seed: int, budget: float, step_cap: float = STEP_CAP
) -> dict[str, Any]:
    steps = task.steps
    model = task.build(seed)
    clock = BudgetClock(seconds=budget, measure_energy=False)
    setup, lr = make_for_task(name, task, model, seed, clock=clock)
    gen = torch.Generator().manual_seed(1000 + seed)
    val_curve = []
    next_eval = 1.0 / EVAL_POINTS

    def evaluate(done: int) -> None:  # at every 1 / EVAL_POINTS of the clock, in paused time
        nonlocal next_eval
        if clock.fraction_used >= next_eval and next_eval < 1.0:
            with clock.paused():
                setup.eval_mode()
                val_curve.append([done, clock.elapsed_seconds, task.val_loss(model)])
            next_eval += 1.0 / EVAL_POINTS

    model.train()
    clock.start()
    start = time.perf_counter()
    trace = train_loop(
        lambda: task_step(task, model, setup, gen),
        setup,
        clock_budget(clock, step_cap * steps),
        clock=clock,
        after_step=evaluate,
    )
    train_seconds = clock.elapsed_seconds
    own = setup.scheduler.overhead_seconds() if hasattr(setup.scheduler, "overhead_seconds") else {}
    done, diverged = trace.steps, trace.diverged
    train_losses, lrs = trace.losses, trace.lrs
    with clock.paused():
        setup.eval_mode()
        final = float("nan") if diverged else task.val_loss(model)
    val_curve.append([done, train_seconds, final])
    if not math.isfinite(final):
        diverged = True
    stride = max(1, -(-len(lrs) // 100))  # ≤ 100 points per curve
    return {
        "lr": lr,
        "budget_seconds": budget,
        "steps_done": done,
        "step_budget": steps,
        "hit_step_cap": done >= step_cap * steps,
        # GRAFF's own seconds (probe hooks, planner, guard; every λ̂ estimate incl. the cold start)
        "scheduler_seconds": {k: round(v, 4) for k, v in own.items()},
        "train_seconds": train_seconds,
        "total_seconds": time.perf_counter() - start,
        "final_val_loss": None if diverged else final,
        "diverged": diverged,
        "val_curve": [[s, t, v if math.isfinite(v) else None] for s, t, v in val_curve],
        "train_curve": [[i, v] for i, v in enumerate(train_losses) if i % stride == 0],
        "lr_curve": [[i, v] for i, v in enumerate(lrs) if i % stride == 0],
    }


def run(
    name: str,
    out: Path,
    *,
    seeds: int | None,
    data_dir: str | None,
    workers: int,
    resume_key: str | None = None,
) -> None:
    """Run wall-clock suite ``name`` into ``out``, one run at a time in this process.

    With ``resume_key`` (the git commit of clean code) an interrupted call of the same suite goes
    on where it stopped: the runs it finished under the same key are kept, and so are its
    budgets (``budgets.json``), so that kept and new runs share the same B per task; only the
    missing runs are done. ``resume_key=None`` (``--fresh``, uncommitted changes) starts over.
    """
    from tqdm import tqdm

    from benchmarks.meta import provenance, runs_of_commit

    seeds = seeds or WALLCLOCK_SUITES[name][1]
    meta = provenance() | {"suite": name, "seeds": seeds, "workers": 1}
    if workers > 1:
        print(
            "wallclock suites always run in 1 worker process (timing fairness); --workers ignored"
        )
        meta["workers_requested"] = workers
    torch.set_num_threads(1)
    suite = _suite(name)
    t_start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    budgets = _kept_budgets(out / "budgets.json", name, resume_key)
    measure = budgets is None
    budgets = budgets or {}
    tasks = []
    for task in suite.build_tasks():
        task.setup(Path(data_dir) if data_dir else None)
        if measure:
            per_step = _time_steps(task, TIMING_STEPS)
            budgets[task.name] = {
                "step_budget": task.steps,
                "adamw_cosine_median_step_seconds": per_step,
                "budget_seconds": max(task.steps * per_step, LONG_SUITES.get(name, 0.0)),
            }
        tasks.append(task)
    (out / "budgets.json").write_text(
        json.dumps({"suite": name, "resume_key": resume_key, "budgets": budgets})
    )
    meta["budgets"] = budgets
    meta["torch_threads"] = 1
    log = out / "runs.jsonl"
    names = LONG_SCHEDULERS if name in LONG_SUITES else SCHEDULERS
    cap = math.inf if name in LONG_SUITES else STEP_CAP
    specs = [(t, s, seed) for t in tasks for seed in range(seeds) for s in names]
    wanted = {(t.name, s, seed) for t, s, seed in specs}
    runs = [
        r
        for r in runs_of_commit(log, resume_key if not measure else None, ("ok",))
        if (r["task"], r["scheduler"], r["seed"]) in wanted
    ]
    done = {(r["task"], r["scheduler"], r["seed"]) for r in runs}
    specs = [spec for spec in specs if (spec[0].name, spec[1], spec[2]) not in done]
    if runs:
        print(f"resuming {out}: {len(runs)} runs done at {resume_key}, {len(specs)} to go")
    meta["resumed_runs"] = len(runs)
    log.write_text("".join(json.dumps(r) + "\n" for r in runs))
    for task, sched, seed in tqdm(specs, desc=f"{name} suite"):
        result: dict[str, Any] = {"task": task.name, "scheduler": sched, "seed": seed}
        try:
            budget = budgets[task.name]["budget_seconds"]
            result.update(_train(task, sched, seed, budget, cap))
            result["status"] = "ok"
        except Exception as err:
            result.update(status="error", error=f"{type(err).__name__}: {err}")
            result["traceback"] = traceback.format_exc(limit=4)
        if resume_key is not None:
            result["resume_key"] = resume_key
        runs.append(result)
        with log.open("a") as f:
            f.write(json.dumps(result) + "\n")
    meta["wall_seconds"] = time.perf_counter() - t_start
    write(runs, meta, out)
    print(f"wrote {out}/results.json and results.md ({len(runs)} runs)")


def _kept_budgets(path: Path, name: str, resume_key: str | None) -> dict[str, Any] | None:
    """The budgets an interrupted call of suite ``name`` measured under ``resume_key``, if any.

    Kept runs were trained against these budgets, so a resumed suite must not re-measure them
    (the machine's speed moves them by several per cent between calls).
    """
    if resume_key is None or not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    if saved.get("suite") != name or saved.get("resume_key") != resume_key:
        return None
    return saved.get("budgets") or None


def _ms(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for r in runs:
        if r.get("status") != "ok":
            continue
        cell = summary.setdefault(r["task"], {}).setdefault(
            r["scheduler"],
            {"losses": [], "steps": [], "diverged": 0, "capped": 0, "overhead_shares": []},
        )
        own = r.get("scheduler_seconds") or {}
        if own:
            cell["overhead_shares"].append(sum(own.values()) / r["budget_seconds"])
        if r["final_val_loss"] is None:
            cell["diverged"] += 1
        else:
            cell["losses"].append(r["final_val_loss"])
        cell["steps"].append(r["steps_done"])
        cell["capped"] += bool(r["hit_step_cap"])
    for cells in summary.values():
        for cell in cells.values():
            cell["mean"], cell["std"] = _ms(cell["losses"])
            cell["steps_mean"] = statistics.fmean(cell["steps"])
            cell["seeds"] = len(cell["steps"])
            shares = cell.pop("overhead_shares")
            cell["overhead_share"] = statistics.median(shares) if shares else None
        best = min(
            (s for s in BASELINES if s in cells and cells[s]["losses"]),
            key=lambda s: cells[s]["mean"],
            default=None,
        )
        cells["_best_baseline"] = best
    return summary


def markdown(meta: dict[str, Any], summary: dict[str, Any]) -> str:
    lines = [
        "# graff benchmark — wall-clock budget",
        "",
        f"`{meta['command']}` at commit `{meta['git_commit'][:12]}`"
        f"{' (dirty)' if meta.get('git_dirty') else ''}, {meta['date']}, "
        f"{meta['machine'].get('platform', '')} ({meta['machine'].get('cpu', 'CPU not recorded')}); {meta['seeds']} seeds, "
        f"{meta.get('workers', 1)} worker process, 1 torch thread, "
        f"{meta.get('wall_seconds', float('nan')) / 60:.1f} min.",
        "",
        "Every scheduler gets the same wall-clock budget per task, B = step budget × median "
        "per-step time of plain AdamW + cosine measured at set-up in the same process"
        + (
            f", at least {LONG_SUITES[meta['suite']]:.0f} s, no step cap. "
            if meta.get("suite") in LONG_SUITES
            else f". Runs train until `BudgetClock(seconds=B)` is exhausted (capped at {STEP_CAP}× "
            "the step budget); "
        )
        + "evaluation is paused time. Time-based cosine/linear/WSD follow `clock.fraction_used`; "
        "GRAFF, prior only and REACTOR get the clock; schedule-free keeps a step warm-up "
        "(5 % of the step budget); fixed is constant. The task's default LR (1e-3 for AdamW) only, no sweep. "
        "A slower scheduler (GRAFF's probes) completes fewer steps: that is the point of this table. "
        "Timing on shared CPUs is noisy; the step-budget tables are the quality reference.",
        "",
    ]
    budgets = [
        (
            task,
            b["step_budget"],
            f"{b['adamw_cosine_median_step_seconds'] * 1e3:.2f} ms",
            f"{b['budget_seconds']:.2f}",
        )
        for task, b in meta["budgets"].items()
    ]
    header = ("task", "step budget", "AdamW+cosine s/step (median)", "budget B (s)")
    lines += markdown_table(header, budgets)
    for task, cells in summary.items():
        best = cells.get("_best_baseline")
        ref = cells[best]["mean"] if best else float("nan")
        rows = []
        for name in LONG_SCHEDULERS if meta.get("suite") in LONG_SUITES else SCHEDULERS:
            c = cells.get(name)
            if c is None:
                rows.append((name, "—", "—", "—", "not run / skipped"))
                continue
            notes = []
            if name == best:
                notes.append("best baseline")
            if c["diverged"]:
                notes.append(f"{c['diverged']} diverged")
            if c["capped"]:
                notes.append(f"{c['capped']} hit step cap")
            if c.get("overhead_share") is not None:
                notes.append(f"own time {c['overhead_share'] * 100:.2f} % of B (median)")
            rel = f"{(c['mean'] / ref - 1) * 100:+.1f} %" if best and c["losses"] else "—"
            rows.append(
                (
                    name,
                    f"{c['mean']:.4f} ± {c['std']:.4f}",
                    f"{c['steps_mean']:.0f} ({min(c['steps'])}–{max(c['steps'])})",
                    rel,
                    ", ".join(notes),
                )
            )
        header = (
            "scheduler",
            "final val loss (mean ± std)",
            "steps done (mean, min–max)",
            "vs best baseline",
            "notes",
        )
        lines += ["", f"## {task}", "", *markdown_table(header, rows)]
    return "\n".join(lines) + "\n"


def write(runs: list[dict[str, Any]], meta: dict[str, Any], out: Path) -> dict[str, Any]:
    from benchmarks.report import dumps_compact, sanitize

    summary = summarize(runs)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "summary": summary, "runs": runs}
    (out / "results.json").write_text(dumps_compact(sanitize(payload)))
    (out / "results.md").write_text(markdown(meta, summary))
    return summary
