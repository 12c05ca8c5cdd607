"""Aggregate runs into results.json, results.md and PNG plots."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.floor import floor_markdown, floor_summary
from benchmarks.markdown import markdown_table
from benchmarks.schedulers import ANCHORS, BASELINES
from benchmarks.stats import paired_t_test, sign_flip_test
from benchmarks.suites import ROBUSTNESS_MULTS

Key = tuple[str, str, float]  # task, scheduler, lr_mult


def _group(runs: list[dict[str, Any]]) -> dict[Key, dict[int, float]]:
    """{(task, scheduler, mult): {seed: final val loss (inf if diverged)}} for runs that ran."""
    out: dict[Key, dict[int, float]] = defaultdict(dict)
    for r in runs:
        if r["status"] == "ok":
            value = math.inf if r["diverged"] else r["final_val_loss"]
            out[(r["task"], r["scheduler"], r["lr_mult"])][r["seed"]] = value
    return out


#: The scheduler every run's wall time is compared with (``run_time``): LambdaLR, no probes.
TIME_REFERENCE = "cosine"


RUN_TIME_NOTE = (
    " Run time: the median over LR multipliers and seeds of a run's wall time (training and the"
    " evaluations) over cosine's at the same LR and seed — what a step budget does not charge"
    " (GRAFF's probes, planner and λ̂ estimates, the cold start included); measured with the"
    " suite's worker processes sharing the CPUs, so a rough figure (the wall-clock suite charges"
    " it)."
)


def run_time_ratios(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """{task: {scheduler: median of (run seconds / cosine's run seconds)}}.

    Each run is paired with cosine's run of the same task, seed and LR multiplier (a tuning-free
    anchor, which takes no LR, with cosine at the user's LR), and the median is over all its
    pairs. Under a step budget every scheduler takes the same number of steps, so the ratio is
    what that budget does not charge: GRAFF's probes, planner and λ̂ estimates (its cold start
    included), an anchor's extra optimizer work. Runs whose wall time was not recorded, or that
    did not finish, are left out.
    """
    seconds = {
        (r["task"], r["scheduler"], r["lr_mult"], r["seed"]): r["seconds"]
        for r in runs
        if r["status"] == "ok" and isinstance(r.get("seconds"), (int, float)) and r["seconds"] > 0
    }
    ratios: dict[tuple[str, str], list[float]] = defaultdict(list)
    for (task, sched, mult, seed), t in seconds.items():
        if sched == TIME_REFERENCE:
            continue
        ref = seconds.get((task, TIME_REFERENCE, 1.0 if sched in ANCHORS else mult, seed))
        if ref:
            ratios[(task, sched)].append(t / ref)
    out: dict[str, dict[str, float]] = defaultdict(dict)
    for (task, sched), values in ratios.items():
        out[task][sched] = float(np.median(values))
    return dict(out)


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values or not all(math.isfinite(v) for v in values):
        return math.inf, math.nan
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-task table rows, best-tuned baselines, significance tests and robustness spreads."""
    groups = _group(runs)
    times = run_time_ratios(runs)
    tasks = sorted({r["task"] for r in runs}, key=[r["task"] for r in runs].index)
    summary: dict[str, Any] = {"tasks": {}, "skipped": {}, "errors": {}}
    for r in runs:
        if r["status"] != "ok":
            bucket = summary["skipped" if r["status"] == "skipped" else "errors"]
            bucket.setdefault(f"{r['task']}/{r['scheduler']}", r["error"])
    for task in tasks:
        cells = {}
        for (t, sched, mult), by_seed in groups.items():
            if t == task:
                mean, std = _mean_std(list(by_seed.values()))
                cells[f"{sched}@{mult:g}"] = {
                    "scheduler": sched,
                    "lr_mult": mult,
                    "mean": mean,
                    "std": std,
                    "n": len(by_seed),
                    "seeds": by_seed,
                }
        summary["tasks"][task] = _task_summary(task, cells)
        summary["tasks"][task]["run_time"] = dict(sorted(times.get(task, {}).items()))
    return summary


def _best(cells: dict[str, Any], scheds: tuple[str, ...] | list[str]) -> dict[str, Any] | None:
    pool = [c for c in cells.values() if c["scheduler"] in scheds and math.isfinite(c["mean"])]
    return min(pool, key=lambda c: c["mean"]) if pool else None


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _task_summary(task: str, cells: dict[str, Any]) -> dict[str, Any]:
    best_per_baseline = {b: _best(cells, [b]) for b in BASELINES}
    best = _best(cells, BASELINES)
    best_anchor = _best(cells, ANCHORS)
    graff = cells.get("graff@1")
    tests = {}
    for other_name, other in (
        ("best_baseline", best),
        ("prior_only", cells.get("prior_only@1")),
        ("best_anchor", best_anchor),
        ("graff_planner_off", cells.get("graff_planner_off@1")),
        ("graff_fresh", cells.get("graff_fresh@1")),
    ):
        if graff and other:
            common = sorted(set(graff["seeds"]) & set(other["seeds"]))
            x = [graff["seeds"][s] for s in common]
            y = [other["seeds"][s] for s in common]
            if all(math.isfinite(v) for v in x + y) and common:
                t = paired_t_test(x, y)
                tests[other_name] = {
                    "against": f"{other['scheduler']}@{other['lr_mult']:g}",
                    "n": len(common),
                    **t,
                    "sign_flip_p": sign_flip_test(x, y),
                }
    robustness = {}
    for sched in sorted({c["scheduler"] for c in cells.values()}):
        means = {m: cells.get(f"{sched}@{m:g}", {}).get("mean") for m in ROBUSTNESS_MULTS}
        if all(v is not None for v in means.values()):
            vals = list(means.values())
            spread = max(vals) - min(vals) if all(math.isfinite(v) for v in vals) else math.inf
            robustness[sched] = {
                "means": {f"{m:g}": _finite(v) for m, v in means.items()},
                "spread": _finite(spread),
            }
    for sched in ANCHORS:  # anchors take no LR: there is no spread to measure
        if f"{sched}@1" in cells:
            robustness[sched] = {
                "means": {"1": _finite(cells[f"{sched}@1"]["mean"])},
                "spread": None,
                "no_lr_taken": True,
            }
    return {
        "cells": {
            k: {
                **v,
                "mean": _finite(v["mean"]),
                "std": _finite(v["std"]),
                "seeds": {str(s): _finite(x) for s, x in v["seeds"].items()},
            }
            for k, v in cells.items()
        },
        "best_baseline": None if best is None else f"{best['scheduler']}@{best['lr_mult']:g}",
        "best_anchor": None if best_anchor is None else best_anchor["scheduler"],
        "best_per_baseline": {
            b: None if c is None else f"{c['scheduler']}@{c['lr_mult']:g}"
            for b, c in best_per_baseline.items()
        },
        "tests": tests,
        "robustness": robustness,
    }


# ----------------------------------------------------------------------------- markdown
def _fmt(cell: dict[str, Any] | None) -> str:
    if cell is None:
        return "not run"
    if cell["mean"] is None:
        return "diverged"
    return f"{cell['mean']:.4f} ± {cell['std'] or 0.0:.4f}"


def _rel(cell: dict[str, Any] | None, ref: dict[str, Any] | None) -> str:
    if not cell or not ref or cell["mean"] is None or ref["mean"] is None:
        return ""
    return f"{100.0 * (cell['mean'] - ref['mean']) / ref['mean']:+.1f} %"


def _resumed(meta: dict[str, Any]) -> str:
    """The wall time's caveat when part of the runs came from an earlier, interrupted call."""
    n = meta.get("resumed_runs")
    return f" for the last call ({n} runs finished earlier at the same commit, kept)" if n else ""


def _task_table(
    ts: dict[str, Any], ref: dict[str, Any] | None
) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    """Header and rows of a task's table: every scheduler at the user's LR, then the best tuned
    LR of each baseline; the run-time column where the suite ran cosine to compare with."""
    cells, run_time = ts["cells"], ts.get("run_time", {})
    order = [k for k in cells if k.rsplit("@", 1)[1] == "1"]
    order.sort(
        key=lambda k: (cells[k]["scheduler"] in ANCHORS, cells[k]["scheduler"] in BASELINES, k)
    )

    def time_of(sched: str) -> str:
        if sched == TIME_REFERENCE:
            return "1 (reference)"
        return f"{run_time[sched]:.2f}" if sched in run_time else ""

    rows = []
    for k in order:
        sched = cells[k]["scheduler"]
        label, mult = ("no LR taken", "—") if sched in ANCHORS else ("default LR", "1")
        rows.append(
            (f"{sched} ({label})", mult, _fmt(cells[k]), _rel(cells[k], ref), time_of(sched))
        )
    for b, k in ts["best_per_baseline"].items():
        if k:
            mult = f"{cells[k]['lr_mult']:g}"
            rows.append(
                (f"{b} (best tuned)", mult, _fmt(cells[k]), _rel(cells[k], ref), time_of(b))
            )
    header = ("scheduler", "LR ×", "val loss", "Δ vs best tuned", "run time (× cosine)")
    if not run_time:  # no cosine runs to compare with (e.g. the planner suite)
        return header[:-1], [row[:-1] for row in rows]
    return header, rows


def markdown(meta: dict[str, Any], summary: dict[str, Any]) -> str:
    lines = [
        f"# graff benchmark — `{meta['suite']}` suite",
        "",
        f"Command: `{meta['command']}`  ",
        f"Commit: `{meta['git_commit']}` (dirty: {meta['git_dirty']}) · date {meta['date']} · "
        f"{meta['machine']['cpu_count']} CPUs ({meta['machine'].get('cpu', 'CPU not recorded')}), "
        f"torch {meta['machine']['torch']}, "
        f"{meta['wall_seconds'] / 60:.1f} min wall{_resumed(meta)}.",
        "",
        "Final held-out validation loss (lower is better), mean ± std over seeds, same step budget "
        "for every scheduler; base LR = the task's default LR (1e-3, AdamW's default; 0.05 for the "
        "SGD task) × multiplier. Tuning-free anchors take no LR ('no LR taken'). Δ is relative to "
        "the best tuned baseline. 'diverged' = a non-finite loss in at least one seed."
        + (RUN_TIME_NOTE if any(ts.get("run_time") for ts in summary["tasks"].values()) else ""),
        "",
    ]
    for task, ts in summary["tasks"].items():
        cells = ts["cells"]
        ref = cells.get(ts["best_baseline"]) if ts["best_baseline"] else None
        lines += [f"## {task}", ""]
        lines += markdown_table(*_task_table(ts, ref))
        lines.append("")
        for name, t in ts["tests"].items():
            lines.append(
                f"- GRAFF vs {name} (`{t['against']}`), n = {t['n']} paired seeds: mean diff "
                f"{t['mean_diff']:+.4f}, paired t p = {t['p']:.3g}, sign-flip p = "
                f"{t['sign_flip_p']:.3g}."
            )
        if ts["robustness"]:
            lines += [
                "",
                "Robustness to the base LR (mean final val loss at LR × 0.1 / 1 / 10; "
                "spread = max − min):",
                "",
            ]
            rob = sorted(
                ts["robustness"].items(),
                key=lambda kv: (
                    bool(kv[1].get("no_lr_taken")),
                    math.inf if kv[1]["spread"] is None else kv[1]["spread"],
                ),
            )
            rows = []
            for sched, r in rob:
                if r.get("no_lr_taken"):
                    v = r["means"]["1"]
                    rows.append(
                        (sched, "—", "diverged" if v is None else f"{v:.4f}", "—", "no LR taken")
                    )
                    continue
                vals = [("diverged" if v is None else f"{v:.4f}") for v in r["means"].values()]
                spread = "∞ (diverged)" if r["spread"] is None else f"{r['spread']:.4f}"
                rows.append((sched, *vals, spread))
            lines += markdown_table(("scheduler", "×0.1", "×1", "×10", "spread"), rows)
        lines += ["", f"![{task} loss](./{task}_loss.png) ![{task} LR](./{task}_lr.png)", ""]
    if summary["skipped"] or summary["errors"]:
        lines += ["## Not run", ""]
        for k, v in {**summary["skipped"], **summary["errors"]}.items():
            lines.append(f"- `{k}`: {v.splitlines()[0][:200]}")
        lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plots
def plots(runs: list[dict[str, Any]], summary: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for task, ts in summary["tasks"].items():
        shown = ["graff@1", "prior_only@1", "reactor@1"]
        shown += [k for k in ts["best_per_baseline"].values() if k]
        shown += [f"{a}@1" for a in ANCHORS if f"{a}@1" in ts["cells"]]
        fig, (ax_t, ax_v) = plt.subplots(1, 2, figsize=(12, 4.5))
        fig_lr, ax_lr = plt.subplots(figsize=(9, 4.5))
        starts: list[float] = []  # first train losses: spikes above them are cut off
        for index, key in enumerate(dict.fromkeys(shown)):
            sched, mult = key.rsplit("@", 1)
            style = _style(sched, 2 * index)
            sel = [
                r
                for r in runs
                if r["task"] == task
                and r["scheduler"] == sched
                and f"{r['lr_mult']:g}" == mult
                and r["status"] == "ok"
            ]
            if not sel:
                continue
            label = f"{sched} (LR×{mult})"
            first = _mean_curve(ax_t, [r["train_curve"] for r in sel], label, smooth=True, **style)
            if first is not None and np.isfinite(first):
                starts.append(first)
            _mean_curve(ax_v, [r["val_curve"] for r in sel], label, **style)
            for i, run in enumerate(sorted(sel, key=lambda r: r["seed"])):
                # every seed: a cut or a back-off on one seed is not hidden behind seed 0's line
                lr = np.array(run["lr_curve"], dtype=float)
                faint = {"alpha": 0.35, "linewidth": 0.8} if i else {}
                ax_lr.plot(lr[:, 0], lr[:, 1], label=None if i else label, **(style | faint))
        for ax, title in (
            (ax_t, "train loss (EMA, mean over seeds)"),
            (ax_v, "held-out loss (mean over seeds)"),
        ):
            ax.set(title=f"{task}: {title}", xlabel="step", ylabel="loss")
            ax.legend(fontsize=7)
        if starts:
            ax_t.set_ylim(top=1.15 * max(starts))
        ax_lr.set(
            title=f"{task}: LR (seed 0; other seeds faint)",
            xlabel="step",
            ylabel="LR",
            yscale="log",
        )
        ax_lr.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        for f, name in ((fig, f"{task}_loss.png"), (fig_lr, f"{task}_lr.png")):
            f.tight_layout()
            f.savefig(out / name, dpi=90)
            plt.close(f)
            written.append(out / name)
    return written


def _style(sched: str, index: int) -> dict[str, Any]:
    """GRAFF thick and black; tuning-free anchors dashed; everyone its own colour (tab20, so
    eleven lines never share one)."""
    import matplotlib

    if sched == "graff":
        return {"color": "black", "linewidth": 2.2, "zorder": 5}
    color = matplotlib.colormaps["tab20"](index % 20)
    return {"color": color, "linestyle": "--" if sched in ANCHORS else "-", "linewidth": 1.2}


def _mean_curve(
    ax: Any, curves: list[list[list[float]]], label: str, smooth: bool = False, **style: Any
) -> float | None:
    """Plot the mean curve; returns its first value (None if empty)."""
    n = min(len(c) for c in curves)
    if n == 0:
        return None
    arr = np.array([[np.nan if v is None else v for _, v in c[:n]] for c in curves], dtype=float)
    steps = [s for s, _ in curves[0][:n]]
    y = np.nanmean(arr, axis=0)
    if smooth:
        ema, acc = [], y[0]
        for v in y:
            acc = 0.8 * acc + 0.2 * v
            ema.append(acc)
        y = np.array(ema)
    ax.plot(steps, y, label=label, **style)
    return float(y[0])


def write_all(runs: list[dict[str, Any]], meta: dict[str, Any], out: Path) -> dict[str, Any]:
    summary = summarize(runs)
    summary["floor"] = floor_summary(summary)
    payload = sanitize({"meta": meta, "summary": summary, "runs": runs})
    (out / "results.json").write_text(dumps_compact(payload))
    ovh_path = out.parent / "overhead" / "overhead.json"
    overhead = json.loads(ovh_path.read_text()) if ovh_path.is_file() else None
    text = markdown(meta, summary)
    head, sep, rest = text.partition("\n## ")
    floor = floor_markdown(summary["floor"])
    floor = "\n" + floor if floor else ""
    has_baselines = any(
        cell["scheduler"] in BASELINES
        for ts in summary["tasks"].values()
        for cell in ts["cells"].values()
    )  # issue 5's targets compare against baselines: not shown for the floor/ablation suites
    has_anchors = any(
        cell["scheduler"] in ANCHORS
        for ts in summary["tasks"].values()
        for cell in ts["cells"].values()
    )  # the tuning-free suites (issue 18) have their own targets
    if has_anchors and has_baselines:
        from benchmarks.targets import targets_markdown as tuning_free_markdown

        issue5 = "\n" + tuning_free_markdown(summary)
    elif has_baselines:
        issue5 = "\n" + targets_markdown(summary, overhead)
    else:  # the planner suite (issue 17): the paired planner table alone
        from benchmarks.targets import planner_markdown

        issue5 = "\n" + planner_markdown(summary)
    (out / "results.md").write_text(head + issue5 + floor + sep + rest)
    plots(runs, summary, out)
    return payload


def dumps_compact(payload: dict[str, Any]) -> str:
    """Strict JSON kept small: ``meta`` indented (read by people), every other key on one line,
    and a ``runs`` list with one compact line per run (no pretty-printed per-step arrays).

    The result is ordinary JSON (``json.loads`` reads it); non-finite floats must already be
    replaced (``sanitize``).
    """

    def compact(value: Any) -> str:
        return json.dumps(value, separators=(",", ":"), allow_nan=False)

    parts = []
    for key, value in payload.items():
        if key == "meta":
            text = json.dumps(value, indent=1, allow_nan=False)
        elif key == "runs" and isinstance(value, list):
            text = "[\n" + ",\n".join(compact(run) for run in value) + "\n]"
        else:
            text = compact(value)
        parts.append(f"{json.dumps(key)}: {text}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


def sanitize(obj: Any) -> Any:
    """Replace non-finite floats by ``None`` so the JSON is strict."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): sanitize(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [sanitize(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------- targets
def _mean(ts: dict[str, Any], key: str | None) -> float | None:
    cell = ts["cells"].get(key) if key else None
    return None if cell is None else cell["mean"]


def _lt(a: float | None, b: float | None, strict: bool = False) -> bool:
    """a better than (or, unless strict, equal to) b; a diverged (None) run is never better."""
    if a is None:
        return False
    if b is None:
        return True
    return a < b if strict else a <= b


def targets(summary: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """The issue's targets, evaluated on this run: (target, evidence, met)."""
    rows = []
    tasks = summary["tasks"]
    rel = {}
    for task, ts in tasks.items():
        g, b = _mean(ts, "graff@1"), _mean(ts, ts["best_baseline"])
        rel[task] = None if g is None or b is None else (g - b) / b
    wins = sum(1 for v in rel.values() if v is not None and v <= 0)
    evidence = ", ".join(
        f"{t} {'n/a' if v is None else f'{100 * v:+.1f} %'}" for t, v in rel.items()
    )
    rows.append((f"GRAFF ≤ best tuned baseline on ≥ 3 of {len(tasks)} tasks", evidence, wins >= 3))
    within = all(v is not None and v <= 0.02 for v in rel.values())
    rows.append(("GRAFF within 2 % of the best tuned baseline on every task", evidence, within))
    for other, label in (
        ("prior_only", "its budget prior alone"),
        ("reactor", "REACTOR"),
        ("fixed", "fixed LR"),
    ):
        rows.append(_compare(tasks, other, label))
    rows.append(_spread_target(tasks))
    return rows


def _compare(tasks: dict[str, Any], other: str, label: str) -> tuple[str, str, bool]:
    mults = ("0.1", "1", "10") if other == "prior_only" else ("1",)
    rule = "never worse than" if other == "prior_only" else "better than"
    at = "LR × 0.1/1/10" if other == "prior_only" else "the default LR"
    name = f"GRAFF {rule} {label} at {at}, every task"
    pairs = [
        (t, ts, m)
        for t, ts in tasks.items()
        for m in mults
        if f"graff@{m}" in ts["cells"] and f"{other}@{m}" in ts["cells"]
    ]
    if not pairs:
        return name, "not run", False
    strict = other != "prior_only"
    bad = [
        f"{t}@{m}"
        for t, ts, m in pairs
        if not _lt(_mean(ts, f"graff@{m}"), _mean(ts, f"{other}@{m}"), strict=strict)
    ]
    evidence = f"fails on {', '.join(bad)}" if bad else f"holds ({len(pairs)} comparisons)"
    return name, evidence, not bad


def _spread_target(tasks: dict[str, Any]) -> tuple[str, str, bool]:
    name = "GRAFF spread across LR × {0.1, 1, 10} smaller than every baseline's"
    bad, compared = [], 0
    for task, ts in tasks.items():
        rob = ts["robustness"]
        if "graff" not in rob:
            continue
        compared += 1
        for b in BASELINES:
            if b in rob and not _lt(rob["graff"]["spread"], rob[b]["spread"], strict=True):
                bad.append(f"{task}: {b}")
    if not compared:
        return name, "not run", False
    evidence = f"not smaller than {', '.join(bad)}" if bad else "holds"
    return name, evidence, not bad


def targets_markdown(summary: dict[str, Any], overhead: dict[str, Any] | None) -> str:
    rows = [
        (target, evidence, "—" if evidence == "not run" else "yes" if met else "**no**")
        for target, evidence, met in targets(summary)
    ]
    if overhead and "graff" in overhead.get("results", {}):
        pct = overhead["results"]["graff"]["overhead_percent"]
        rows.append(
            (
                "GRAFF overhead ≤ 1 % per step on the LoRA task",
                f"{pct:+.1f} % (benchmarks/results/overhead)",
                "yes" if pct <= 1.0 else "**no**",
            )
        )
    lines = ["## Targets (issue 5) on this run", ""]
    lines += markdown_table(("target", "evidence", "met"), rows)
    return "\n".join(lines) + "\n"
