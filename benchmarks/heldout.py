"""Does a measured λ̂ ever make GRAFF worse than no λ̂ at all? (issue 18's held-out finding)

``python -m benchmarks heldout`` trains GRAFF twice on every cell — once with ``model=`` and
``loss_fn=`` (the guard has a real λ̂: "λ̂ on") and once with neither (no way to measure λ̂:
"λ̂ off") — on tasks the benchmark never uses: the task family of ``metatrain/`` (random Markov
and grammar languages, algorithmic sequences, tabular and synthetic-image data; tiny Llama,
LoRA, MLP, CNN), AdamW and SGD with momentum, at the family's default LR × {0.1, 1, 10}, plus the
benchmark's char transformer (``gsm8k_qwen3``, 300 steps) where the finding was reproduced.

Each run appends one compact JSON line to ``OUT/runs.jsonl``, which records the commit of
the code that ran it. A rerun resumes: it keeps the runs of the same commit of clean code (as
``benchmarks run`` does) and runs only the rest; ``--fresh``, another commit or uncommitted
changes to ``graff/`` or ``benchmarks/`` start over, so one summary never mixes two versions
of the code. ``OUT/summary.md`` counts, per optimizer and data family, the cells where λ̂ on
is better / worse / level (1 % of the final validation loss) than λ̂ off, with the median and the
worst log ratio. ``--graff-kwargs`` (``GraffConfig`` fields) tries another rule without editing
graff; its value is recorded in every line.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import statistics
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

COMBOS = (
    ("markov", "transformer"),
    ("markov", "lora"),
    ("algorithmic", "transformer"),
    ("algorithmic", "lora"),
    ("pcfg", "transformer"),
    ("pcfg", "lora"),
    ("tabular", "mlp"),
    ("shapes", "cnn"),
)
FACTORS = (0.1, 1.0, 10.0)
STEPS = 200
CHAR_STEPS = 300
TIE = 0.01  # |log ratio| below this is a tie (1 %)
MAX_BAD_STEPS = 20


def _scheduler(opt: Any, steps: int, model: Any, loss_fn: Any, seed: int, kwargs: dict) -> Any:
    from benchmarks.schedulers import graff_arguments
    from graff import BudgetClock, GraffScheduler
    from graff.errors import ProbeWarning

    clock = BudgetClock(steps=steps, measure_energy=False)
    extra = graff_arguments(kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ProbeWarning)
        if loss_fn is None:
            return GraffScheduler(opt, clock, seed=seed, **extra)
        return GraffScheduler(opt, clock, model=model, loss_fn=loss_fn, seed=seed, **extra)


def _train(task: Any, model: Any, opt: Any, sched: Any, steps: int, gen: Any) -> dict[str, Any]:
    lrs, bad = [], 0
    try:
        for _ in range(steps):
            loss = task.train_loss(model, gen)
            if not torch.isfinite(loss):
                bad += 1
                if bad >= MAX_BAD_STEPS:
                    return {"final": math.inf, "lr_max": max(lrs, default=0.0)}
                opt.zero_grad(set_to_none=True)
                continue
            bad = 0
            loss.backward()
            opt.step()
            sched.step(loss.detach())
            opt.zero_grad(set_to_none=True)
            lrs.append(opt.param_groups[0]["lr"])
    finally:
        sched.remove()
    return {
        "final": task.val_loss(model),
        "lr_max": max(lrs),
        "lr_end_search": lrs[int(0.15 * len(lrs))] if lrs else 0.0,
    }


def lr_jitter(cell: dict[str, Any]) -> float:
    """The factor on the cell's LR (``--lr-jitter``; 1 by default): a butterfly control."""
    return float(cell.get("lr_jitter", 1.0))


def cell_steps(cell: dict[str, Any]) -> int:
    """The step budget of a metatrain-family cell (``--steps``; :data:`STEPS` by default)."""
    return int(cell.get("steps", STEPS))


