"""Optional Optuna search over the seed's spaces (adapter LR, planner/controller LR, LoRA rank).

Usage::

    python examples/gsm8k/hpo.py --config examples/gsm8k/configs/<run>.yaml --mode full \\
        --results-dir DIR [--data-dir DIR] [--trials 20]

Each trial is a complete budgeted run (``train.run_training``) maximising EM at the budget.
Needs ``optuna`` (``pip install optuna``); nothing else in the example imports it.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train import MODES, load_config, run_training

SEARCH_SPACE = {
    "optimizer.lr": ("log", 5e-5, 1e-3),
    "scheduler.config.planner_lr": ("log", 1e-4, 1e-2),  # GRAFF
    "scheduler.controller_lr": ("log", 1e-5, 1e-3),  # REACTOR
    "model.lora.r": ("choice", [16, 32, 64]),
}


def suggest(trial: Any, cfg: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``cfg`` with the trial's values (scheduler keys only for their method)."""
    out = copy.deepcopy(cfg)
    for key, spec in SEARCH_SPACE.items():
        if key == "scheduler.config.planner_lr" and cfg["method"] != "graff":
            continue
        if key == "scheduler.controller_lr" and cfg["method"] != "reactor":
            continue
        if spec[0] == "log":
            value = trial.suggest_float(key, spec[1], spec[2], log=True)
        else:
            value = trial.suggest_categorical(key, spec[1])
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {}) or {}
        node[leaf] = value
    out["run_id"] = f"{cfg['run_id']}-hpo{trial.number}"
    out["group"] = out["run_id"]
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point.

    Raises:
        SystemExit: if optuna is not installed.
    """
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--config", required=True)
    p.add_argument("--mode", choices=MODES, default="full")
    p.add_argument("--results-dir", required=True)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--trials", type=int, default=20)
    args = p.parse_args(argv)
    if importlib.util.find_spec("optuna") is None:
        raise SystemExit(
            "hpo.py needs optuna: pip install optuna (the rest of the example does not)."
        )
    import optuna

    cfg = load_config(args.config, args.mode)

    def objective(trial: Any) -> float:
        metrics = run_training(
            suggest(trial, cfg), args.mode, args.results_dir, args.data_dir, False
        )
        return float(metrics["em_at_budget"]) if metrics else float("nan")

    study = optuna.create_study(direction="maximize", study_name=cfg["run_id"])
    study.optimize(objective, n_trials=args.trials)
    print("best:", study.best_params, study.best_value)
    return 0


if __name__ == "__main__":
    sys.exit(main())
