"""Issue 3's quality floor: GRAFF against its own budget prior alone, per task and LR multiplier.

GRAFF's default must be at least as good as ``prior_only`` at the same base LR at every user LR
1e-3 × {0.1, 1, 10} (compared by the *median* over seeds, per-seed values reported), and its
result must move less than the prior's over those LRs (spread = max − min of the medians).
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from benchmarks.markdown import markdown_table
from benchmarks.suites import ROBUSTNESS_MULTS


def _per_seed(cell: dict[str, Any]) -> list[float]:
    """Final losses in seed order; a diverged seed (None in the summary) is +inf."""
    seeds = cell["seeds"]
    return [math.inf if seeds[k] is None else seeds[k] for k in sorted(seeds, key=int)]


def _median(cell: dict[str, Any] | None) -> float | None:
    """Median over seeds, None if it is a diverged run."""
    if not cell or not cell["seeds"]:
        return None
    value = statistics.median(_per_seed(cell))
    return value if math.isfinite(value) else None


def floor_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """``{task: {"rows": [...], "spread": {...}}}`` for tasks with graff and prior_only runs."""
    out: dict[str, Any] = {}
    for task, ts in summary["tasks"].items():
        rows = []
        for mult in ROBUSTNESS_MULTS:
            g, p = ts["cells"].get(f"graff@{mult:g}"), ts["cells"].get(f"prior_only@{mult:g}")
            if g is None or p is None:
                continue
            gm, pm = _median(g), _median(p)
            rows.append(
                {
                    "lr_mult": mult,
                    "graff_median": gm,
                    "prior_median": pm,
                    "graff_seeds": _per_seed(g),
                    "prior_seeds": _per_seed(p),
                    "holds": gm is not None and (pm is None or gm <= pm),
                }
            )
        if not rows:
            continue
        spread = {}
        if len(rows) == len(ROBUSTNESS_MULTS):
            gms = [r["graff_median"] for r in rows]
            pms = [r["prior_median"] for r in rows]
            g_spread = max(gms) - min(gms) if None not in gms else math.inf
            p_spread = max(pms) - min(pms) if None not in pms else math.inf
            spread = {"graff": g_spread, "prior": p_spread, "holds": g_spread < p_spread}
        out[task] = {"rows": rows, "spread": spread}
    return out


def floor_markdown(floor: dict[str, Any]) -> str:
    """The floor table (median over seeds; per-seed values in brackets)."""
    if not floor:
        return ""
    lines = [
        "## Quality floor (issue 3): GRAFF vs its prior alone",
        "",
        "Median final held-out loss over seeds (per-seed values in seed order 0, 1, 2);"
        " the floor holds where GRAFF's median ≤ the prior's at the same base LR.",
        "",
    ]

    def fmt(x: float | None) -> str:
        return "diverged" if x is None else f"{x:.4f}"

    def seeds(values: list[float]) -> str:
        return ", ".join(fmt(v if math.isfinite(v) else None) for v in values)

    rows = [
        (
            task,
            f"{r['lr_mult']:g}",
            fmt(r["graff_median"]),
            fmt(r["prior_median"]),
            "holds" if r["holds"] else "**fails**",
            seeds(r["graff_seeds"]),
            seeds(r["prior_seeds"]),
        )
        for task, entry in floor.items()
        for r in entry["rows"]
    ]
    lines += markdown_table(
        (
            "task",
            "LR ×",
            "GRAFF median",
            "prior_only median",
            "floor",
            "GRAFF per seed",
            "prior per seed",
        ),
        rows,
    )
    spreads = [
        (task, f"{s['graff']:.4f}", f"{s['prior']:.4f}", "yes" if s["holds"] else "**no**")
        for task, entry in floor.items()
        if (s := entry["spread"])
    ]
    lines += [
        "",
        *markdown_table(("task", "GRAFF spread", "prior_only spread", "smaller"), spreads),
    ]
    return "\n".join(lines) + "\n"
