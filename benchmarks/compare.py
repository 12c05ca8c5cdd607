"""Paired comparison of one scheduler between two runs of the same suites.

``python -m benchmarks compare --base A/results.json [...] --other B/results.json [...]
--out DIR`` pairs every (task, LR multiplier, seed) of ``--scheduler`` (default ``graff``) found
in both, and writes ``DIR/compare.json`` (compact: every pair, the commits, the command) and
``DIR/compare.md``: per cell the log ratio ``log(L_other / L_base)`` of the final validation
losses (positive: ``other`` is worse), and over all pairs the count of each sign, the mean and a
Wilcoxon signed-rank test (``scipy.stats.wilcoxon``). It answers questions such as "what does
the learned planner add at LRs other than the user's?": run a suite once with the defaults and
once with ``--graff-kwargs '{"planner": false}' --out ...``, then compare the two.

``--heldout`` pairs two held-out sweeps instead (``python -m benchmarks heldout``: give their
``runs.jsonl``): GRAFF's λ̂-on runs (``--lam off``: the λ̂-off ones) cell for cell, e.g. a rule
on a branch against the rule on ``main``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any

TIE = 0.01  # |log ratio| below this is level (1 %), as in the held-out sweep's summary


def pairs(base: dict[str, Any], other: dict[str, Any], scheduler: str) -> list[dict[str, Any]]:
    """Every (task, LR multiplier, seed) of ``scheduler`` with a finite loss in both summaries."""
    out = []
    for task, ts in base["summary"]["tasks"].items():
        cells = other["summary"]["tasks"].get(task, {}).get("cells", {})
        for key, cell in ts["cells"].items():
            if cell["scheduler"] != scheduler or key not in cells:
                continue
            for seed, a in cell["seeds"].items():
                b = cells[key]["seeds"].get(seed)
                if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)):
                    continue
                if a > 0 and b > 0:
                    out.append(
                        {
                            "task": task,
                            "lr_mult": cell["lr_mult"],
                            "seed": int(seed),
                            "base": a,
                            "other": b,
                            "log_ratio": math.log(b / a),
                        }
                    )
    return out


def heldout_pairs(
    base: list[dict[str, Any]], other: list[dict[str, Any]], lam: bool = True
) -> list[dict[str, Any]]:
    """Every held-out cell (family, architecture, optimizer, LR factor, seed) with λ̂ ``lam``
    that finished with a finite, positive loss in both sweeps' ``runs.jsonl`` rows."""

    def finals(rows: list[dict[str, Any]]) -> dict[tuple[Any, ...], float]:
        names = ("optimizer", "family", "arch", "factor", "seed")
        return {
            tuple(r[k] for k in names): r["final"]
            for r in rows
            if r.get("status") == "ok" and r["lam"] is lam
        }

    a, b = finals(base), finals(other)
    out = []
    for key, x in a.items():
        y = b.get(key)
        if y is not None and all(math.isfinite(v) and v > 0 for v in (x, y)):
            optimizer, family, arch, factor, seed = key
            out.append({"task": f"{optimizer} {family}/{arch}", "lr_mult": factor, "seed": seed,
                        "base": x, "other": y, "log_ratio": math.log(y / x)})  # fmt: skip
    return out


