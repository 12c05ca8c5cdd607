"""Per-step time and held memory of each scheduler on tiny Qwen3 LoRA tasks.

Every scheduler trains its own copy of the same LoRA model; one round times one full training
step (zero_grad, forward, backward, ``optimizer.step()``, ``scheduler.step(loss)``, probes
included) of every scheduler in a shuffled order, so machine noise hits all of them alike. The
reported ratio is the median over rounds of (step time / AdamW + cosine step time in the same
round), in wall-clock time and in the thread's CPU time (``time.thread_time``: not inflated when
other processes preempt this one, so steadier on a shared machine). The median leaves out the
rare steps that refresh λ̂; the mean ratio over all measured rounds and the worst step (the first
λ̂ estimate, at steps 10-11 for AdamW) are reported next to it. Memory: bytes of tensors
reachable from the scheduler object that are neither model parameters nor optimizer state
(planner, probe buffers, stored updates), maximum over steps, next to the bytes of one copy of
the trainable parameters.

Two configurations: the headline ``gsm8k_lora`` task of the suites (d 64, 2 layers, seq 160), all
schedulers; and a larger one (d 256, 4 layers, seq 256) for AdamW + cosine, GRAFF and its probes
alone (``prior_only``), since the ratio falls as the step grows (real steps are far longer).

Third, the λ̂ estimates amortised without interleaving (:func:`amortised`): whole runs of GRAFF
and of AdamW + cosine, each alone in the process, alternated a few times; the total CPU-time
ratio with every estimate included, and with the cold start's estimates subtracted.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import overhead_tasks
from benchmarks.loop import advance
from benchmarks.markdown import markdown_table
from benchmarks.meters import ColdStartMeter, CpuMeter, held_tensor_bytes, user_tensor_ids
from benchmarks.schedulers import BASELINES, CLOCK_ONLY, GRAFF_VARIANTS, make
from benchmarks.tasks import REPO, LoraTask

REFERENCE = "cosine"
SCHEDULERS = (*BASELINES, "reactor", *(v for v in GRAFF_VARIANTS if v not in CLOCK_ONLY))
LARGER = {"hidden": 256, "layers": 4, "prompt_chars": 96, "answer_chars": 160}
LARGER_SCHEDULERS = ("cosine", "prior_only", "graff")
AMORTISED = ("graff",)  # schedulers of the non-interleaved amortised measurement
AMORTISED_STEPS = 150  # steps of each run alone (keeps the whole command under ~10 min)
AMORTISED_REPEATS = 3  # runs of each scheduler, alternating with cosine


def measure(
    task: LoraTask,
    rounds: int,
    warmup: int = 5,
    seed: int = 0,
    schedulers: tuple[str, ...] = SCHEDULERS,
) -> dict[str, Any]:
    steps = rounds + warmup
    task.steps = steps
    runs: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    with CpuMeter() as meter:
        _interleave(task, runs, skipped, schedulers, steps, warmup, seed, meter)
    return _summarise(task, runs, skipped, rounds, warmup, steps, meter)


def _interleave(
    task: LoraTask,
    runs: dict[str, dict[str, Any]],
    skipped: dict[str, str],
    schedulers: tuple[str, ...],
    steps: int,
    warmup: int,
    seed: int,
    meter: CpuMeter,
) -> None:
    """Build every scheduler's run, then time ``steps`` rounds in a shuffled order each."""
    for name in schedulers:
        model = task.build(seed)
        setup = make(name, model, 1e-3, steps, seed=seed, loss_fn=task.probe_loss_fn(model))
        runs[name] = {
            "model": model,
            "setup": setup,
            "gen": torch.Generator().manual_seed(seed),
            "wall": [],
            "cpu": [],
            "bytes": 0,
        }
    from tqdm import tqdm

    order = list(runs)
    rng = random.Random(seed)
    for r in tqdm(
        range(steps), desc=f"overhead {task.name} (d {task.hidden}): rounds", leave=False
    ):
        rng.shuffle(order)
        for name in list(order):
            run = runs[name]
            try:
                wall, cpu = _timed_step(task, run)
            except Exception as err:
                skipped[name] = f"{type(err).__name__}: {err}"
                order.remove(name)
                del runs[name]
                continue
            if r >= warmup:
                run["wall"].append(wall)
                run["cpu"].append(cpu)
            if r == warmup - 1 and run["setup"].scheduler is not None:
                run["meter_start"] = meter.of(run["setup"].scheduler)
                run["parts_start"] = meter.parts_of(run["setup"].scheduler)
            if r >= warmup and (r - warmup) % 10 == 0:
                excl = user_tensor_ids(run["model"], run["setup"].optimizer)
                run["bytes"] = max(run["bytes"], held_tensor_bytes(run["setup"].scheduler, excl))


