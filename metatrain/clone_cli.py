"""``python -m metatrain clone``: sweep → fit → evaluate → plot/export, each stage resumable.

Outputs in ``--out``: ``sweep/*.pt`` (one recorded run per task and shift), ``fit.pt`` (planner
after every epoch, Adam state, logs, evaluation cache; written atomically), ``summary.json``
(command, commits, date, machine, the regression curve and the evaluation curve) and
``curve.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import os
import platform
from pathlib import Path
from typing import Any

import torch

from metatrain import clone, graff_api
from metatrain.report import git_commit, save_figure


def add_parser(sub: Any) -> None:
    p = sub.add_parser("clone", help="behaviour cloning of the best constant LR correction")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--train-tasks", type=int, default=72, help="meta-train tasks (72)")
    p.add_argument("--val-sets", type=int, default=2, help="meta-val draws of 11 tasks (2)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--lr", type=float, default=3e-3, help="Adam LR of the fit (3e-3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=None, help="cap every budget (smoke runs)")
    p.add_argument(
        "--eval-epochs", default="0,5,10,20,last", help="epochs whose planner runs the val tasks"
    )
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--export", type=Path, default=None, help="write the last epoch's planner")


def _eval_epochs(text: str, epochs: int) -> list[int]:
    out = []
    for item in text.split(","):
        e = epochs if item.strip() == "last" else int(item)
        if 0 <= e <= epochs and e not in out:
            out.append(e)
    return sorted(out)


def _load(path: Path) -> dict[str, Any] | None:
    return torch.load(path, weights_only=False) if path.is_file() else None


def _save(state: dict[str, Any], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def run(args: argparse.Namespace, command: str) -> int:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    train_specs = clone.train_specs(args.train_tasks, args.seed, args.max_steps)
    val_specs = clone.val_specs(args.max_steps, args.val_sets)
    clone.sweep(out, [*train_specs, *val_specs], args.workers)
    train = [clone.load_task(out, s) for s in train_specs]
    val = [clone.load_task(out, s) for s in val_specs]
    config = clone.FitConfig(epochs=args.epochs, lr=args.lr, seed=args.seed)
    state = _load(out / "fit.pt")
    if state is None:
        state = {
            "config": dataclasses.asdict(config),
            "command": command,
            "commit": git_commit(),
            "vectors": [graff_api.fresh_vector(args.seed)],
            "adam": None,
            "log": [],
        }
    elif {k: v for k, v in state["config"].items() if k != "epochs"} != {
        k: v for k, v in dataclasses.asdict(config).items() if k != "epochs"
    }:
        raise SystemExit(f"{out}/fit.pt was fitted with {state['config']}; use a new --out.")
    state["config"]["epochs"] = args.epochs
    seqs = [s for t in train for s in t.sequences]
    val_seqs = [s for t in val for s in t.sequences]
    clone.fit(seqs, val_seqs, config, state, lambda st: _save(st, out / "fit.pt"))
    epochs = _eval_epochs(args.eval_epochs, args.epochs)
    scores = clone.evaluate(out, state, epochs, val, args.workers)
    _save(state, out / "fit.pt")
    payload = {
        "command": state["command"],
        "last_command": command,
        "run_commit": state["commit"],
        "commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "config": state["config"],
        "train_tasks": len(train),
        "sequences": {"train": len(seqs), "val": len(val_seqs)},
        "shifts": [round(s, 4) for s in clone.SHIFTS],
        "best_shift_train": [round(t.best, 3) for t in train],
        "regression": [
            [e["epoch"], round(e["train"], 5), round(e["val"], 5)] for e in state["log"]
        ],
        "linear_probe": clone.linear_probe(seqs, val_seqs),
        **clone.summary(scores, val),
    }
    clone.write_json(out / "summary.json", payload)
    plot(payload, out / "curve.png")
    keys = ("eval", "eval_median", "better_worse", "oracle_constant_shift", "linear_probe")
    print({k: payload[k] for k in keys})
    if args.export is not None:
        graff_api.save_vector(state["vectors"][args.epochs], args.export)
        print(f"exported epoch {args.epochs} to {args.export}")
    return 0


def plot(payload: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    reg = payload["regression"]
    a.plot([r[0] for r in reg], [r[1] for r in reg], "o-", ms=3, label="meta-train tasks")
    a.plot([r[0] for r in reg], [r[2] for r in reg], "s-", ms=3, label="meta-val tasks")
    a.set_xlabel("epoch")
    a.set_ylabel("weighted squared error of the residual")
    a.set_title("fit: residual vs the best constant shift")
    a.legend(fontsize=8)
    ev = sorted((int(k), v) for k, v in payload["eval"].items())
    med = sorted((int(k), v) for k, v in payload["eval_median"].items())
    b.plot([e for e, _ in ev], [v for _, v in ev], "s-", color="tab:orange", label="mean")
    b.plot([e for e, _ in med], [v for _, v in med], "^--", color="tab:orange", label="median")
    b.axhline(
        payload["oracle_constant_shift"], color="tab:green", ls=":", label="best shift (hindsight)"
    )
    b.axhline(0.0, color="grey", lw=0.8, ls="--")
    b.set_xlabel("epoch")
    b.set_ylabel("normalised loss vs planner-off\n(< 0: better)")
    b.set_title(f"meta-val runs ({len(payload['val_tasks'])} tasks, never fitted)")
    b.legend(fontsize=8)
    for ax in (a, b):
        ax.grid(alpha=0.3)
    save_figure(fig, path)
