"""Suite definitions: tasks, step budgets, schedulers, LR grids and seeds.

Fairness rules (see README): the same step budget for every scheduler on a task; the same seeds
(same initialisation and batch order) for every scheduler; baselines get an LR sweep, GRAFF and
REACTOR run with one setting for every task; every scheduler also runs at the user's default LR
× {0.1, 1, 10} for the robustness table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from benchmarks import tasks
from benchmarks.schedulers import ABLATIONS, BASELINES, LEARNED

DEFAULT_LR = 1e-3  # the user's LR: AdamW's default, for every task
ROBUSTNESS_MULTS = (0.1, 1.0, 10.0)


@dataclass(frozen=True)
class Suite:
    name: str
    task_configs: tuple[tuple[str, dict[str, Any]], ...]
    baselines: tuple[str, ...]
    learned: tuple[str, ...]
    ablations: tuple[str, ...]
    sweep_mults: tuple[float, ...]  # LR multipliers for baselines (superset of robustness)
    robust_mults: tuple[float, ...]  # LR multipliers for GRAFF / prior only / REACTOR
    seeds: int
    eval_points: int = 10

    def build_tasks(self) -> list[Any]:
        classes = {
            "digits_mlp": tasks.DigitsTask,
            "gsm8k_qwen3": tasks.Gsm8kLMTask,
            "gsm8k_lora": tasks.LoraTask,
        }
        return [classes[name](**cfg) for name, cfg in self.task_configs]

    def specs(self, seeds: int | None = None) -> list[dict[str, Any]]:
        """Every run of the suite, longest tasks first (better load balance across workers)."""
        runs = []
        for task_name, _ in reversed(self.task_configs):
            for seed in range(seeds or self.seeds):
                for sched in self.baselines:
                    runs += [_spec(task_name, sched, m, seed) for m in self.sweep_mults]
                for sched in self.learned:
                    runs += [_spec(task_name, sched, m, seed) for m in self.robust_mults]
                runs += [_spec(task_name, sched, 1.0, seed) for sched in self.ablations]
        return runs


def _spec(task: str, scheduler: str, mult: float, seed: int) -> dict[str, Any]:
    return {"task": task, "scheduler": scheduler, "lr_mult": mult, "seed": seed}


_FULL_TASKS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("digits_mlp", {"steps": 300}),
    ("gsm8k_qwen3", {"steps": 400}),
    (
        "gsm8k_lora",
        {
            "steps": 120,
            "pretrain_steps": 300,
            "prompt_chars": 48,
            "answer_chars": 80,
            "batch": 8,
        },
    ),
)

SUITES = {
    "quick": Suite(
        name="quick",
        task_configs=(
            ("digits_mlp", {"steps": 40}),
            ("gsm8k_qwen3", {"steps": 16, "hidden": 32, "seq": 32, "batch": 4, "val_windows": 8}),
            (
                "gsm8k_lora",
                {
                    "steps": 8,
                    "pretrain_steps": 8,
                    "hidden": 32,
                    "prompt_chars": 24,
                    "answer_chars": 24,
                    "batch": 4,
                    "val_examples": 8,
                },
            ),
        ),
        baselines=("fixed", "cosine", "schedule_free"),
        learned=("graff", "prior_only", "reactor"),
        ablations=(),
        sweep_mults=(1.0,),
        robust_mults=(1.0,),
        seeds=1,
        eval_points=2,
    ),
    "full": Suite(
        name="full",
        task_configs=_FULL_TASKS,
        baselines=BASELINES,
        learned=LEARNED,
        ablations=ABLATIONS,
        sweep_mults=(0.1, 1.0, 3.0, 10.0),
        robust_mults=ROBUSTNESS_MULTS,
        seeds=3,
    ),
    # Issue 3's quality floor only: GRAFF vs its own prior at the user's LR x {0.1, 1, 10}.
    "floor": Suite(
        name="floor",
        task_configs=_FULL_TASKS,
        baselines=(),
        learned=("graff", "prior_only"),
        ablations=(),
        sweep_mults=(),
        robust_mults=ROBUSTNESS_MULTS,
        seeds=3,
    ),
    # Issue 3's ablations at the user's LR (graff and each of its switches, no baselines).
    "ablations": Suite(
        name="ablations",
        task_configs=_FULL_TASKS,
        baselines=(),
        learned=("graff",),
        ablations=tuple(a for a in ABLATIONS if a != "graff_linear_prior"),
        sweep_mults=(),
        robust_mults=(1.0,),
        seeds=3,
    ),
}