def run_cell(cell: dict[str, Any]) -> dict[str, Any]:
    """One training run of a cell (``lam`` True: λ̂ on); never raises."""
    torch.set_num_threads(1)
    start = time.perf_counter()
    out = dict(cell)
    try:
        kwargs = cell.get("graff_kwargs") or {}
        if cell["family"] == "char":
            out.update(_run_char(cell, kwargs))
        else:
            task, model, opt, sched, gen = _build(cell, kwargs)
            out.update(_train(task, model, opt, sched, cell_steps(cell), gen))
        out["status"] = "ok"
    except Exception as err:  # recorded, never raised: one bad cell must not stop the sweep
        out.update(status="error", error=f"{type(err).__name__}: {err}")
    out["seconds"] = round(time.perf_counter() - start, 2)
    return out


def _build(cell: dict[str, Any], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """Task, model, optimizer, GraffScheduler and data generator of a metatrain-family cell."""
    from metatrain.tasks import DEFAULT_LR, make_optimizer, make_task

    task = make_task(cell["family"], cell["arch"], cell["seed"])
    model = task.build(cell["seed"])
    lr = DEFAULT_LR[(cell["arch"], cell["optimizer"])] * cell["factor"] * lr_jitter(cell)
    opt = make_optimizer(cell["arch"], cell["optimizer"], lr, model)
    loss_fn = task.probe_loss_fn(model) if cell["lam"] else None
    sched = _scheduler(opt, cell_steps(cell), model, loss_fn, cell["seed"], kwargs)
    return task, model, opt, sched, torch.Generator().manual_seed(cell["seed"])


def trace_cell(cell: dict[str, Any], every: int = 10) -> tuple[list[dict[str, Any]], float]:
    """One metatrain-family cell step by step, to see *why* λ̂ helps or hurts there.

    Returns a row every ``every`` steps, and at every step from the first λ̂ to five steps after
    the search's end (where the decisions are made): the step's loss, the LR as a factor of the user's, λ̂,
    the guard's bound as an LR factor, the search's peak factor and whether it still searches,
    the extra λ̂ refreshes so far — and the final validation loss. Same run as the sweep's.

    Rows where the curvature probe took a new sample (every ``probe_every`` steps) also carry
    the one-step signals of that update Δθ_t, summed over blocks (:func:`one_step_signals`): the
    hypergradient cosine κ = cos(g_{t+1}, Δθ_t) (positive: the step overshot along its
    direction) and the secant ratio q = ⟨g_{t+1} − g_t, Δθ_t⟩ / (−⟨g_t, Δθ_t⟩) (1: the
    line-search optimum of a quadratic along the step; 2: the edge of stability). They show
    whether a one-step signal could tell a rise that helps from one that hurts.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as run_cell: other thread counts reorder reductions
    task, model, opt, sched, gen = _build(cell, cell.get("graff_kwargs") or {})
    user_lr = opt.param_groups[0]["initial_lr"]
    steps = cell_steps(cell)
    rows = []
    sampled = None  # step of the last probe sample reported
    try:
        for step in range(1, steps + 1):
            loss = task.train_loss(model, gen)
            loss.backward()
            opt.step()
            sched.step(loss.detach())
            opt.zero_grad(set_to_none=True)
            plan, search = sched.last_plan, sched.peak_search
            if step % every and (step > 0.15 * steps + 5 or sched.curvature.lambda_max is None):
                continue
            stats = sched.curvature.last
            signals, grad_norm = (None, None), None
            if stats is not None and stats.step != sampled:
                sampled, signals = stats.step, one_step_signals(stats)
                grad_norm = math.sqrt(float(stats.grad_sq_norm.sum()))
            rows.append({
                "step": step, "loss": float(loss.detach()), "lr_factor": opt.param_groups[0]["lr"] / user_lr,
                "lambda_max": sched.curvature.lambda_max,
                "bound_factor": None if plan.guard_bound is None else math.exp(plan.guard_bound),
                "peak_factor": math.exp(search.log_peak), "searching": search.searching,
                "refreshes": search.allowance.count,
                "hyper_cosine": signals[0], "secant_ratio": signals[1], "grad_norm": grad_norm,
            })  # fmt: skip
        final = task.val_loss(model)
    finally:
        sched.remove()
        torch.set_num_threads(threads)
    return rows, final


def one_step_signals(stats: Any) -> tuple[float, float | None]:
    """``(κ, q)`` of one :class:`~graff.probes.CurvatureStats` sample, summed over blocks.

    ``κ = ⟨g_{t+1}, Δθ_t⟩ / (‖g_{t+1}‖ ‖Δθ_t‖)`` (the planner's whole-model cosine,
    :func:`graff.planner.features.window_cosines`); ``q = ⟨g_{t+1} − g_t, Δθ_t⟩ / (−⟨g_t, Δθ_t⟩)``,
    None unless the update was a descent direction (``⟨g_t, Δθ_t⟩ < 0``).
    """
    from graff.planner.features import cosine

    hyper, gdu = float(stats.hypergrad.sum()), float(stats.grad_dot_update.sum())
    kappa = cosine(torch.tensor(hyper), stats.grad_sq_norm.sum(), stats.update_sq_norm.sum()).item()
    return kappa, ((hyper - gdu) / -gdu if gdu < 0 else None)


def trace_markdown(cell: dict[str, Any], rows: list[dict[str, Any]], final: float) -> str:
    """:func:`trace_cell` as a markdown table."""

    def num(x: float | None, fmt: str) -> str:
        return "—" if x is None else format(x, fmt)

    lam = "on" if cell["lam"] else "off"
    lines = [
        f"{cell['optimizer']} {cell['family']}/{cell['arch']} × {cell['factor']:g} seed "
        f"{cell['seed']}, λ̂ {lam}: final validation loss {final:.4g}",
        "",
        "| step | loss | LR (× user's) | λ̂ | guard bound (× user's) | peak | searching | refreshes "
        "| κ (sample) | q (sample) | ‖g‖ (sample) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['step']} | {r['loss']:.4f} | {r['lr_factor']:.3f} | "
            f"{num(r['lambda_max'], '.4g')} | {num(r['bound_factor'], '.3f')} | "
            f"{r['peak_factor']:.3f} | {'yes' if r['searching'] else 'no'} | {r['refreshes']} | "
            f"{num(r.get('hyper_cosine'), '+.3f')} | {num(r.get('secant_ratio'), '.2f')} | "
            f"{num(r.get('grad_norm'), '.3g')} |"
        )
    return "\n".join(lines) + "\n"


_CHAR: dict[str, Any] = {}


def _run_char(cell: dict[str, Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    from benchmarks.schedulers import build_optimizer
    from benchmarks.suites import DEFAULT_LR, WEIGHT_DECAY, build_task

    if "task" not in _CHAR:
        task = build_task("gsm8k_qwen3", {"steps": CHAR_STEPS})
        task.setup(Path(cell["data_dir"]) if cell.get("data_dir") else None)
        _CHAR["task"] = task
    task = _CHAR["task"]
    model = task.build(cell["seed"])
    params = [p for p in model.parameters() if p.requires_grad]
    lr = DEFAULT_LR * cell["factor"] * lr_jitter(cell)
    opt = build_optimizer("adamw", params, lr, WEIGHT_DECAY)
    loss_fn = task.probe_loss_fn(model) if cell["lam"] else None
    sched = _scheduler(opt, CHAR_STEPS, model, loss_fn, cell["seed"], kwargs)
    gen = torch.Generator().manual_seed(1000 + cell["seed"])
    return _train(task, model, opt, sched, CHAR_STEPS, gen)


def cells(
    seeds: list[int],
    optimizers: list[str],
    char_seeds: list[int],
    kwargs: dict,
    data_dir: Any,
    steps: int = STEPS,
    jitter: float = 1.0,
) -> list[dict[str, Any]]:
    """Every run of the sweep (both λ̂ settings of every cell, the char transformer first: the
    slowest runs start early)."""
    out = []
    for seed in char_seeds:
        for lam in (True, False):
            out.append({"family": "char", "arch": "qwen3", "optimizer": "adamw", "factor": 1.0,
                        "seed": seed, "lam": lam, "data_dir": data_dir})  # fmt: skip
    for seed in seeds:
        for optimizer in optimizers:
            for family, arch in COMBOS:
                for factor in FACTORS:
                    for lam in (True, False):
                        out.append({"family": family, "arch": arch, "optimizer": optimizer,
                                    "factor": factor, "seed": seed, "lam": lam})  # fmt: skip
    for cell in out:
        cell["graff_kwargs"] = kwargs
        if steps != STEPS and cell["family"] != "char":
            cell["steps"] = steps
        if jitter != 1.0:
            cell["lr_jitter"] = jitter
    return out


def _line(row: dict[str, Any]) -> str:
    return json.dumps(row, separators=(",", ":")) + "\n"


def kept_rows(path: Path, resume_key: str | None) -> list[dict[str, Any]]:
    """The finished runs of ``path`` (a sweep's ``runs.jsonl``) that a rerun keeps.

    Those written under ``resume_key`` (the commit of clean code) that ended ``ok``; nothing
    when ``resume_key`` is None (``--fresh`` or uncommitted changes). A torn last line (a sweep
    killed while writing) is ignored.
    """
    from benchmarks.meta import runs_of_commit

    return list({_key(row): row for row in runs_of_commit(path, resume_key, ("ok",))}.values())


def _key(cell: dict[str, Any], lam: bool = True) -> str:
    names = ("family", "arch", "optimizer", "factor", "seed")
    values = [cell[k] for k in names] + [cell.get("graff_kwargs") or {}]
    if cell_steps(cell) != STEPS:  # a sweep at another budget (``--steps``)
        values.append(cell["steps"])
    if lr_jitter(cell) != 1.0:  # a butterfly control (``--lr-jitter``)
        values.append({"lr_jitter": lr_jitter(cell)})
    return json.dumps(values + ([cell["lam"]] if lam else []), sort_keys=True)


def pairs(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """(λ̂ on, λ̂ off) of every cell both finished: the log ratio on/off (< 0: λ̂ helped)."""
    by: dict[tuple[str, bool], dict[str, Any]] = {}
    for row in rows:
        if row.get("status") == "ok":
            by[_key(row, lam=False), row["lam"]] = row
    out = []
    for (key, lam), on in by.items():
        off = by.get((key, False))
        if not lam or off is None:
            continue
        a, b = on["final"], off["final"]
        ratio = math.log(a / b) if math.isfinite(a) and math.isfinite(b) and a > 0 < b else (
            math.inf if not math.isfinite(a) else -math.inf if not math.isfinite(b) else 0.0
        )  # fmt: skip
        out.append({**{k: on[k] for k in ("family", "arch", "optimizer", "factor", "seed")},
                    "on": a, "off": b, "log_ratio": ratio,
                    "lr_max_on": on.get("lr_max"), "lr_max_off": off.get("lr_max")})  # fmt: skip
    return out


def summary(rows: list[dict[str, Any]]) -> str:
    """Markdown: per optimizer × family, λ̂ on vs off wins / losses / ties, median and worst."""
    ps = pairs(rows)
    lines = [
        "| optimizer | family | cells | λ̂ on better | worse | level (1 %) | median log(on/off) "
        "| worst |",
        "|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, str], list[float]] = {}
    for p in ps:
        groups.setdefault((p["optimizer"], p["family"]), []).append(p["log_ratio"])
        groups.setdefault((p["optimizer"], "all"), []).append(p["log_ratio"])
    for (opt, fam), values in sorted(groups.items()):
        win = sum(v < -TIE for v in values)
        loss = sum(v > TIE for v in values)
        lines.append(
            f"| {opt} | {fam} | {len(values)} | {win} | {loss} | {len(values) - win - loss} "
            f"| {statistics.median(values):+.3f} | {max(values):+.3f} |"
        )
    worst = sorted(ps, key=lambda p: -p["log_ratio"])[:8]
    lines += ["", "Worst cells (λ̂ on / off, largest LR on / off):", ""]
    for p in worst:
        lines.append(
            f"- {p['optimizer']} {p['family']}/{p['arch']} ×{p['factor']:g} seed {p['seed']}: "
            f"{p['on']:.4g} / {p['off']:.4g} ({p['log_ratio']:+.3f}); "
            f"LR {p['lr_max_on']:.3g} / {p['lr_max_off']:.3g}"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks heldout", description=__doc__)
    parser.add_argument("--out", default="benchmarks/results/heldout")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--char-seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--optimizers", nargs="+", default=["adamw", "sgd"])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--steps",
        type=int,
        default=STEPS,
        help=f"budget of the metatrain-family runs (default {STEPS})",
    )
    parser.add_argument("--graff-kwargs", default="{}", help="GraffConfig fields, as JSON")
    parser.add_argument(
        "--lr-jitter",
        type=float,
        default=1.0,
        help="multiply every run's LR by this (e.g. 1.01): a butterfly control that shows how "
        "many cells a change too small to matter moves by more than 1 %% (read against the default "
        "sweep by `python -m benchmarks butterfly`)",
    )
    parser.add_argument("--data-dir", default=None)
    parser.add_argument(
        "--trace",
        metavar="FAMILY/ARCH/OPTIMIZER/FACTOR/SEED",
        help="instead of the sweep, print one cell step by step (e.g. shapes/cnn/adamw/1/3)",
    )
    parser.add_argument("--trace-off", action="store_true", help="trace the λ̂-off run instead")
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="start over: keep none of the runs an earlier call of the same commit left",
    )
    args = parser.parse_args(argv)
    if not (math.isfinite(args.lr_jitter) and args.lr_jitter > 0):
        parser.error(f"--lr-jitter must be a positive number, got {args.lr_jitter}")
    if args.trace:
        cell = _trace_cell_arg(args.trace, not args.trace_off, json.loads(args.graff_kwargs))
        if args.steps != STEPS:
            cell["steps"] = args.steps
        print(trace_markdown(cell, *trace_cell(cell)))
        return
    from benchmarks import meta as provenance_of

    meta = provenance_of.provenance()
    resume_key = None if args.fresh or meta["git_dirty"] else meta["git_commit"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "runs.jsonl"
    rows = kept_rows(path, resume_key)
    path.write_text("".join(_line(r) for r in rows))
    done = {_key(r) for r in rows}
    kwargs = json.loads(args.graff_kwargs)
    todo = [
        c
        for c in cells(
            args.seeds,
            args.optimizers,
            args.char_seeds,
            kwargs,
            args.data_dir,
            args.steps,
            args.lr_jitter,
        )
        if _key(c) not in done
    ]
    print(f"{len(todo)} runs to do ({len(done)} done at this commit) -> {path}", flush=True)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.workers, mp_context=ctx) as pool, path.open("a") as fh:
        for i, row in enumerate(pool.map(run_cell, todo), 1):
            row.pop("data_dir", None)
            row["resume_key"] = resume_key
            fh.write(_line(row))
            fh.flush()
            rows.append(row)
            if i % 10 == 0 or i == len(todo):
                print(f"  {i}/{len(todo)}", flush=True)
    text = summary(
        [
            r
            for r in rows
            if (r.get("graff_kwargs") or {}) == kwargs and lr_jitter(r) == args.lr_jitter
        ]
    )
    head = (
        f"`{meta['command']}` at commit `{meta['git_commit'][:12]}`"
        f"{' (dirty)' if meta['git_dirty'] else ''}, {meta['date']}, "
        f"{meta['machine']['cpu_count']} CPUs ({meta['machine'].get('cpu', 'CPU not recorded')}), torch {meta['machine']['torch']}; "
        f"{len(rows)} runs in `runs.jsonl`. λ̂ on: `model=` and `loss_fn=`; λ̂ off: neither. "
        f"A cell is one (task family × architecture, optimizer, LR factor × the family's default, "
        f"seed); 'better'/'worse' at 1 % of the final validation loss.\n\n"
    )
    (out / "summary.md").write_text(head + text)
    print(head + text)


def _trace_cell_arg(text: str, lam: bool, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``--trace FAMILY/ARCH/OPTIMIZER/FACTOR/SEED`` as a cell (a clear exit on a bad one)."""
    parts = text.split("/")
    combos = ", ".join(f"{f}/{a}" for f, a in COMBOS)
    if len(parts) != 5 or tuple(parts[:2]) not in COMBOS or parts[2] not in ("adamw", "sgd"):
        raise SystemExit(
            f"--trace takes FAMILY/ARCH/OPTIMIZER/FACTOR/SEED with FAMILY/ARCH one of {combos} "
            f"and OPTIMIZER adamw or sgd, got {text!r}."
        )
    try:
        factor, seed = float(parts[3]), int(parts[4])
    except ValueError as err:
        raise SystemExit(f"--trace: FACTOR must be a number and SEED an integer: {err}") from err
    return {"family": parts[0], "arch": parts[1], "optimizer": parts[2], "factor": factor,
            "seed": seed, "lam": lam, "graff_kwargs": kwargs}  # fmt: skip