def _summarise(
    task: LoraTask,
    runs: dict[str, dict[str, Any]],
    skipped: dict[str, str],
    rounds: int,
    warmup: int,
    steps: int,
    meter: CpuMeter,
) -> dict[str, Any]:
    trainable = sum(
        p.numel() * p.element_size()
        for p in runs[REFERENCE]["model"].parameters()
        if p.requires_grad
    )
    ref_wall, ref_cpu = np.array(runs[REFERENCE]["wall"]), np.array(runs[REFERENCE]["cpu"])
    results = {}
    for name, run in runs.items():
        wall, cpu = np.array(run["wall"]), np.array(run["cpu"])
        worst = int(np.argmax(wall))
        results[name] = {
            "median_step_ms": float(np.median(wall) * 1e3),
            "ratio_to_cosine": float(np.median(wall / ref_wall)),
            "overhead_percent": float((np.median(wall / ref_wall) - 1.0) * 100.0),
            "cpu_overhead_percent": float((np.median(cpu / ref_cpu) - 1.0) * 100.0),
            "mean_overhead_percent": float((wall.sum() / ref_wall.sum() - 1.0) * 100.0),
            "worst_step": warmup + worst + 1,
            "worst_step_ms": float(wall[worst] * 1e3),
            "worst_in_cosine_steps": float(wall[worst] / np.median(ref_wall)),
            "held_tensor_bytes": int(run["bytes"]),
            "held_in_trainable_copies": run["bytes"] / trainable,
        }
        sched = run["setup"].scheduler
        if sched is not None and "meter_start" in run:
            hooks, estimate = meter.of(sched)
            hooks0, estimate0 = run["meter_start"]
            start = run["parts_start"]
            results[name]["direct_parts_us"] = {
                label: (value - start.get(label, 0.0)) / rounds * 1e6
                for label, value in sorted(meter.parts_of(sched).items())
            }
            ref_cpu_median = float(np.median(ref_cpu))
            results[name]["direct_us_per_step"] = (hooks - hooks0) / rounds * 1e6
            results[name]["direct_percent"] = (hooks - hooks0) / rounds / ref_cpu_median * 100
            results[name]["lambda_seconds"] = estimate - estimate0
            results[name]["lambda_percent"] = (estimate - estimate0) / rounds / ref_cpu_median * 100
        probe = getattr(sched, "curvature", None)
        if probe is not None:
            results[name]["lambda_estimates"] = probe.n_estimates
            results[name]["lambda_interval"] = probe.interval
    _add_net(results, float(np.median(ref_cpu)))
    return {
        "results": results,
        "skipped": skipped,
        "rounds": rounds,
        "warmup": warmup,
        "reference": REFERENCE,
        "trainable_bytes": trainable,
        "task": {
            "hidden": task.hidden,
            "layers": task.layers,
            "seq": task.prompt_chars + task.answer_chars,
            "batch": task.batch,
            "rank": task.rank,
        },
    }


def _add_net(results: dict[str, dict[str, Any]], ref_cpu_median: float) -> None:
    """Direct cost net of the reference's own ``scheduler.step()`` (which GRAFF replaces)."""
    ref_step = results.get(REFERENCE, {}).get("direct_us_per_step", 0.0)
    for name, r in results.items():
        if "direct_us_per_step" in r and name != REFERENCE:
            r["reference_step_us"] = ref_step  # cosine's own scheduler.step(), per step
            r["net_us_per_step"] = r["direct_us_per_step"] - ref_step
            r["net_percent"] = r["net_us_per_step"] / 1e6 / ref_cpu_median * 100


