"""Outputs of a meta-training run: ``log.jsonl``, ``curve.png`` and the exported planner + sidecar."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from metatrain import graff_api


def git_commit() -> str | None:
    """The repository's HEAD commit (with ``+dirty`` when the tree has changes), or None."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file: a crash leaves the old or the new file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_log(log: list[dict[str, Any]], out: Path) -> None:
    """One JSON object per logged iteration (rewritten whole: it always matches ``state.pt``)."""
    atomic_write(out / "log.jsonl", "".join(json.dumps(e) + "\n" for e in log))


def curve(log: list[dict[str, Any]]) -> list[list[float | None]]:
    """Compact curve: ``[iteration, mean meta-train normalised loss, meta-val normalised loss]``."""
    return [
        [
            e["iteration"],
            None if "train" not in e else round(e["train"], 5),
            None if "val" not in e else round(e["val"], 5),
        ]
        for e in log
    ]


def plot_curve(log: list[dict[str, Any]], path: Path) -> None:
    """Meta-train (per iteration, and its running mean) and meta-val curves, separate panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(e["iteration"], e["train"]) for e in log if "train" in e]
    val = [(e["iteration"], e["val"]) for e in log if "val" in e]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8), sharex=True)
    if train:
        xs, ys = zip(*train, strict=True)
        a.plot(xs, ys, "o-", color="tab:blue", alpha=0.5, ms=3, label="iteration mean")
        window = max(1, len(ys) // 10)
        if window > 1:
            smooth = [
                sum(ys[max(0, i - window + 1) : i + 1]) / (i + 1 - max(0, i - window + 1))
                for i in range(len(ys))
            ]
            a.plot(xs, smooth, "-", color="tab:blue", lw=2, label=f"running mean ({window})")
        a.legend(fontsize=8)
    a.set_title("meta-train (perturbed pairs, fresh tasks)")
    if val:
        xs, ys = zip(*val, strict=True)
        b.plot(xs, ys, "s-", color="tab:orange")
    b.set_title("meta-validation (unperturbed φ, fixed tasks)")
    for ax in (a, b):
        ax.axhline(0.0, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("ES iteration")
        ax.set_ylabel("normalised loss, mean log(L / L_off)\n(< 0: better than planner-off)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    save_figure(fig, path)


def save_figure(fig: Any, path: Path) -> None:
    """Lay out, write atomically (PNG, 110 dpi) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def export(state: dict[str, Any], to: Path, command: str) -> dict[str, Any]:
    """Save the best-on-meta-validation planner to ``to`` and its provenance to ``to``.json."""
    best = state.get("best")
    if best is None:
        raise ValueError("the run has no meta-validation result yet: nothing to export")
    graff_api.save_vector(best["phi"], to)
    sidecar = {
        "command": state["command"],
        "resumed_with": state["resumed"],
        "export_command": command,
        "run_commit": state["commit"],
        "export_commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
        },
        "config": state["config"],
        "iterations_done": state["iteration"],
        "elapsed_seconds": round(state["elapsed"], 1),
        "best_iteration": best["iteration"],
        "best_meta_val": round(best["val"], 5),
        "normalised_loss": "log((L + 0.01 L_init) / (L_planner_off + 0.01 L_init)); < 0 is better",
        "curve": curve(state["log"]),
    }
    atomic_write(to.with_suffix(".json"), json.dumps(sidecar, indent=1) + "\n")
    return sidecar
