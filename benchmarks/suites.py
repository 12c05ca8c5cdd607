"""Suite definitions: tasks, step budgets, schedulers, LR grids and seeds.

Fairness rules (see README): the same step budget for every scheduler on a task; the same seeds
(same initialisation and batch order) for every scheduler; baselines get an LR sweep, GRAFF and
REACTOR run with one setting for every task; every scheduler also runs at the user's default LR
× {0.1, 1, 10} for the robustness table. Tuning-free anchors take no LR and run once per seed.

A task name may carry its step budget as a suffix, ``"gsm8k_qwen3@2000"``: the same task at
another budget length, without a copy of its definition (the ``budgets`` suite).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from benchmarks import tasks
from benchmarks.schedulers import ABLATIONS, ANCHORS, BASELINES, LEARNED, WEIGHT_DECAY

DEFAULT_LR = 1e-3  # the user's LR: AdamW's default, for every AdamW task
ROBUSTNESS_MULTS = (0.1, 1.0, 10.0)

TASK_CLASSES: dict[str, type] = {
    "digits_mlp": tasks.DigitsTask,
    "digits_cnn_sgd": tasks.DigitsCnnTask,
    "gsm8k_qwen3": tasks.Gsm8kLMTask,
    "gsm8k_lora": tasks.LoraTask,
}


def build_task(name: str, config: dict[str, Any]) -> Any:
    """The task ``name`` (``"base"`` or ``"base@steps"``) with ``config``; the suffix sets steps."""
    base, _, budget = name.partition("@")
    if base not in TASK_CLASSES:
        raise KeyError(f"unknown task {base!r}; known: {sorted(TASK_CLASSES)}")
    cfg = dict(config)
    if budget:
        if not budget.isdigit() or int(budget) < 1:
            raise ValueError(f"task {name!r}: the budget after '@' must be a positive integer")
        if "steps" in cfg and cfg["steps"] != int(budget):
            raise ValueError(f"task {name!r}: steps={cfg['steps']} contradicts the suffix")
        cfg["steps"] = int(budget)
    return TASK_CLASSES[base](**cfg, name=name)


def task_optimizer(task: Any) -> tuple[str, float, float]:
    """(optimizer kind, the user's default LR, weight decay) the task declares, or the defaults."""
    return (
        getattr(task, "optimizer", "adamw"),
        getattr(task, "default_lr", DEFAULT_LR),
        getattr(task, "weight_decay", WEIGHT_DECAY),
    )


def make_for_task(
    name: str,
    task: Any,
    model: Any,
    seed: int,
    *,
    lr_mult: float = 1.0,
    graff_kwargs: dict[str, Any] | None = None,
    clock: Any = None,
) -> tuple[Any, float]:
    """Scheduler ``name`` for ``model`` as the suites build it on ``task``: the task's optimizer,
    weight decay and step budget, its default LR × ``lr_mult``, its probe loss for λ̂. Returns
    the :class:`~benchmarks.schedulers.Setup` and the LR taken."""
    from benchmarks.schedulers import make

    kind, default_lr, weight_decay = task_optimizer(task)
    lr = default_lr * lr_mult
    setup = make(
        name,
        model,
        lr,
        task.steps,
        seed=seed,
        loss_fn=task.probe_loss_fn(model),
        graff_kwargs=graff_kwargs,
        clock=clock,
        optimizer=kind,
        weight_decay=weight_decay,
    )
    return setup, lr


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
    anchors: tuple[str, ...] = ()  # tuning-free anchors: no LR taken, one run per seed

    def build_tasks(self) -> list[Any]:
        return [build_task(name, cfg) for name, cfg in self.task_configs]

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
                runs += [_spec(task_name, sched, 1.0, seed) for sched in self.anchors]
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

# issue 18: today's three tasks and a CNN trained with SGD + momentum; the fifth, the long
# horizon (a transformer over 2,000 steps), is the longest budget of the ``budgets`` suite,
# which runs the same schedulers and anchors (one definition, not two copies of the long runs)
_ANCHOR_TASKS: tuple[tuple[str, dict[str, Any]], ...] = (
    *_FULL_TASKS,
    ("digits_cnn_sgd", {"steps": 300}),
)
# one task at three budget lengths: how GRAFF scales with the budget (2,000: the long horizon)
_BUDGET_TASKS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("gsm8k_qwen3@200", {}),
    ("gsm8k_qwen3@800", {}),
    ("gsm8k_qwen3@2000", {}),
)

SUITES = {
    "quick": Suite(
        name="quick",
        task_configs=(
            ("digits_mlp", {"steps": 40}),
            ("digits_cnn_sgd", {"steps": 40, "channels": 4}),
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
        anchors=("prodigy", "lr_range_wsd"),
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
    # Issue 18: GRAFF against the tuning-free anchors and the LR-swept baselines, five tasks.
    "anchors": Suite(
        name="anchors",
        task_configs=_ANCHOR_TASKS,
        baselines=("fixed", "cosine", "wsd", "schedule_free"),
        learned=("graff", "reactor"),
        # issue 17: what the learned planner adds, on tasks it never trained on (user's LR)
        ablations=("graff_planner_off", "graff_fresh"),
        sweep_mults=(0.1, 1.0, 3.0, 10.0),
        robust_mults=ROBUSTNESS_MULTS,
        seeds=3,
        anchors=ANCHORS,
    ),
    # Issue 17: what the shipped planner adds over planner-off and a fresh planner, on the
    # anchors' tasks (never trained on), at the user's LR, five seeds for the paired tests.
    "planner": Suite(
        name="planner",
        task_configs=_ANCHOR_TASKS,
        baselines=(),
        learned=("graff",),
        ablations=("graff_planner_off", "graff_fresh"),
        sweep_mults=(),
        robust_mults=(1.0,),
        seeds=5,
    ),
    # Issue 18: one task at three budget lengths (200 / 800 / 2000 steps).
    "budgets": Suite(
        name="budgets",
        task_configs=_BUDGET_TASKS,
        baselines=("cosine", "wsd", "schedule_free"),
        learned=("graff",),  # its prior alone is WSD at the user's LR, already a baseline
        ablations=(),
        sweep_mults=(0.1, 1.0, 3.0, 10.0),
        robust_mults=ROBUSTNESS_MULTS,
        seeds=3,
        anchors=ANCHORS,
    ),
}
