"""Antithetic evolution strategies on the planner's flat weights, with checkpoint and resume.

Per iteration: draw ``pairs`` tasks and one Gaussian direction ε_k each; run GRAFF on task k
with φ + σε_k and with φ − σε_k (common random numbers: both members share the task, seed, model
init and data order), plus the planner-off baseline of any task not yet in the cache; turn the
2·pairs normalised losses s (:func:`metatrain.runner.normalised`) into shaped values u (centred
ranks in [-½, ½], or z-scores) and give Adam

.. math:: \\hat g = \\frac{1}{2\\,n\\,\\sigma}\\sum_{k=1}^{n} (u^+_k - u^-_k)\\,\\varepsilon_k,

an estimate of the gradient of the expected (shaped) end-of-budget validation loss — the signal
users care about, not the online planner's one-step hypergradient (Salimans et al., 2017,
https://arxiv.org/abs/1703.03864). Every ``val_every`` iterations the *unperturbed* φ runs the
fixed meta-validation specs (:func:`metatrain.sampler.meta_val_specs`); the best φ on them is kept.

After every iteration the whole state (φ, Adam, sampler RNG, baselines cache, log, best φ) is
written atomically to ``DIR/state.pt``; a run started on a folder that has one resumes it.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from metatrain import graff_api
from metatrain.runner import Evaluator, Job, RunResult, normalised
from metatrain.sampler import TaskSampler, TaskSpec, meta_val_specs

STATE_FILE = "state.pt"
STATE_VERSION = 1


@dataclass(frozen=True)
class ESConfig:
    """Everything that defines a meta-training run (``iterations`` may grow on resume)."""

    iterations: int = 100
    pairs: int = 8
    sigma: float = 0.05
    lr: float = 0.01
    val_every: int = 5
    fitness: str = "rank"  # "rank" (centred ranks) or "z" (z-scores)
    seed: int = 0
    max_steps: int | None = None
    init: str = "fresh"  # "fresh", "default" (the shipped planner) or a planner file
    params: str = "all"  # "all" weights, or only the "decoder" (w, b: 17 of 3,138)
    residual_max: float = 1.25  # the planner's authority in the runs (GraffConfig.residual_max)

    def __post_init__(self) -> None:
        if self.fitness not in ("rank", "z"):
            raise ValueError(f"fitness must be 'rank' or 'z', got {self.fitness!r}")
        if self.params not in ("all", "decoder"):
            raise ValueError(f"params must be 'all' or 'decoder', got {self.params!r}")
        if not 1.0 <= self.residual_max <= 100.0:
            raise ValueError(f"residual_max must be in [1, 100], got {self.residual_max}")
        if self.pairs < 1 or self.iterations < 0 or self.val_every < 1 or self.sigma <= 0:
            raise ValueError(f"invalid ES config {self}")


def shape(values: list[float], kind: str) -> list[float]:
    """Fitness shaping: centred ranks in [-½, ½] (``"rank"``) or z-scores (``"z"``)."""
    n = len(values)
    if kind == "rank":
        if n == 1:
            return [0.0]
        order = sorted(range(n), key=lambda i: values[i])
        ranks = [0.0] * n
        for r, i in enumerate(order):
            ranks[i] = r / (n - 1) - 0.5
        return ranks
    mean = statistics.fmean(values)
    std = statistics.pstdev(values) or 1.0
    return [(v - mean) / std for v in values]


def initial_vector(init: str, seed: int) -> torch.Tensor:
    if init == "fresh":
        return graff_api.fresh_vector(seed)
    return graff_api.load_vector(init)


def new_state(config: ESConfig, command: str, commit: str | None) -> dict[str, Any]:
    phi = initial_vector(config.init, config.seed)
    adam = torch.optim.Adam([phi.clone().requires_grad_(True)], lr=config.lr)
    return {
        "version": STATE_VERSION,
        "config": dataclasses.asdict(config),
        "phi": phi,
        "adam": adam.state_dict(),
        "sampler": TaskSampler(config.seed, config.max_steps).state(),
        "iteration": -1,  # -1: nothing done; 0: the initial meta-validation is logged
        "log": [],
        "baselines": {},
        "best": None,
        "elapsed": 0.0,
        "command": command,
        "commit": commit,
        "resumed": [],
    }


def save_state(state: dict[str, Any], out: Path) -> None:
    """Write ``out/state.pt`` atomically (a crash leaves the previous state or this one)."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (STATE_FILE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, out / STATE_FILE)


def load_state(out: Path) -> dict[str, Any] | None:
    path = out / STATE_FILE
    if not path.is_file():
        return None
    state = torch.load(path, weights_only=False)  # our own file: holds RNG tuples and dicts
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"{path} has state version {state.get('version')}, not {STATE_VERSION}")
    return state


