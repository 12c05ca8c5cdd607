"""Per-step time and held memory of each scheduler on the tiny Qwen3 LoRA task.

Every scheduler trains its own copy of the same LoRA model; one round times one full training
step (zero_grad, forward, backward, ``optimizer.step()``, ``scheduler.step(loss)``, probes
included) of every scheduler in a shuffled order, so machine noise hits all of them alike. The
reported ratio is the median over rounds of (step time / AdamW + cosine step time in the same
round). Memory: bytes of tensors reachable from the scheduler object that are neither model
parameters nor optimizer state (planner, probe buffers, stored updates), maximum over steps.
"""

from __future__ import annotations

import gc
import json
import random
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.schedulers import BASELINES, GRAFF_VARIANTS, make
from benchmarks.tasks import REPO, LoraTask

REFERENCE = "cosine"
SCHEDULERS = (*BASELINES, "reactor", *GRAFF_VARIANTS)


def held_tensor_bytes(scheduler: Any, exclude: set[int]) -> int:
    """Bytes of distinct tensor storages reachable from ``scheduler`` minus ``exclude`` ids."""
    if scheduler is None:
        return 0
    seen, storages, total = set(), set(), 0
    stack = [scheduler]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or id(obj) in exclude:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            ptr = obj.untyped_storage().data_ptr()
            if ptr not in storages:
                storages.add(ptr)
                total += obj.untyped_storage().nbytes()
            continue
        if isinstance(obj, torch.nn.Module | torch.optim.Optimizer | type | types.ModuleType):
            continue  # the model and optimizer are the user's, not the scheduler's
        if isinstance(obj, types.FunctionType):  # closures, not the module's globals
            stack.extend(c.cell_contents for c in obj.__closure__ or () if _filled(c))
            stack.extend(obj.__defaults__ or ())
            continue
        stack.extend(gc.get_referents(obj))
    return total


def _filled(cell: types.CellType) -> bool:
    try:
        cell.cell_contents  # noqa: B018
    except ValueError:
        return False
    return True


def _exclusions(model: torch.nn.Module, opt: torch.optim.Optimizer) -> set[int]:
    ids = {id(p) for p in model.parameters()} | {id(b) for b in model.buffers()}
    for state in opt.state.values():
        ids |= {id(v) for v in state.values() if isinstance(v, torch.Tensor)}
    return ids


def measure(task: LoraTask, rounds: int, warmup: int = 5, seed: int = 0) -> dict[str, Any]:
    steps = rounds + warmup
    task.steps = steps
    runs: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    for name in SCHEDULERS:
        model = task.build(seed)
        setup = make(name, model, 1e-3, steps, seed=seed, loss_fn=task.probe_loss_fn(model))
        runs[name] = {
            "model": model,
            "setup": setup,
            "gen": torch.Generator().manual_seed(seed),
            "times": [],
            "bytes": 0,
        }
    order = list(runs)
    rng = random.Random(seed)
    for r in range(steps):
        rng.shuffle(order)
        for name in list(order):
            run = runs[name]
            try:
                elapsed = _timed_step(task, run)
            except Exception as err:
                skipped[name] = f"{type(err).__name__}: {err}"
                order.remove(name)
                del runs[name]
                continue
            if r >= warmup:
                run["times"].append(elapsed)
            if r >= warmup and (r - warmup) % 10 == 0:
                excl = _exclusions(run["model"], run["setup"].optimizer)
                run["bytes"] = max(run["bytes"], held_tensor_bytes(run["setup"].scheduler, excl))
    ref = np.array(runs[REFERENCE]["times"])
    results = {}
    for name, run in runs.items():
        t = np.array(run["times"])
        results[name] = {
            "median_step_ms": float(np.median(t) * 1e3),
            "ratio_to_cosine": float(np.median(t / ref)),
            "overhead_percent": float((np.median(t / ref) - 1.0) * 100.0),
            "held_tensor_bytes": int(run["bytes"]),
        }
    return {"results": results, "skipped": skipped, "rounds": rounds, "reference": REFERENCE}


def _timed_step(task: LoraTask, run: dict[str, Any]) -> float:
    setup, model = run["setup"], run["model"]
    start = time.perf_counter()
    setup.train_mode()
    setup.optimizer.zero_grad(set_to_none=True)
    loss = task.train_loss(model, run["gen"])
    loss.backward()
    setup.optimizer.step()
    if setup.scheduler is not None:
        setup.scheduler.step(loss.detach()) if setup.steps_with_loss else setup.scheduler.step()
    return time.perf_counter() - start


def markdown(meta: dict[str, Any], data: dict[str, Any]) -> str:
    lines = [
        "# graff benchmark — per-step overhead on the tiny Qwen3 LoRA task",
        "",
        f"Command: `{meta['command']}` · commit `{meta['git_commit']}` (dirty: {meta['git_dirty']})"
        f" · {meta['date']} · {meta['machine']['cpu_count']} CPUs, 1 torch thread.",
        "",
        f"Median over {data['rounds']} interleaved rounds of (step time / AdamW + cosine step time "
        "in the same round); a whole training step, probes included. Held memory: tensor bytes "
        "the scheduler keeps (max over steps), excluding the model and the optimizer state.",
        "",
        "| scheduler | median step (ms) | ratio to AdamW + cosine | overhead | held memory (KiB) |",
        "|---|---|---|---|---|",
    ]
    for name, r in sorted(data["results"].items(), key=lambda kv: kv[1]["ratio_to_cosine"]):
        lines.append(
            f"| {name} | {r['median_step_ms']:.1f} | {r['ratio_to_cosine']:.3f} | "
            f"{r['overhead_percent']:+.1f} % | {r['held_tensor_bytes'] / 1024:.1f} |"
        )
    for name, why in data["skipped"].items():
        lines.append(f"\n- `{name}` not measured: {why.splitlines()[0][:200]}")
    return "\n".join(lines) + "\n"


def main(args: Any) -> None:
    from benchmarks.meta import provenance
    from benchmarks.report import sanitize

    torch.set_num_threads(1)
    out = Path(args.out or REPO / "benchmarks" / "results" / "overhead")
    out.mkdir(parents=True, exist_ok=True)
    task = LoraTask(steps=1, pretrain_steps=50)
    task.setup(Path(args.data_dir) if args.data_dir else None)
    meta = provenance()
    data = measure(task, args.rounds)
    (out / "overhead.json").write_text(json.dumps(sanitize({"meta": meta, **data}), indent=1))
    (out / "overhead.md").write_text(markdown(meta, data))
    print(markdown(meta, data))
