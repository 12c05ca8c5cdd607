"""Soak run: thousands of steps of each scheduler with injected faults; nothing may diverge.

``python -m benchmarks soak`` trains a tiny Qwen3 causal LM with LoRA adapters on a noisy
synthetic token task (a random Markov chain; 10 % of the tokens replaced by noise) with AdamW,
once per scheduler — GraffScheduler with ``model=`` (LoRA blocks, curvature and entropy
probes), ReactorScheduler with ``model=``, BudgetScheduler — on a step budget, and injects on a
fixed schedule (the same steps for every scheduler):

* **NaN-loss steps**: the loss is NaN, so are the gradients; the optimizer step is skipped as
  ``torch.amp.GradScaler`` would skip it, and ``scheduler.step(nan)`` is still called;
* **NaN-gradient steps**: finite loss, NaN gradients, optimizer step skipped;
* **gradient spikes**: gradients × 1e4 on a step that is taken;
* **LR spikes**: someone writes ``lr × 1000`` into every parameter group after
  ``optimizer.step()``; the scheduler's next write must replace it.

Checked at every step (a violation aborts the run): every LR written to the optimizer is finite,
> 0 and inside ``[lr_min_factor, lr_max_factor] × initial_lr``. At the end: the training loss
is finite, no parameter is NaN, the scheduler's state has no NaN/inf (and it counted the
skipped steps). Measured for "overhead stays flat": the median wall time of a training step
and of ``scheduler.step()`` in the last quarter of the run over the first quarter, the process
RSS, and the bytes of tensors and the number of items in containers reachable from the
scheduler, first vs last quarter. Timing ratios are noisy on a shared machine; the invariants
are what :func:`run` asserts.
"""

from __future__ import annotations

import gc
import json
import math
import statistics
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import graff
from benchmarks.markdown import markdown_table
from benchmarks.meters import held_tensor_bytes
from benchmarks.tasks import REPO, tiny_qwen3

SCHEDULERS = ("graff", "reactor", "budget")


@dataclass(frozen=True)
class Faults:
    """Steps at which faults are injected: ``step % period == offset`` for each kind."""

    nan_loss: int = 97
    nan_grad: int = 131
    grad_spike: int = 151
    lr_spike: int = 173

    def kinds(self, step: int) -> list[str]:
        return [
            name for name, period in vars(self).items() if period and step % period == period // 2
        ]


class NoisyMarkovTask:
    """Token sequences from a fixed random Markov chain with 10 % noise tokens."""

    def __init__(self, vocab: int = 32, seq: int = 16, batch: int = 4, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.vocab, self.seq, self.batch = vocab, seq, batch
        self.next = torch.randint(0, vocab, (vocab, 2), generator=g)  # two likely successors
        self.gen = torch.Generator().manual_seed(seed + 1)

    def batch_ids(self) -> torch.Tensor:
        g = self.gen
        ids = torch.empty(self.batch, self.seq, dtype=torch.long)
        ids[:, 0] = torch.randint(0, self.vocab, (self.batch,), generator=g)
        for t in range(1, self.seq):
            pick = torch.randint(0, 2, (self.batch,), generator=g)
            ids[:, t] = self.next[ids[:, t - 1], pick]
        noise = torch.rand(ids.shape, generator=g) < 0.1
        return torch.where(noise, torch.randint(0, self.vocab, ids.shape, generator=g), ids)


def build(kind: str, steps: int, seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    """Tiny LoRA Qwen3, AdamW and the scheduler ``kind`` on a budget of ``steps`` steps."""
    import peft

    base = tiny_qwen3(vocab_size=32, hidden=32, layers=2, seq=16, seed=seed)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])
    model = peft.get_peft_model(base, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-3)
    budget = graff.BudgetClock(steps=steps)
    if kind == "graff":
        sched = graff.GraffScheduler(opt, budget, model=model)
    elif kind == "reactor":
        sched = graff.ReactorScheduler(opt, budget, model=model, prior="cosine", seed=seed)
    else:
        sched = graff.BudgetScheduler(opt, budget, prior="cosine")
    return model, opt, sched


def held_items(scheduler: Any) -> int:
    """Number of items in lists, dicts, sets and deques reachable from ``scheduler``.

    The model, the optimizer, modules, types and module globals are not followed (they are the
    user's). Growth of this count over a run is a leak of bookkeeping entries.
    """
    seen, stack, total = set(), [scheduler], 0
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, nn.Module | torch.optim.Optimizer | type | types.ModuleType):
            continue
        if isinstance(obj, torch.Tensor | types.FunctionType | types.BuiltinFunctionType):
            continue
        if isinstance(obj, list | dict | set | tuple | frozenset) or hasattr(obj, "maxlen"):
            total += len(obj)
        stack.extend(gc.get_referents(obj))
    return total


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096
    except OSError:  # not Linux
        return 0


