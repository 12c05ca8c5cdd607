"""How much of "λ̂ on better / worse than λ̂ off" is chaos? The held-out sweep's butterfly control.

``python -m benchmarks butterfly --base RUNS --nudged RUNS --out DIR`` reads two held-out sweeps'
``runs.jsonl`` (:mod:`benchmarks.heldout`): the default sweep and the same sweep run with
``heldout --lr-jitter 1.01``, every LR × 1.01 — a change no user would notice and no rule should
care about. A cell's *butterfly spread* is the larger of :math:`|\\log(\\text{nudged}/\\text{base})|`
over its λ̂-on and λ̂-off runs: how far its final loss moves when nothing of substance changed
(a 200-step run of a small network is chaotic: a 1 % change of the LR moves the final loss of
about half the cells by more than 1 %).

The verdicts the sweep's summary gives at a fixed 1 % of the final loss are re-read against that
spread: λ̂ on is *worse beyond its spread* when :math:`\\log(\\text{on}/\\text{off}) > \\max(1\\,\\%,
\\text{spread})`, better likewise; *worse in both sweeps* when it is worse by more than 1 % in the
default sweep and in the nudged one. ``DIR/butterfly.md`` has the counts per optimizer and every
cell worse beyond its spread; ``DIR/butterfly.json`` the same as data.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from pathlib import Path
from typing import Any

from benchmarks.heldout import TIE, pairs

CELL = ("optimizer", "family", "arch", "factor", "seed")


def _finals(rows: list[dict[str, Any]]) -> dict[tuple[Any, ...], float]:
    """Final loss of every finished run, by (cell, λ̂ on)."""
    return {(*(r[k] for k in CELL), r["lam"]): r["final"] for r in rows if r.get("status") == "ok"}


def _log(a: float, b: float) -> float:
    """``log(a / b)``; ``inf`` when either is not a finite positive loss (a diverged run)."""
    return math.log(a / b) if all(math.isfinite(v) and v > 0 for v in (a, b)) else math.inf


def butterfly(base: list[dict[str, Any]], nudged: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per cell that finished λ̂ on and off in both sweeps: its log ratio on/off in
    each sweep and its butterfly spread."""
    nudged_finals = _finals(nudged)
    nudged_ratio = {tuple(p[k] for k in CELL): p["log_ratio"] for p in pairs(nudged)}
    out = []
    for p in pairs(base):
        cell = tuple(p[k] for k in CELL)
        on, off = nudged_finals.get((*cell, True)), nudged_finals.get((*cell, False))
        if on is None or off is None or cell not in nudged_ratio:
            continue
        spread = max(abs(_log(on, p["on"])), abs(_log(off, p["off"])))
        out.append({**dict(zip(CELL, cell, strict=True)), "log_ratio": p["log_ratio"],
                    "nudged_log_ratio": nudged_ratio[cell], "spread": spread})  # fmt: skip
    return out


def counts(cells: list[dict[str, Any]]) -> dict[str, int]:
    """The verdicts of :func:`butterfly`'s cells (module docstring)."""
    beyond = [max(TIE, c["spread"]) for c in cells]
    return {
        "cells": len(cells),
        "spread_above_1pct": sum(c["spread"] > TIE for c in cells),
        "better_1pct": sum(c["log_ratio"] < -TIE for c in cells),
        "worse_1pct": sum(c["log_ratio"] > TIE for c in cells),
        "better_beyond_spread": sum(
            c["log_ratio"] < -b for c, b in zip(cells, beyond, strict=True)
        ),
        "worse_beyond_spread": sum(c["log_ratio"] > b for c, b in zip(cells, beyond, strict=True)),
        "worse_in_both_sweeps": sum(
            c["log_ratio"] > TIE and c["nudged_log_ratio"] > TIE for c in cells
        ),
    }


def markdown(result: dict[str, Any]) -> str:
    """``butterfly.md``: the command, the counts per optimizer and the cells worse beyond their
    spread."""
    lines = [
        "# λ̂ on vs off, read against each cell's butterfly spread",
        "",
        f"Command: `{result['command']}`. Base sweep at {result['base_commit']}; nudged sweep "
        f"(every LR × {result['jitter']:g}) at {result['nudged_commit']}. A cell's spread is "
        "how far its final loss moved (larger of λ̂ on and off, in log) between the two sweeps.",
        "",
        "| optimizer | cells | spread > 1 % | λ̂ on better / worse at 1 % | better / worse beyond "
        "the spread | worse in both sweeps |",
        "|---|---|---|---|---|---|",
    ]
    for opt, c in result["counts"].items():
        lines.append(
            f"| {opt} | {c['cells']} | {c['spread_above_1pct']} | {c['better_1pct']} / "
            f"{c['worse_1pct']} | {c['better_beyond_spread']} / {c['worse_beyond_spread']} | "
            f"{c['worse_in_both_sweeps']} |"
        )
    lines += ["", "Cells where λ̂ on is worse beyond the spread (log on/off; spread):", ""]
    for c in result["worse_beyond_spread"]:
        lines.append(
            f"- {c['optimizer']} {c['family']}/{c['arch']} ×{c['factor']:g} seed {c['seed']}: "
            f"{c['log_ratio']:+.3f}; {c['spread']:.3f}"
        )
    return "\n".join(lines) + "\n"


def _commit(rows: list[dict[str, Any]]) -> str:
    """The commit(s) a sweep's rows were run at (their resume key; "?" for uncommitted code)."""
    keys = sorted({str(r.get("resume_key") or "?")[:7] for r in rows})
    return ", ".join(keys) if keys else "?"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks butterfly", description=__doc__)
    parser.add_argument("--base", type=Path, required=True, help="the default sweep's runs.jsonl")
    parser.add_argument(
        "--nudged", type=Path, required=True, help="runs.jsonl of `heldout --lr-jitter ...`"
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    base, nudged = (
        [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
        for p in (args.base, args.nudged)
    )
    jitters = {float(r.get("lr_jitter", 1.0)) for r in nudged}
    if len(jitters) != 1 or jitters == {1.0}:
        parser.error(f"--nudged must be one sweep made with --lr-jitter != 1 (found {jitters})")
    cells = butterfly([r for r in base if "lr_jitter" not in r], nudged)
    by_opt: dict[str, list[dict[str, Any]]] = {}
    for c in cells:
        by_opt.setdefault(c["optimizer"], []).append(c)
    argv_ = sys.argv[1:] if argv is None else argv
    result = {
        "command": shlex.join(["python", "-m", "benchmarks", "butterfly", *argv_]),
        "base_commit": _commit(base),
        "nudged_commit": _commit(nudged),
        "jitter": jitters.pop(),
        "counts": {opt: counts(cs) for opt, cs in sorted(by_opt.items())},
        "worse_beyond_spread": [
            {k: (round(v, 4) if isinstance(v, float) else v) for k, v in c.items()}
            for c in sorted(cells, key=lambda c: -c["log_ratio"])
            if c["log_ratio"] > max(TIE, c["spread"])
        ],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "butterfly.json").write_text(json.dumps(result, separators=(",", ":")) + "\n")
    (args.out / "butterfly.md").write_text(markdown(result))
    print(markdown(result))
    return result