class MetaTrainer:
    """Runs ES iterations on a state dict; ``evaluator`` runs batches of jobs (injectable)."""

    def __init__(self, state: dict[str, Any], evaluator: Evaluator) -> None:
        self.state = state
        self.config = ESConfig(**state["config"])
        self.evaluate = evaluator
        self.phi = state["phi"].clone().requires_grad_(True)
        self.adam = torch.optim.Adam([self.phi], lr=self.config.lr)
        self.adam.load_state_dict(state["adam"])
        self.sampler = TaskSampler(self.config.seed, self.config.max_steps)
        self.sampler.set_state(state["sampler"])
        self.val_specs = meta_val_specs(self.config.max_steps)

    # ------------------------------------------------------------------ evaluation
    def _run(self, jobs: list[Job]) -> list[RunResult]:
        """Run ``jobs`` plus the planner-off baseline of every spec not cached yet."""
        cache = self.state["baselines"]
        missing = list(dict.fromkeys(j.spec for j in jobs if j.spec.key() not in cache))
        results = self.evaluate([*jobs, *(Job(spec, None) for spec in missing)])
        for spec, res in zip(missing, results[len(jobs) :], strict=True):
            cache[spec.key()] = (res.final, res.initial)
        return results[: len(jobs)]

    def _score(self, spec: TaskSpec, result: RunResult) -> float:
        baseline, initial = self.state["baselines"][spec.key()]
        return normalised(result.final, baseline, initial)

    def meta_validate(self) -> tuple[float, list[float]]:
        """Mean normalised loss of the unperturbed φ on the meta-validation specs."""
        phi = self.phi.detach().clone()
        rmax = self.config.residual_max
        results = self._run([Job(spec, phi, rmax) for spec in self.val_specs])
        scores = [self._score(s, r) for s, r in zip(self.val_specs, results, strict=True)]
        return statistics.fmean(scores), scores

    # ------------------------------------------------------------------ one iteration
    def es_step(self) -> dict[str, Any]:
        cfg = self.config
        specs = [self.sampler.sample() for _ in range(cfg.pairs)]
        noise = [self.sampler.noise_seed() for _ in range(cfg.pairs)]
        phi = self.phi.detach()
        eps = [torch.randn(phi.shape, generator=torch.Generator().manual_seed(s)) for s in noise]
        if cfg.params == "decoder":  # perturb (and so update) the decoder alone
            mask = graff_api.decoder_mask()
            eps = [e * mask for e in eps]
        jobs = []
        rmax = cfg.residual_max
        for spec, e in zip(specs, eps, strict=True):
            jobs += [Job(spec, phi + cfg.sigma * e, rmax), Job(spec, phi - cfg.sigma * e, rmax)]
        results = self._run(jobs)
        scores = [self._score(j.spec, r) for j, r in zip(jobs, results, strict=True)]
        shaped = shape(scores, cfg.fitness)
        grad = torch.zeros_like(phi)
        for k, e in enumerate(eps):
            grad += (shaped[2 * k] - shaped[2 * k + 1]) / (2 * cfg.pairs * cfg.sigma) * e
        self.adam.zero_grad()
        self.phi.grad = grad
        self.adam.step()
        pair_means = [0.5 * (scores[2 * k] + scores[2 * k + 1]) for k in range(cfg.pairs)]
        return {
            "train": statistics.fmean(scores),
            "train_pairs": [round(v, 5) for v in pair_means],
            "tasks": [s.key() for s in specs],
            "grad_norm": float(grad.norm()),
            "run_seconds": sum(r.seconds for r in results),
        }

    def iterate(self, on_entry: Callable[[dict[str, Any]], None] | None = None) -> None:
        """Run until ``config.iterations`` ES updates are done, checkpointing through ``on_entry``."""
        cfg = self.config
        while self.state["iteration"] < cfg.iterations:
            start = time.perf_counter()
            it = self.state["iteration"] + 1
            entry: dict[str, Any] = {"iteration": it}
            if it > 0:
                entry.update(self.es_step())
            if it == 0 or it % cfg.val_every == 0 or it == cfg.iterations:
                val, per_task = self.meta_validate()
                entry["val"], entry["val_tasks"] = val, [round(v, 5) for v in per_task]
                best = self.state["best"]
                if best is None or val < best["val"]:
                    self.state["best"] = {
                        "iteration": it,
                        "val": val,
                        "phi": self.phi.detach().clone(),
                    }
            self.state["elapsed"] += time.perf_counter() - start
            entry["seconds"] = round(time.perf_counter() - start, 3)
            entry["elapsed"] = round(self.state["elapsed"], 3)
            self.state.update(
                phi=self.phi.detach().clone(),
                adam=self.adam.state_dict(),
                sampler=self.sampler.state(),
                iteration=it,
            )
            self.state["log"].append(entry)
            if on_entry is not None:
                on_entry(entry)
