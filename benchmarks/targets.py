"""The tuning-free comparison's targets (issue 18) and what the learned planner adds (issue 17),
evaluated on one suite's summary (``benchmarks.report.summarize``).

Targets, each met or not on this run (medians over seeds of the final validation loss; the
spreads are the report's, from means):

1. GRAFF at the user's LR at least as good as every tuning-free anchor, on every task;
2. GRAFF ≤ the best LR-swept baseline on at least half the tasks, and within 1 % on all;
3. GRAFF's spread across LR × {0.1, 1, 10} the smallest of every method that takes an LR;
4. GRAFF better than REACTOR (where run) and than a fixed LR, at the user's LR, everywhere.

The planner table compares the shipped planner (``graff``) with planner-off and with a fresh
planner on the same seeds (paired t-test; with 3 seeds the sign-flip test cannot go below 0.25).
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from benchmarks.markdown import markdown_table
from benchmarks.schedulers import ANCHORS, BASELINES

PLANNER_VARIANTS = (("graff_planner_off", "planner off"), ("graff_fresh", "fresh planner"))


def _mean(ts: dict[str, Any], key: str | None) -> float | None:
    """The median over seeds of a cell's final loss (None if absent or a seed diverged)."""
    cell = ts["cells"].get(key) if key else None
    if cell is None:
        return None
    values = list(cell["seeds"].values())
    return None if any(v is None for v in values) else statistics.median(values)


def _fmt(v: float | None) -> str:
    return "diverged" if v is None else f"{v:.4f}"


Row = tuple[str, str, "bool | None"]


def _anchors_target(tasks: dict[str, Any], graff: dict[str, float | None]) -> Row:
    bad, n = [], 0
    for t, ts in tasks.items():
        for anchor in ANCHORS:
            if f"{anchor}@1" not in ts["cells"]:
                continue
            n += 1
            a = _mean(ts, f"{anchor}@1")
            if graff[t] is None or (a is not None and graff[t] > a):
                bad.append(f"{t}: {anchor} {_fmt(a)} vs {_fmt(graff[t])}")
    evidence = ("fails on " + "; ".join(bad)) if bad else f"holds ({n} comparisons)"
    evidence = evidence if n else "not run in this suite"
    name = "GRAFF at the user's LR ≤ every tuning-free anchor, every task"
    return name, evidence, None if not n else not bad


def _swept_targets(tasks: dict[str, Any], graff: dict[str, float | None]) -> list[Row]:
    rel = {}
    for t, ts in tasks.items():
        g, b = graff[t], _mean(ts, ts["best_baseline"])
        rel[t] = None if g is None or b is None else (g - b) / b
    evidence = ", ".join(
        f"{t} {'n/a' if v is None else f'{100 * v:+.2f} %'}" for t, v in rel.items()
    )
    wins = sum(1 for v in rel.values() if v is not None and v <= 0)
    half = f"GRAFF ≤ the best LR-swept baseline on ≥ half of the {len(tasks)} tasks"
    within = "GRAFF within 1 % of the best LR-swept baseline on every task"
    return [
        (half, evidence, wins >= math.ceil(len(tasks) / 2)),
        (within, evidence, all(v is not None and v <= 0.01 for v in rel.values())),
    ]


def _spread_target(tasks: dict[str, Any]) -> Row:
    bad, compared = [], 0
    for t, ts in tasks.items():
        rob = ts["robustness"]
        if "graff" not in rob:
            continue
        compared += 1
        mine = rob["graff"]["spread"]
        for other, r in rob.items():
            if other not in (*BASELINES, "reactor"):  # methods that take an LR
                continue
            if mine is None or (r["spread"] is not None and mine >= r["spread"]):
                bad.append(f"{t}: {other}")
    evidence = ("not smaller than " + ", ".join(bad)) if bad else "holds"
    name = "GRAFF's spread across LR × {0.1, 1, 10} the smallest of every method taking an LR"
    return name, evidence, None if not compared else not bad


def _beats_target(tasks: dict[str, Any], graff: dict[str, float | None]) -> Row:
    bad, n = [], 0
    for t, ts in tasks.items():
        for other in ("reactor", "fixed"):
            if f"{other}@1" not in ts["cells"]:
                continue
            n += 1
            o = _mean(ts, f"{other}@1")
            if graff[t] is None or (o is not None and graff[t] >= o):
                bad.append(f"{t}: {other}")
    evidence = ("fails on " + ", ".join(bad)) if bad else f"holds ({n} comparisons)"
    evidence = evidence if n else "not run in this suite"
    name = "GRAFF better than REACTOR and fixed LR at the user's LR, every task"
    return name, evidence, None if not n else not bad


def tuning_free_targets(summary: dict[str, Any]) -> list[Row]:
    """(target, evidence, met); ``met`` is None where the suite did not run what it needs."""
    tasks = summary["tasks"]
    graff = {t: _mean(ts, "graff@1") for t, ts in tasks.items()}
    return [
        _anchors_target(tasks, graff),
        *_swept_targets(tasks, graff),
        _spread_target(tasks),
        _beats_target(tasks, graff),
    ]


def planner_rows(summary: dict[str, Any]) -> list[tuple[str, ...]]:
    """Per task and variant: shipped planner vs the variant, paired over seeds."""
    rows = []
    for t, ts in summary["tasks"].items():
        for key, label in PLANNER_VARIANTS:
            test = ts["tests"].get(key)
            if test is None:
                continue
            better = test["mean_diff"] < 0 and test["p"] < 0.05
            worse = test["mean_diff"] > 0 and test["p"] < 0.05
            verdict = "shipped better" if better else "shipped worse" if worse else "level"
            rows.append(
                (
                    t,
                    label,
                    _fmt(_mean(ts, "graff@1")),
                    _fmt(_mean(ts, f"{key}@1")),
                    f"{test['mean_diff']:+.4f}",
                    f"{test['p']:.3g}",
                    str(test["n"]),
                    verdict,
                )
            )
    return rows


def targets_markdown(summary: dict[str, Any]) -> str:
    """The targets table and, where the suite ran the planner variants, the planner table."""
    rows = [
        (target, evidence, "—" if met is None else "yes" if met else "**no**")
        for target, evidence, met in tuning_free_targets(summary)
    ]
    lines = ["## Targets (issue 18) on this run", ""]
    lines += markdown_table(("target", "evidence", "met"), rows)
    lines += _planner_lines(summary)
    return "\n".join(lines) + "\n"


def planner_markdown(summary: dict[str, Any]) -> str:
    """The planner table alone (the ``planner`` suite runs no baselines)."""
    return "\n".join(_planner_lines(summary)).lstrip("\n") + "\n"


def _planner_lines(summary: dict[str, Any]) -> list[str]:
    planner = planner_rows(summary)
    if not planner:
        return []
    lines = [
        "",
        "## What the learned planner adds (issue 17), at the user's LR",
        "",
        "Shipped planner (`graff`) vs the variant on the same seeds: medians, the mean paired "
        "difference Δ = shipped − variant (negative: the shipped planner is better) and its "
        "paired t-test; 'level' unless p < 0.05.",
        "",
    ]
    header = ("task", "variant", "shipped", "variant", "mean Δ", "p", "n", "verdict")
    return lines + markdown_table(header, planner)
