"""``python -m benchmarks trace``: one GRAFF run of a suite task, step by step.

The suites report where GRAFF ends; this shows *why*: the loss, the LR it planned, λ̂, the
guard's bound, the peak search's ceiling and peak, whether the search still runs or the guard
binds, and how many λ̂ estimates were taken so far. Same run as the suite's (same task
configuration, optimizer, LR, seed and data order as :func:`benchmarks.runner.run_one`); the
held-out cells have their own (``python -m benchmarks heldout --trace``).

Example: ``python -m benchmarks trace --task gsm8k_qwen3@800 --seed 0`` (the 800-step budget of
the ``budgets`` suite).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch

from benchmarks.loop import advance, task_step
from benchmarks.suites import SUITES, build_task, make_for_task

#: Suites whose task configuration a trace takes, in this order (``quick``'s tiny sizes last).
PREFERRED = ("anchors", "budgets", "full", "floor", "planner", "ablations")


def task_config(name: str, suite: str | None = None) -> dict[str, Any]:
    """The configuration ``suite`` runs task ``name`` with; ``suite=None``: the first of
    :data:`PREFERRED` (then any other suite) that lists it, ``{}`` if none does."""
    if suite is not None:
        if suite not in SUITES:
            raise KeyError(f"unknown suite {suite!r}; known: {sorted(SUITES)}")
        configs = dict(SUITES[suite].task_configs)
        if name not in configs:
            raise KeyError(f"suite {suite!r} has no task {name!r}; it has {sorted(configs)}")
        return dict(configs[name])
    order = [*PREFERRED, *(s for s in SUITES if s not in PREFERRED)]
    for suite_name in order:
        configs = dict(SUITES[suite_name].task_configs) if suite_name in SUITES else {}
        if name in configs:
            return dict(configs[name])
    return {}


def trace(
    name: str,
    seed: int = 0,
    lr_mult: float = 1.0,
    every: int = 20,
    graff_kwargs: dict[str, Any] | None = None,
    data_dir: Path | None = None,
    suite: str | None = None,
) -> tuple[list[dict[str, Any]], float]:
    """Train GRAFF on suite task ``name``; a row every ``every`` steps and at every step of the
    search phase (the first 15 % of the budget, where the peak is decided); the final
    validation loss."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the suites' workers: other thread counts reorder reductions
    try:
        return _trace(name, seed, lr_mult, every, graff_kwargs, data_dir, suite)
    finally:
        torch.set_num_threads(threads)


def _trace(
    name: str,
    seed: int,
    lr_mult: float,
    every: int,
    graff_kwargs: dict[str, Any] | None,
    data_dir: Path | None,
    suite: str | None,
) -> tuple[list[dict[str, Any]], float]:
    task = build_task(name, task_config(name, suite))
    task.setup(data_dir)
    model = task.build(seed)
    setup, lr = make_for_task(
        "graff", task, model, seed, lr_mult=lr_mult, graff_kwargs=graff_kwargs
    )
    sched, gen = setup.scheduler, torch.Generator().manual_seed(1000 + seed)
    search_steps = math.ceil(0.15 * task.steps)
    rows = []
    model.train()
    try:
        for step in range(1, task.steps + 1):
            loss = task_step(task, model, setup, gen)
            if loss is None:
                rows.append({"step": step, "loss": None})
                break
            setup.after_step()
            advance(setup, loss)
            if step % every and step > search_steps and step != task.steps:
                continue
            plan, search = sched.last_plan, sched.peak_search
            rows.append({
                "step": step, "loss": float(loss.detach()), "lr": setup.optimizer.param_groups[0]["lr"],
                "lr_factor": setup.optimizer.param_groups[0]["lr"] / lr,
                "lambda_max": sched.curvature.lambda_max,
                "bound_factor": None if plan.guard_bound is None else math.exp(plan.guard_bound),
                "ceiling_factor": None if search.log_ceiling is None else math.exp(search.log_ceiling),
                "peak_factor": math.exp(search.log_peak), "searching": search.searching,
                "guard_active": plan.guard_bound_active, "estimates": sched.curvature.n_estimates,
            })  # fmt: skip
        setup.eval_mode()
        final = task.val_loss(model)
    finally:
        sched.remove()
    return rows, final


def markdown(name: str, seed: int, lr_mult: float, rows: list[dict[str, Any]], final: float) -> str:
    """:func:`trace`'s rows as a markdown table (factors are of the user's LR)."""

    def num(x: float | None, fmt: str) -> str:
        return "—" if x is None else format(x, fmt)

    lines = [
        f"GRAFF on `{name}`, LR × {lr_mult:g}, seed {seed}: final validation loss {final:.4f}",
        "",
        "| step | loss | LR | LR (× user's) | λ̂ | guard bound (×) | ceiling (×) | peak (×) "
        "| searching | guard binds | λ̂ estimates |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["loss"] is None:
            lines.append(f"| {r['step']} | non-finite | | | | | | | | | |")
            continue
        lines.append(
            f"| {r['step']} | {r['loss']:.4f} | {r['lr']:.3g} | {r['lr_factor']:.3f} | "
            f"{num(r['lambda_max'], '.4g')} | {num(r['bound_factor'], '.3f')} | "
            f"{num(r['ceiling_factor'], '.3f')} | {r['peak_factor']:.3f} | "
            f"{'yes' if r['searching'] else 'no'} | {'yes' if r['guard_active'] else 'no'} | "
            f"{r['estimates']} |"
        )
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", required=True, help="a suite task, e.g. gsm8k_qwen3@800")
    parser.add_argument(
        "--suite",
        help="take the task's configuration from this suite (default: anchors, budgets, …)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr-mult", type=float, default=1.0, help="LR × the task's default")
    parser.add_argument("--every", type=int, default=20, help="a row every this many steps")
    parser.add_argument("--graff-kwargs", default="{}", help="GraffConfig fields, as JSON")
    parser.add_argument("--data-dir", help="GSM8K folder (default $GRAFF_GSM8K_DIR)")


def main(args: argparse.Namespace) -> None:
    try:
        kwargs = json.loads(args.graff_kwargs)
        rows, final = trace(
            args.task,
            args.seed,
            args.lr_mult,
            args.every,
            kwargs or None,
            Path(args.data_dir) if args.data_dir else None,
            args.suite,
        )
    except (KeyError, ValueError) as err:  # an unknown task, a bad budget suffix or bad JSON
        raise SystemExit(f"trace: {err}") from err
    print(markdown(args.task, args.seed, args.lr_mult, rows, final))
