"""Aggregate GSM8K runs: per-run figures, comparison JSON and figures, a significance test.

Usage::

    python examples/gsm8k/evaluate.py --results-dir DIR [--run-ids ID ...]

Reads ``{results_dir}/{run_id}/metrics.json`` (written by ``train.py``), writes per-run figures
to ``{results_dir}/{run_id}/`` and ``{results_dir}/comparison/aggregated_metrics.json`` plus
comparison figures (PDF and PNG). Run ids containing ``"proposed"`` are the proposed method;
ids containing ``"comparative"`` or ``"baseline"`` are baselines. Runs of one configuration with
different seeds share a ``group``; the best group of each side is compared, with a Welch t-test
and an exact permutation test across seeds when both sides have at least two seeds.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

MINIMIZE = {"energy_joules", "budget_used_seconds", "scheduler_seconds", "eval_loss_at_budget"}
"""Metrics where smaller is better: their gap has the sign reversed."""
SCALAR_METRICS = (
    "em_at_budget",
    "em_at_30min",
    "em_at_60min",
    "auc_em_time_normalized",
    "eval_loss_at_budget",
    "energy_joules",
    "guard_activations",
    "steps",
    "budget_used_seconds",
    "scheduler_seconds",
)


def load_runs(results_dir: Path, run_ids: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """``{run_id: metrics}`` for every run folder with a ``metrics.json``.

    Raises:
        FileNotFoundError: if a requested run has no metrics, or no run is found at all.
    """
    if run_ids:
        paths = [results_dir / r / "metrics.json" for r in run_ids]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"no metrics.json for: {missing}; run train.py first.")
    else:
        paths = sorted(results_dir.glob("*/metrics.json"))
    runs = {p.parent.name: json.loads(p.read_text()) for p in paths}
    if not runs:
        raise FileNotFoundError(f"no */metrics.json under {results_dir}; run train.py first.")
    return runs


def role(run_id: str) -> str | None:
    """``"proposed"``, ``"baseline"`` (comparative or baseline runs) or ``None``."""
    if "proposed" in run_id:
        return "proposed"
    if "comparative" in run_id or "baseline" in run_id:
        return "baseline"
    return None


def primary_metric(runs: dict[str, dict[str, Any]]) -> str:
    """``em_at_30min`` if any run has it (the seed's primary metric), else ``em_at_budget``."""
    if any(m.get("em_at_30min") is not None for m in runs.values()):
        return "em_at_30min"
    return "em_at_budget"


def metric_table(runs: dict[str, dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """``{metric: {run_id: value}}`` for the scalar metrics present in any run."""
    table: dict[str, dict[str, float | None]] = {}
    for name in SCALAR_METRICS:
        if any(name in m for m in runs.values()):
            table[name] = {rid: m.get(name) for rid, m in runs.items()}
    return table


def group_values(runs: dict[str, dict[str, Any]], metric: str) -> dict[str, list[float]]:
    """``{group: [value per seed]}`` of a metric (non-numeric values dropped)."""
    groups: dict[str, list[float]] = {}
    for rid, m in runs.items():
        value = m.get(metric)
        if isinstance(value, (int, float)) and math.isfinite(value):
            groups.setdefault(m.get("group", rid), []).append(float(value))
    return groups


def best_group(groups: dict[str, list[float]], side: str, minimize: bool) -> str | None:
    """The group of ``side`` with the best mean value."""
    cands = {g: float(np.mean(v)) for g, v in groups.items() if role(g) == side and v}
    if not cands:
        return None
    pick = min if minimize else max
    return pick(cands, key=cands.__getitem__)


def gap_percent(proposed: float, baseline: float, minimize: bool) -> float | None:
    """``(proposed − baseline)/|baseline| × 100``, sign reversed when minimising; None if 0."""
    if baseline == 0 or not (math.isfinite(proposed) and math.isfinite(baseline)):
        return None
    gap = (proposed - baseline) / abs(baseline) * 100.0
    return -gap if minimize else gap


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) by Lentz's continued fraction (NR 6.4)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - _betainc(b, a, 1.0 - x)
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 300):
        for num in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-14:
            break
    return front * f / a


def welch_t_test(x: list[float], y: list[float]) -> dict[str, float | None]:
    """Two-sided Welch t-test of mean(x) ≠ mean(y) (numpy; p from the t distribution)."""
    a, b = np.asarray(x, float), np.asarray(y, float)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    if va + vb == 0:
        return {"t": None, "df": None, "p_value": None}
    t = float((a.mean() - b.mean()) / math.sqrt(va + vb))
    df = float((va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1)))
    p = _betainc(df / 2.0, 0.5, df / (df + t * t))
    return {"t": t, "df": df, "p_value": float(p)}