def amortised(
    task: LoraTask,
    steps: int = AMORTISED_STEPS,
    repeats: int = AMORTISED_REPEATS,
    seed: int = 0,
    schedulers: tuple[str, ...] = AMORTISED,
) -> dict[str, Any]:
    """Whole runs alone, not interleaved: each scheduler's total CPU time over ``steps`` steps.

    ``repeats`` times, a fresh AdamW + cosine run of ``steps`` steps and a fresh run of each
    scheduler, one after the other (the order alternates between repeats), each alone in the
    process, so the probe's ``auto`` λ̂ interval sees this scheduler's own step time. Reported:
    the median over repeats of (total thread-CPU time / cosine's in the same repeat) − 1, with
    every λ̂ estimate included (cold start too), and with the cold start's CPU time subtracted;
    the number of estimates and the final interval. The model is built outside the timed loop.
    """
    task.steps = steps
    totals: dict[str, list[dict[str, float]]] = {name: [] for name in (REFERENCE, *schedulers)}
    from tqdm import tqdm

    with ColdStartMeter() as meter:
        for r in tqdm(range(repeats), desc="overhead: runs alone", leave=False):
            order = [REFERENCE, *schedulers]
            if r % 2:
                order.reverse()
            for name in order:
                model = task.build(seed)
                setup = make(name, model, 1e-3, steps, seed=seed, loss_fn=task.probe_loss_fn(model))
                run = {"model": model, "setup": setup, "gen": torch.Generator().manual_seed(seed)}
                wall = cpu = 0.0
                for _ in range(steps):
                    w, c = _timed_step(task, run)
                    wall, cpu = wall + w, cpu + c
                probe = getattr(setup.scheduler, "curvature", None)
                key = id(probe)
                totals[name].append(
                    {
                        "wall": wall,
                        "cpu": cpu,
                        "cold": meter.cold.pop(key, 0.0),
                        "refresh": meter.refresh.pop(key, 0.0),
                        "estimates": getattr(probe, "n_estimates", 0),
                        "interval": getattr(probe, "interval", 0),
                        "refresh_s": getattr(probe, "refresh_seconds", None),
                        "estimate_share": probe.estimator.estimate_share()
                        if probe is not None
                        else None,
                    }
                )
                if hasattr(setup.scheduler, "remove"):
                    setup.scheduler.remove()
    ref = totals[REFERENCE]
    results = {}
    for name in schedulers:
        runs = totals[name]
        incl = [x["cpu"] / c["cpu"] - 1.0 for x, c in zip(runs, ref, strict=True)]
        excl = [(x["cpu"] - x["cold"]) / c["cpu"] - 1.0 for x, c in zip(runs, ref, strict=True)]
        wall = [x["wall"] / c["wall"] - 1.0 for x, c in zip(runs, ref, strict=True)]
        results[name] = {
            "cpu_overhead_percent": float(np.median(incl) * 100),
            "cpu_overhead_no_cold_start_percent": float(np.median(excl) * 100),
            "wall_overhead_percent": float(np.median(wall) * 100),
            "cold_start_cpu_s": float(np.median([x["cold"] for x in runs])),
            "refresh_cpu_s": float(np.median([x["refresh"] for x in runs])),
            "estimates": int(np.median([x["estimates"] for x in runs])),
            "final_interval": int(np.median([x["interval"] for x in runs])),
            **_long_run(runs, ref, steps),
        }
    return {
        "results": results,
        "steps": steps,
        "repeats": repeats,
        "reference_cpu_s": float(np.median([c["cpu"] for c in ref])),
    }


def _long_run(
    runs: list[dict[str, Any]], ref: list[dict[str, float]], steps: int
) -> dict[str, float]:
    """The scheduled λ̂ refreshes' share of a long run: one refresh per ``auto`` interval.

    Per repeat: (projected seconds of one refresh) / (the final ``auto`` interval × cosine's
    mean wall step in the same repeat); the median over repeats, in percent. This is what the
    refreshes cost once the cold start is paid off, the part of the overhead a 150-step run
    cannot show (its interval outlasts the run); ``estimate_share`` is the fraction of the step
    the ``auto`` rule meant to give them (``LambdaMaxEstimator.estimate_share``).
    """
    shares = [
        x["refresh_s"] / (x["interval"] * c["wall"] / steps) * 100
        for x, c in zip(runs, ref, strict=True)
        if x.get("refresh_s") and x.get("interval")
    ]
    if not shares:
        return {}
    targets = [x["estimate_share"] * 100 for x in runs if x.get("estimate_share") is not None]
    return {
        "long_run_refresh_percent": float(np.median(shares)),
        "estimate_share_percent": float(np.median(targets)) if targets else float("nan"),
        "refresh_s": float(np.median([x["refresh_s"] for x in runs if x.get("refresh_s")])),
    }