def _sweep_commit(path: Path) -> str:
    """The commit in the ``summary.md`` next to a held-out sweep's ``runs.jsonl`` ("?" if none)."""
    summary = path.with_name("summary.md")
    text = summary.read_text() if summary.is_file() else ""
    found = re.search(r"at commit `([0-9a-f]+)`( \(dirty\))?", text)
    return (found.group(1)[:7] + (" (dirty)" if found.group(2) else "")) if found else "?"


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Signs, mean and median log ratio, and the Wilcoxon signed-rank p over all pairs."""
    from scipy.stats import wilcoxon

    ratios = [r["log_ratio"] for r in rows]
    nonzero = [x for x in ratios if x != 0.0]
    return {
        "pairs": len(ratios),
        "other_worse": sum(x > 0 for x in ratios),
        "other_better": sum(x < 0 for x in ratios),
        "mean_log_ratio": statistics.fmean(ratios) if ratios else None,
        "median_log_ratio": statistics.median(ratios) if ratios else None,
        "wilcoxon_p": float(wilcoxon(nonzero).pvalue) if len(nonzero) >= 2 else None,
        "other_worse_1pct": sum(x > TIE for x in ratios),
        "other_better_1pct": sum(x < -TIE for x in ratios),
    }


def markdown(result: dict[str, Any]) -> str:
    s = result["summary"]
    lines = [
        f"# `{result['scheduler']}`: {result['other_label']} vs {result['base_label']}",
        "",
        f"Command: `{result['command']}`. Base runs at {', '.join(result['base_commits'])}; "
        f"other runs at {', '.join(result['other_commits'])}. Positive log ratio: "
        f"{result['other_label']} ends worse.",
        "",
        f"**{s['other_worse']} of {s['pairs']} pairs worse, {s['other_better']} better; mean log "
        f"ratio {s['mean_log_ratio']:+.4f}, median {s['median_log_ratio']:+.4f}, Wilcoxon "
        f"p = {_p(s['wilcoxon_p'])}.** By more than 1 %: {s['other_worse_1pct']} worse, "
        f"{s['other_better_1pct']} better.",
        "",
        "| task | LR × | base (per seed) | other (per seed) | log ratio (per seed) |",
        "|---|---|---|---|---|",
    ]
    cells: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in result["pairs"]:
        cells.setdefault((r["task"], r["lr_mult"]), []).append(r)
    for (task, mult), rows in cells.items():
        rows.sort(key=lambda r: r["seed"])
        base, other, ratio = (
            " / ".join(f.format(r[key]) for r in rows)
            for key, f in (("base", "{:.4f}"), ("other", "{:.4f}"), ("log_ratio", "{:+.3f}"))
        )
        lines.append(f"| {task} | {mult:g} | {base} | {other} | {ratio} |")
    return "\n".join(lines) + "\n"


def _p(p: float | None) -> str:
    return "n/a" if p is None else f"{p:.2g}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks compare", description=__doc__)
    parser.add_argument("--base", type=Path, nargs="+", required=True)
    parser.add_argument("--other", type=Path, nargs="+", required=True)
    parser.add_argument("--base-label", default="base")
    parser.add_argument("--other-label", default="other")
    parser.add_argument("--scheduler", default="graff")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--heldout", action="store_true", help="--base/--other are held-out sweeps' runs.jsonl"
    )
    parser.add_argument("--lam", choices=("on", "off"), default="on", help="with --heldout")
    parser.add_argument(
        "--optimizer", choices=("adamw", "sgd"), help="with --heldout: only its cells"
    )
    args = parser.parse_args(argv)
    if len(args.base) != len(args.other):
        parser.error("give one --other results.json per --base one, in the same order")
    rows: list[dict[str, Any]] = []
    base_commits, other_commits = [], []
    for a, b in zip(args.base, args.other, strict=True):
        if args.heldout:
            base_rows, other_rows = (
                [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
                for p in (a, b)
            )
            base_commits.append(_sweep_commit(a))
            other_commits.append(_sweep_commit(b))
            rows += [
                r
                for r in heldout_pairs(base_rows, other_rows, lam=args.lam == "on")
                if args.optimizer is None or r["task"].startswith(args.optimizer + " ")
            ]
            continue
        base, other = json.loads(a.read_text()), json.loads(b.read_text())
        base_commits.append(base["meta"]["git_commit"][:7])
        other_commits.append(other["meta"]["git_commit"][:7])
        rows += pairs(base, other, args.scheduler)
    argv_ = sys.argv[1:] if argv is None else argv
    result = {
        "command": shlex.join(["python", "-m", "benchmarks", "compare", *argv_]),
        "scheduler": f"graff, λ̂ {args.lam}" if args.heldout else args.scheduler,
        "base_label": args.base_label,
        "other_label": args.other_label,
        "base_commits": sorted(set(base_commits)),
        "other_commits": sorted(set(other_commits)),
        "summary": summarise(rows),
        "pairs": [
            {k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()} for r in rows
        ],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compare.json").write_text(json.dumps(result, separators=(",", ":")) + "\n")
    (args.out / "compare.md").write_text(markdown(result))
    print(markdown(result).split("\n\n")[2])
    return 0