def permutation_test(x: list[float], y: list[float]) -> float:
    """Exact two-sided permutation p-value of the difference in means (all splits)."""
    pooled, n = np.asarray(x + y, float), len(x)
    observed = abs(np.mean(x) - np.mean(y))
    count = total = 0
    for idx in itertools.combinations(range(len(pooled)), n):
        mask = np.zeros(len(pooled), bool)
        mask[list(idx)] = True
        count += abs(pooled[mask].mean() - pooled[~mask].mean()) >= observed - 1e-12
        total += 1
    return count / total


def significance(x: list[float], y: list[float]) -> dict[str, Any]:
    """Welch and permutation tests across seeds, or the reason they were not run."""
    if len(x) < 2 or len(y) < 2:
        return {
            "test": None,
            "reason": f"needs >= 2 seeds per side, got {len(x)} proposed and {len(y)} baseline; "
            "run train.py with --seed 1, --seed 2, ...",
        }
    out: dict[str, Any] = {"test": "welch_t + exact_permutation", "n_proposed": len(x)}
    out["n_baseline"] = len(y)
    out["welch"] = welch_t_test(x, y)
    out["permutation_p_value"] = permutation_test(x, y)
    return out


def aggregate(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The content of ``aggregated_metrics.json``."""
    primary = primary_metric(runs)
    minimize = primary in MINIMIZE
    groups = group_values(runs, primary)
    best_p, best_b = (best_group(groups, s, minimize) for s in ("proposed", "baseline"))
    out: dict[str, Any] = {
        "primary_metric": primary,
        "primary_metric_description": "Exact-match accuracy at 30 min wall-clock."
        if primary == "em_at_30min"
        else "Exact-match accuracy at the run's wall-clock budget (trial runs use short budgets).",
        "metrics": metric_table(runs),
        "best_proposed": best_p,
        "best_baseline": best_b,
        "best_proposed_value": float(np.mean(groups[best_p])) if best_p else None,
        "best_baseline_value": float(np.mean(groups[best_b])) if best_b else None,
        "gap": None,
        "gap_definition": "(proposed - baseline) / |baseline| * 100, sign reversed when minimised",
        "groups": {g: {"values": v, "mean": float(np.mean(v))} for g, v in groups.items()},
        "modes": sorted({str(m.get("mode")) for m in runs.values()}),
    }
    if best_p and best_b:
        out["gap"] = gap_percent(out["best_proposed_value"], out["best_baseline_value"], minimize)
        if out["gap"] is None:
            out["gap_note"] = "undefined: the best baseline's value is 0 (or not finite)"
        out["significance"] = significance(groups[best_p], groups[best_b])
    out["gaps"] = secondary_gaps(runs)
    return out


def secondary_gaps(runs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Best proposed vs best baseline for every scalar metric (same sign rule as ``gap``)."""
    out = {}
    for metric in SCALAR_METRICS:
        minimize = metric in MINIMIZE
        groups = group_values(runs, metric)
        best_p, best_b = (best_group(groups, s, minimize) for s in ("proposed", "baseline"))
        if best_p and best_b:
            p, b = float(np.mean(groups[best_p])), float(np.mean(groups[best_b]))
            out[metric] = {
                "best_proposed": best_p,
                "best_baseline": best_b,
                "proposed": p,
                "baseline": b,
                "gap": gap_percent(p, b, minimize),
                "minimize": minimize,
            }
    return out


# ---------------------------------------------------------------------------- figures
def _save(fig: Any, stem: Path) -> list[str]:
    paths = []
    for ext in ("pdf", "png"):
        fig.savefig(stem.with_suffix(f".{ext}"), bbox_inches="tight", dpi=120)
        paths.append(str(stem.with_suffix(f".{ext}")))
    return paths


def _em_limits(ax: Any, values: list[float]) -> None:
    """EM axes from 0 (EM is never negative), readable and labelled when every EM is 0."""
    top = max(1.0, 1.1 * max(values, default=0.0))
    ax.set_ylim(-0.03 * top, top)  # a little below 0, so points at EM = 0 are not cut in half
    if all(v == 0 for v in values):
        ax.text(
            0.5,
            0.5,
            "all EM = 0 at this budget",
            transform=ax.transAxes,
            ha="center",
            va="center",
            fontsize=11,
            color="0.3",
        )


def run_figures(run_dir: Path, m: dict[str, Any]) -> list[str]:
    """Learning curve (EM vs time), LR trajectory and training loss of one run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), layout="constrained")
    h = m["eval_history"]
    axes[0].step(
        [p["time_s"] for p in h], [p["em"] for p in h], where="post", marker="o", label="EM"
    )
    axes[0].axvline(m["budget_seconds"], color="k", ls="--", label="budget")
    axes[0].set(xlabel="budget used (s)", ylabel="EM (%)", title="learning curve")
    _em_limits(axes[0], [p["em"] for p in h])
    lr = m["lr_trajectory"]
    axes[1].plot([p["step"] for p in lr], [p["lr"] for p in lr], label=m["method"])
    axes[1].set(xlabel="optimizer step", ylabel="LR", title="LR trajectory", yscale="log")
    loss = m["train_loss"]
    axes[2].plot([p["step"] for p in loss], [p["loss"] for p in loss], label="train loss")
    axes[2].set(xlabel="optimizer step", ylabel="loss", title="training loss")
    for ax in axes:
        ax.legend()
    fig.suptitle(m["run_id"])  # constrained layout keeps it above the panel titles
    paths = _save(fig, run_dir / "curves")
    plt.close(fig)
    return paths


def comparison_figures(
    out_dir: Path, runs: dict[str, dict[str, Any]], agg: dict[str, Any]
) -> list[str]:
    """Bar chart of the primary metric (mean ± std over seeds), EM-vs-time curves, LR paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = agg["groups"]
    names = sorted(groups)
    means = [groups[g]["mean"] for g in names]
    stds = [float(np.std(groups[g]["values"])) for g in names]
    colors = ["tab:red" if role(g) == "proposed" else "tab:blue" for g in names]
    fig, ax = plt.subplots(figsize=(1.8 + 1.4 * len(names), 3.6), layout="constrained")
    bars = ax.bar(range(len(names)), means, yerr=stds, color=colors, capsize=4)
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=7)
    ax.set(ylabel=agg["primary_metric"], title=agg["primary_metric_description"])
    if agg["primary_metric"].startswith("em_"):  # bars of height 0 are invisible: say so
        tops = [mu + sd for mu, sd in zip(means, stds, strict=True)]  # error bars included
        _em_limits(ax, [v for g in names for v in groups[g]["values"]] + tops)
    handles = [bars[names.index(g)] for g in (agg["best_proposed"], agg["best_baseline"]) if g]
    ax.legend(
        handles, [f"{role(g)}: {g}" for g in (agg["best_proposed"], agg["best_baseline"]) if g]
    )
    paths = _save(fig, out_dir / "primary_metric_bar")
    plt.close(fig)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.6), layout="constrained")
    for rid, m in sorted(runs.items()):
        h = m["eval_history"]
        t = [p["time_s"] / 60 for p in h]
        ax1.step(t, [p["em"] for p in h], where="post", marker="o", label=rid)
        lr = m["lr_trajectory"]
        ax2.plot([p["time_s"] / 60 for p in lr], [p["lr"] for p in lr], label=rid)
    ax1.set(xlabel="budget used (min)", ylabel="EM (%)", title="EM vs wall-clock")
    _em_limits(ax1, [p["em"] for m in runs.values() for p in m["eval_history"]])
    ax2.set(xlabel="budget used (min)", ylabel="LR", yscale="log", title="LR trajectories")
    for ax in (ax1, ax2):
        ax.legend(fontsize=6)
    paths += _save(fig, out_dir / "learning_curves")
    plt.close(fig)
    return paths


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--results-dir", required=True)
    p.add_argument("--run-ids", nargs="*", default=None, help="default: every run folder")
    args = p.parse_args(argv)
    results = Path(args.results_dir)
    runs = load_runs(results, args.run_ids)
    for rid, m in runs.items():
        run_figures(results / rid, m)
    agg = aggregate(runs)
    out_dir = results / "comparison"
    out_dir.mkdir(parents=True, exist_ok=True)
    agg["figures"] = comparison_figures(out_dir, runs, agg)
    (out_dir / "aggregated_metrics.json").write_text(json.dumps(agg, indent=2))
    gap = agg["gap"]
    print(
        f"{agg['primary_metric']}: best proposed {agg['best_proposed']} vs best baseline "
        f"{agg['best_baseline']}: gap {'n/a' if gap is None else f'{gap:+.2f}%'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