def _amortised_table(data: dict[str, Any]) -> list[str]:
    lines = [
        f"{data['repeats']} repeats of {data['steps']} steps, each run alone (cosine's median "
        f"total: {data['reference_cpu_s']:.1f} s CPU).",
        "",
    ]
    rows = []
    for name, r in data["results"].items():
        long_run = (
            (
                f"{r['refresh_s']:.2f}",
                f"{r['long_run_refresh_percent']:.2f} %",
                f"{r['estimate_share_percent']:.2f} %",
            )
            if "long_run_refresh_percent" in r
            else ("—", "—", "—")
        )
        rows.append(
            (
                name,
                f"{r['cpu_overhead_percent']:+.1f} %",
                f"{r['cpu_overhead_no_cold_start_percent']:+.1f} %",
                f"{r['wall_overhead_percent']:+.1f} %",
                f"{r['cold_start_cpu_s']:.2f}",
                f"{r['refresh_cpu_s']:.2f}",
                r["estimates"],
                r["final_interval"],
                *long_run,
            )
        )
    header = (
        "scheduler",
        "overhead (CPU, all λ̂ estimates)",
        "overhead (CPU, cold start excluded)",
        "overhead (wall)",
        "cold start (CPU s)",
        "refreshes (CPU s)",
        "estimates",
        "final interval",
        "one refresh (s)",
        "refreshes, long run",
        "share the `auto` rule left them",
    )
    lines += markdown_table(header, rows)
    return lines


def steady_state(data: dict[str, Any], name: str = "graff") -> dict[str, float] | None:
    """Per-step cost of a long run: the direct cost (interleaved, headline task) plus the
    scheduled λ̂ refreshes at the interval the ``auto`` rule chose in the runs alone."""
    direct = data.get("headline", {}).get("results", {}).get(name, {}).get("net_percent")
    refresh = data.get("amortised", {}).get("results", {}).get(name, {})
    if direct is None or "long_run_refresh_percent" not in refresh:
        return None
    lam = refresh["long_run_refresh_percent"]
    return {"direct_percent": direct, "refresh_percent": lam, "total_percent": direct + lam}


def _timed_step(task: LoraTask, run: dict[str, Any]) -> tuple[float, float]:
    setup, model = run["setup"], run["model"]
    start, cpu = time.perf_counter(), time.thread_time()
    setup.train_mode()
    setup.optimizer.zero_grad(set_to_none=True)
    loss = task.train_loss(model, run["gen"])
    loss.backward()
    setup.optimizer.step()
    advance(setup, loss)
    return time.perf_counter() - start, time.thread_time() - cpu


def _table(data: dict[str, Any]) -> list[str]:
    t = data["task"]
    lines = [
        f"d {t['hidden']}, {t['layers']} layers, seq {t['seq']}, batch {t['batch']}, LoRA r "
        f"{t['rank']}; {data['rounds']} rounds after {data['warmup']} warm-up rounds; one copy of "
        f"the trainable parameters = {data['trainable_bytes'] / 1024:.0f} KiB.",
        "",
    ]
    rows = []
    for name, r in sorted(data["results"].items(), key=lambda kv: kv[1]["ratio_to_cosine"]):
        direct = (
            f"{r['net_percent']:.2f} % ({r['net_us_per_step']:.0f} µs; gross "
            f"{r['direct_us_per_step']:.0f} µs)"
            if "net_percent" in r
            else "—"
        )
        rows.append(
            (
                name,
                f"{r['median_step_ms']:.1f}",
                f"{r['overhead_percent']:+.1f} %",
                f"{r['cpu_overhead_percent']:+.1f} %",
                direct,
                f"{r['lambda_percent']:.1f} %" if r.get("lambda_seconds") else "—",
                f"{r['mean_overhead_percent']:+.1f} %",
                f"{r['worst_in_cosine_steps']:.1f} (step {r['worst_step']})",
                f"{r['held_tensor_bytes'] / 1024:.1f}",
                f"{r['held_in_trainable_copies']:.2f}",
            )
        )
    header = (
        "scheduler",
        "median step (ms)",
        "overhead (wall)",
        "overhead (CPU)",
        "direct, per step",
        "λ̂ estimates, amortised",
        "mean overhead (all steps)",
        "worst step (× cosine median)",
        "held memory (KiB)",
        "held / trainable",
    )
    lines += markdown_table(header, rows)
    graff = data["results"].get("graff", {}).get("direct_parts_us")
    if graff:
        parts = ", ".join(f"`{k}` {v:.0f} µs" for k, v in graff.items() if k != "LRScheduler.step")
        lines += [
            "",
            f"GRAFF's direct cost per step by part (nested: `step()` includes the planner): {parts}.",
        ]
    for name, why in data["skipped"].items():
        lines.append(f"\n- `{name}` not measured: {why.splitlines()[0][:200]}")
    return lines


