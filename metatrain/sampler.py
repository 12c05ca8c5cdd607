"""Task specs, the seeded meta-train sampler and the fixed meta-validation set.

A :class:`TaskSpec` names everything a run depends on: data family, architecture, optimizer,
step budget, LR factor (× :data:`metatrain.tasks.DEFAULT_LR`) and seed (data and model init and
data order). Meta-train seeds lie in ``[0, 2**30)``, meta-validation seeds in ``[2**30, 2**31 - 1)``,
and the meta-validation set also holds a data family the sampler never draws
(:data:`HELD_OUT_FAMILIES`: the random-grammar languages), so the validation curve measures
transfer to unseen tasks, not only unseen seeds.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass

from metatrain.tasks import ARCHS, DEFAULT_LR

HELD_OUT_FAMILIES = ("pcfg",)
TRAIN_SEEDS = (0, 2**30)
VAL_SEEDS = (2**30, 2**31 - 1)
MIN_STEPS, MAX_STEPS = 100, 1000
LR_FACTORS = (0.03, 30.0)
SGD_PROBABILITY = 0.4


@dataclass(frozen=True)
class TaskSpec:
    """One meta-training run's task (hashable: the key of the planner-off baseline cache)."""

    family: str
    arch: str
    optimizer: str
    steps: int
    lr_factor: float
    seed: int

    @property
    def lr(self) -> float:
        """The user's LR: the default for (arch, optimizer) × the LR factor."""
        return DEFAULT_LR[(self.arch, self.optimizer)] * self.lr_factor

    def key(self) -> str:
        return (
            f"{self.family}/{self.arch}/{self.optimizer}/{self.steps}/"
            f"{self.lr_factor:.6g}/{self.seed}"
        )

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _log_uniform(rng: random.Random, low: float, high: float) -> float:
    return math.exp(rng.uniform(math.log(low), math.log(high)))


def _draw(
    rng: random.Random, combo: tuple[str, str], seeds: tuple[int, int], max_steps: int | None
) -> TaskSpec:
    family, arch = combo
    optimizer = "sgd" if rng.random() < SGD_PROBABILITY else "adamw"
    steps = round(_log_uniform(rng, MIN_STEPS, MAX_STEPS))
    if max_steps is not None:
        steps = min(steps, max_steps)
    lr_factor = float(f"{_log_uniform(rng, *LR_FACTORS):.4g}")
    seed = rng.randrange(*seeds)
    return TaskSpec(family, arch, optimizer, steps, lr_factor, seed)


TRAIN_COMBOS: tuple[tuple[str, str], ...] = tuple(
    (f, a) for f, archs in ARCHS.items() if f not in HELD_OUT_FAMILIES for a in archs
)


class TaskSampler:
    """Draws meta-train tasks: a (family, arch) pair uniformly, then optimizer, budget, LR, seed.

    Budgets are log-uniform in [100, 1000] steps (capped by ``max_steps`` for smoke runs), LR
    factors log-uniform in [0.03, 30], SGD with probability 0.4 (else AdamW). The whole draw is
    a function of the generator's state, which :meth:`state` / :meth:`set_state` checkpoint.
    """

    def __init__(self, seed: int, max_steps: int | None = None) -> None:
        self.rng = random.Random(seed)
        self.max_steps = max_steps

    def sample(self) -> TaskSpec:
        combo = TRAIN_COMBOS[self.rng.randrange(len(TRAIN_COMBOS))]
        return _draw(self.rng, combo, TRAIN_SEEDS, self.max_steps)

    def noise_seed(self) -> int:
        """Seed of one ES perturbation (drawn from the same stream, so it is checkpointed too)."""
        return self.rng.randrange(2**62)

    def state(self) -> object:
        return self.rng.getstate()

    def set_state(self, state: object) -> None:
        self.rng.setstate(state)  # type: ignore[arg-type]


#: The meta-validation combinations: every held-out (pcfg) architecture, once with each optimizer,
#: and one spec of every meta-train combination (new seeds).
VAL_COMBOS: tuple[tuple[str, str], ...] = (
    ("pcfg", "transformer"),
    ("pcfg", "transformer"),
    ("pcfg", "lora"),
    ("pcfg", "lora"),
    *TRAIN_COMBOS,
)


def meta_val_specs(max_steps: int | None = None, seed: int = 12345) -> list[TaskSpec]:
    """The fixed meta-validation set (the same for every run with the same ``max_steps``)."""
    rng = random.Random(seed)
    specs = [_draw(rng, combo, VAL_SEEDS, max_steps) for combo in VAL_COMBOS]
    # the two specs of each held-out combination: one AdamW, one SGD
    for i in (0, 2):
        a, b = specs[i], specs[i + 1]
        specs[i] = TaskSpec(a.family, a.arch, "adamw", a.steps, a.lr_factor, a.seed)
        specs[i + 1] = TaskSpec(b.family, b.arch, "sgd", b.steps, b.lr_factor, b.seed)
    return specs