def _check_lrs(opt: torch.optim.Optimizer, sched: Any, initial: list[float], step: int) -> None:
    lo, hi = sched.lr_min_factor, sched.lr_max_factor
    for lr, base in zip((float(g["lr"]) for g in opt.param_groups), initial, strict=True):
        if not (math.isfinite(lr) and lr > 0 and base * lo <= lr <= base * hi):
            raise AssertionError(f"step {step}: LR {lr!r} outside [{base * lo}, {base * hi}]")


def soak_one(
    kind: str, steps: int, faults: Faults = Faults(), seed: int = 0, samples: int = 8
) -> dict[str, Any]:
    """Run one scheduler for ``steps`` steps with faults; returns its measurements.

    Raises:
        AssertionError: if an invariant breaks (LR outside the clamp, NaN parameters, a NaN
            final loss or scheduler state).
    """
    torch.manual_seed(seed)
    model, opt, sched = build(kind, steps, seed)
    task = NoisyMarkovTask(seed=seed)
    initial = [float(g["initial_lr"]) for g in opt.param_groups]
    step_s, sched_s, losses = [], [], []
    memory: list[dict[str, int]] = []
    injected = dict.fromkeys(vars(faults), 0)
    skipped = 0
    every = max(1, steps // samples)
    for t in range(steps):
        kinds = faults.kinds(t)
        for k in kinds:
            injected[k] += 1
        t0 = time.perf_counter()
        ids = task.batch_ids()
        out = model(input_ids=ids, labels=ids)
        loss = out.loss * math.nan if "nan_loss" in kinds else out.loss
        loss.backward()
        grads = [p.grad for p in opt.param_groups[0]["params"] if p.grad is not None]
        if "nan_grad" in kinds:
            torch._foreach_mul_(grads, math.nan)
        if "grad_spike" in kinds:
            torch._foreach_mul_(grads, 1e4)
        finite = all(bool(torch.isfinite(g).all()) for g in grads)
        if finite:  # a GradScaler skips the optimizer step on non-finite gradients
            opt.step()
        skipped += not finite
        if "lr_spike" in kinds:
            for group in opt.param_groups:
                group["lr"] = group["lr"] * 1000.0
        t1 = time.perf_counter()
        sched.step(loss.detach())
        t2 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        step_s.append(time.perf_counter() - t0)
        sched_s.append(t2 - t1)
        _check_lrs(opt, sched, initial, t)
        value = float(loss.detach())
        if math.isfinite(value):
            losses.append(value)
        if t % every == 0 or t == steps - 1:
            memory.append(
                {
                    "step": t,
                    "rss_bytes": _rss_bytes(),
                    "held_tensor_bytes": held_tensor_bytes(sched, _user_ids(model, opt)),
                    "held_items": held_items(sched),
                }
            )
    injected["skipped_optimizer_steps"] = skipped
    return _summary(kind, steps, model, sched, step_s, sched_s, losses, memory, injected)


def _user_ids(model: nn.Module, opt: torch.optim.Optimizer) -> set[int]:
    ids = {id(p) for p in model.parameters()}
    for state in opt.state.values():
        ids |= {id(v) for v in state.values() if isinstance(v, torch.Tensor)}
    return ids


def _check_finite(state: Any, path: str) -> None:
    """Raise unless every float tensor and float in ``state`` (nested dicts/lists) is finite."""
    if isinstance(state, dict):
        for key, value in state.items():
            _check_finite(value, f"{path}.{key}")
    elif isinstance(state, list | tuple):
        for i, value in enumerate(state):
            _check_finite(value, f"{path}[{i}]")
    elif isinstance(state, torch.Tensor) and state.is_floating_point():
        if not bool(torch.isfinite(state).all()):
            raise AssertionError(f"{path} holds NaN or infinite values")
    elif isinstance(state, float) and math.isnan(state):
        raise AssertionError(f"{path} is NaN")


def _quarters(xs: list[float]) -> tuple[float, float]:
    q = max(1, len(xs) // 4)
    return statistics.median(xs[:q]), statistics.median(xs[-q:])


def _summary(kind, steps, model, sched, step_s, sched_s, losses, memory, injected):
    params_finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    final_loss = statistics.fmean(losses[-50:]) if losses else math.nan
    if not params_finite:
        raise AssertionError(f"{kind}: NaN parameters at the end of the soak")
    if not math.isfinite(final_loss):
        raise AssertionError(f"{kind}: final loss {final_loss!r} is not finite")
    _check_finite(sched.state_dict()["extra"], f"{kind} state")
    skipped = injected["skipped_optimizer_steps"]
    if sched.skipped_steps != skipped or sched.budget.steps != steps - skipped:
        raise AssertionError(
            f"{kind}: skipped_steps={sched.skipped_steps}, budget steps={sched.budget.steps}; "
            f"expected {skipped} and {steps - skipped}"
        )
    (t_first, t_last), (s_first, s_last) = _quarters(step_s), _quarters(sched_s)
    first, last = memory[1] if len(memory) > 2 else memory[0], memory[-1]
    return {
        "scheduler": kind,
        "steps": steps,
        "injected": injected,
        "skipped_steps": sched.skipped_steps,
        "nonfinite_losses": sched.nonfinite_losses,
        "first_loss": statistics.fmean(losses[:50]),
        "final_loss": final_loss,
        "final_lr": sched.get_last_lr(),
        "step_ms": {"first_quarter": 1e3 * t_first, "last_quarter": 1e3 * t_last},
        "step_time_ratio": t_last / t_first,
        "scheduler_step_ms": {"first_quarter": 1e3 * s_first, "last_quarter": 1e3 * s_last},
        "scheduler_step_time_ratio": s_last / s_first,
        "memory": memory,
        "rss_growth_bytes": last["rss_bytes"] - first["rss_bytes"],
        "held_tensor_bytes_growth": last["held_tensor_bytes"] - first["held_tensor_bytes"],
        "held_items_growth": last["held_items"] - first["held_items"],
    }


def run(
    steps: int = 3000,
    seed: int = 0,
    schedulers: tuple[str, ...] = SCHEDULERS,
    log: Callable = print,
) -> list[dict[str, Any]]:
    """Soak every scheduler in ``schedulers`` for ``steps`` steps (see module docstring)."""
    results = []
    for kind in schedulers:
        start = time.perf_counter()
        results.append(soak_one(kind, steps, seed=seed))
        log(f"{kind}: {steps} steps in {time.perf_counter() - start:.0f} s")
    return results


def write(results: list[dict[str, Any]], meta: dict[str, Any], out: Path) -> None:
    """``soak.json`` (everything) and ``soak.md`` (one table) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    lines = [
        "# Soak run",
        "",
        f"`{meta['command']}` at `{meta['git_commit'][:7]}`"
        f"{' (dirty)' if meta['git_dirty'] else ''}, {meta['date']}, "
        f"{meta['machine']['cpu_count']} CPU cores, torch {meta['machine']['torch']}, "
        f"{meta['wall_seconds']:.0f} s. Faults injected on the same steps for every scheduler "
        "(see `benchmarks/soak.py`). Every LR was finite and inside the clamp at every step. "
        "Time ratios are last-quarter median over first-quarter median; memory growth is from "
        "the second sample to the last (the first is taken before the probes allocate).",
        "",
    ]
    rows = [
        (
            r["scheduler"],
            r["steps"],
            " / ".join(
                str(r["injected"][k]) for k in ("nan_loss", "nan_grad", "grad_spike", "lr_spike")
            ),
            r["skipped_steps"],
            f"{r['first_loss']:.3f} → {r['final_loss']:.3f}",
            f"{r['step_ms']['first_quarter']:.2f} → {r['step_ms']['last_quarter']:.2f}",
            f"{r['step_time_ratio']:.2f}",
            f"{r['scheduler_step_ms']['first_quarter']:.3f} → "
            f"{r['scheduler_step_ms']['last_quarter']:.3f}",
            f"{r['scheduler_step_time_ratio']:.2f}",
            f"{r['rss_growth_bytes'] / 2**20:+.1f} MiB",
            f"{r['held_tensor_bytes_growth']:+d}",
            f"{r['held_items_growth']:+d}",
        )
        for r in results
    ]
    header = (
        "scheduler",
        "steps",
        "NaN-loss / NaN-grad / grad-spike / LR-spike steps",
        "skipped",
        "loss first → last 50",
        "step ms first → last quarter",
        "ratio",
        "scheduler.step() ms",
        "ratio",
        "RSS growth",
        "held tensor bytes growth",
        "held items growth",
    )
    lines += markdown_table(header, rows)
    (out / "soak.md").write_text("\n".join(lines) + "\n")


def main(args: Any) -> None:
    from benchmarks.meta import provenance

    torch.set_num_threads(1)
    out = Path(args.out or REPO / "benchmarks" / "results" / "soak")
    meta = provenance() | {"steps": args.steps, "seed": args.seed}
    start = time.perf_counter()
    results = run(args.steps, args.seed)
    meta["wall_seconds"] = time.perf_counter() - start
    write(results, meta, out)
    print(f"wrote {out}/soak.json and soak.md")