def markdown(meta: dict[str, Any], data: dict[str, Any]) -> str:
    lines = [
        "# graff benchmark — per-step overhead on tiny Qwen3 LoRA tasks",
        "",
        f"Command: `{meta['command']}` · commit `{meta['git_commit']}` (dirty: {meta['git_dirty']})"
        f" · {meta['date']} · {meta['machine']['cpu_count']} CPUs "
        f"({meta['machine'].get('cpu', 'CPU not recorded')}), 1 torch thread.",
        "",
        "Overhead (wall, CPU): median over interleaved rounds of (step time / AdamW + cosine step "
        "time in the same round) − 1, a whole training step, probes included, in wall-clock and "
        "in thread CPU time. Direct: thread CPU time spent inside graff's hooks and `step()` per "
        "step, λ̂ estimates excluded, net of the reference's own `scheduler.step()` (LambdaLR, "
        "which GRAFF replaces; gross = without that subtraction), / cosine's median CPU step "
        "(the least noisy reading of the per-step overhead). λ̂ estimates, amortised: their CPU time over the measured rounds / "
        "(rounds × cosine's median CPU step); interleaving inflates the step time the probe's "
        "`auto` interval sees, so refreshes come more often here than in a real run. Mean: total "
        "wall time over all measured rounds / cosine's − 1. Worst step: the slowest measured step "
        "in units of cosine's median step. Held memory: tensor bytes the scheduler keeps (max "
        "over steps), excluding the model and the optimizer state.",
        "",
        "## Headline: the `gsm8k_lora` task",
        "",
        *_table(data["headline"]),
        "",
        "## Larger tiny-Qwen3 LoRA configuration",
        "",
        *_table(data["larger"]),
    ]
    if "amortised" in data:
        lines += [
            "",
            "## λ̂ estimates amortised, runs alone (headline task)",
            "",
            "Not interleaved: the interleaved table's amortised λ̂ column is inflated, because the "
            "probe's `auto` interval sees the other schedulers' steps. Here each run is alone; "
            "overhead = median over repeats of (total thread-CPU time of the run / AdamW + "
            "cosine's in the same repeat) − 1, every λ̂ estimate included (the cold start and "
            "the refreshes GraffScheduler asks for), and with the cold start's CPU time "
            "subtracted.",
            "",
            *_amortised_table(data["amortised"]),
        ]
    total = steady_state(data)
    if total is not None:
        lines += [
            "",
            "## Steady state: the whole per-step overhead of a long run (headline task)",
            "",
            f"GRAFF direct {total['direct_percent']:.2f} % (hooks and `step()`, interleaved "
            f"table) + scheduled λ̂ refreshes {total['refresh_percent']:.2f} % (one per `auto` "
            f"interval, runs alone) = **{total['total_percent']:.2f} %** of cosine's step. Not "
            "included: the one-off cold start (table above) and the extra refreshes the peak "
            "search may ask for while it runs (`GraffConfig.refresh_allowance`, at most 10 % of the projected "
            "run, in the 'refreshes (CPU s)' column).",
        ]
    if "every_task" in data:
        lines += [
            "",
            "## Steady state on every task, runs alone",
            "",
            *overhead_tasks.markdown(data["every_task"]),
        ]
    return "\n".join(lines) + "\n"


def main(args: Any) -> None:
    from benchmarks.meta import provenance
    from benchmarks.report import sanitize

    torch.set_num_threads(1)
    out = Path(args.out or REPO / "benchmarks" / "results" / "overhead")
    out.mkdir(parents=True, exist_ok=True)
    data_dir = Path(args.data_dir) if args.data_dir else None
    meta = provenance()
    task = LoraTask(steps=1, pretrain_steps=50)
    task.setup(data_dir)
    data = {"headline": measure(task, args.rounds)}
    larger = LoraTask(steps=1, pretrain_steps=20, **LARGER)
    larger.setup(data_dir)
    data["larger"] = measure(larger, args.larger_rounds, schedulers=LARGER_SCHEDULERS)
    data["amortised"] = amortised(
        task,
        steps=args.amortised_steps,
        repeats=args.amortised_repeats,
    )
    data["every_task"] = overhead_tasks.measure(data_dir)
    (out / "overhead.json").write_text(json.dumps(sanitize({"meta": meta, **data}), indent=1))
    (out / "overhead.md").write_text(markdown(meta, data))
    print(markdown(meta, data))
