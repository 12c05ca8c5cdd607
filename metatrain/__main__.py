"""``python -m metatrain run --out DIR`` (start or resume) and ``python -m metatrain export``.

Examples::

    python -m metatrain run --out runs/mt --iterations 100 --pairs 8 --workers 2
    python -m metatrain run --out runs/mt --iterations 150      # resume, extend to 150
    python -m metatrain export --out runs/mt --to graff/planner/default.safetensors
    python -m metatrain run --out /tmp/mt_smoke --iterations 2 --pairs 2 --workers 1 --max-steps 60
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from pathlib import Path

from metatrain import clone_cli
from metatrain.es import ESConfig, MetaTrainer, load_state, new_state, save_state
from metatrain.report import export, git_commit, plot_curve, write_log

_TUNABLE = [f.name for f in dataclasses.fields(ESConfig) if f.name != "iterations"]


def _command(argv: list[str] | None) -> str:
    return shlex.join(["python", "-m", "metatrain", *(sys.argv[1:] if argv is None else argv)])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m metatrain", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="start a meta-training run in --out, or resume the one there")
    run.add_argument("--out", type=Path, required=True)
    run.add_argument("--iterations", type=int, default=None, help="total ES updates (default 100)")
    run.add_argument("--pairs", type=int, default=None, help="antithetic pairs per iteration (8)")
    run.add_argument("--sigma", type=float, default=None, help="perturbation scale (0.05)")
    run.add_argument("--lr", type=float, default=None, help="Adam LR on the planner weights (0.01)")
    run.add_argument("--val-every", type=int, default=None, help="meta-validate every k (5)")
    run.add_argument("--fitness", choices=("rank", "z"), default=None, help="shaping (rank)")
    run.add_argument("--seed", type=int, default=None)
    run.add_argument("--max-steps", type=int, default=None, help="cap every budget (smoke runs)")
    run.add_argument("--init", default=None, help="fresh (default), default, or a planner file")
    run.add_argument(
        "--params", choices=("all", "decoder"), default=None, help="what ES trains (all)"
    )
    run.add_argument(
        "--residual-max",
        type=float,
        default=None,
        help="the planner's authority in the runs, GraffConfig.residual_max (1.25)",
    )
    run.add_argument("--workers", type=int, default=1, help="worker processes, 1 thread each")
    run.add_argument("--export", type=Path, default=None, help="export the best planner at the end")
    tk = sub.add_parser("tasks", help="list the task family; --time N: ms per step under GRAFF")
    tk.add_argument("--time", type=int, default=0, metavar="STEPS")
    ex = sub.add_parser("export", help="save the best-on-meta-validation planner + JSON sidecar")
    ex.add_argument("--out", type=Path, required=True)
    ex.add_argument("--to", type=Path, required=True)
    clone_cli.add_parser(sub)
    return parser


def _state_for(args: argparse.Namespace, command: str) -> dict:
    given = {k: getattr(args, k) for k in _TUNABLE if getattr(args, k) is not None}
    state = load_state(args.out)
    if state is None:
        config = ESConfig(**given, **({"iterations": args.iterations} if args.iterations else {}))
        return new_state(config, command, git_commit())
    stored = state["config"]
    defaults = dataclasses.asdict(ESConfig())  # a state older than a setting has its default
    clash = {
        k: (v, stored.get(k, defaults[k]))
        for k, v in given.items()
        if stored.get(k, defaults[k]) != v
    }
    if clash:
        raise SystemExit(
            f"{args.out} holds a run with other settings {clash} (given, stored); "
            "resume with the same settings (only --iterations may change) or use a new --out."
        )
    if args.iterations is not None:
        state["config"]["iterations"] = args.iterations
    state["resumed"].append({"command": command, "commit": git_commit(), "at": state["iteration"]})
    return state


def _run(args: argparse.Namespace, command: str) -> int:
    from tqdm import tqdm

    from metatrain.runner import PoolEvaluator

    state = _state_for(args, command)
    total = state["config"]["iterations"]
    bar = tqdm(total=total + 1, initial=state["iteration"] + 1, desc="ES iterations", unit="it")
    runs = tqdm(desc="runs", unit="run", leave=False)
    evaluator = PoolEvaluator(args.workers, progress=runs.update)
    trainer = MetaTrainer(state, evaluator)

    def checkpoint(entry: dict) -> None:
        save_state(trainer.state, args.out)
        write_log(trainer.state["log"], args.out)
        plot_curve(trainer.state["log"], args.out / "curve.png")
        bar.update(1)
        post = {k: round(entry[k], 4) for k in ("train", "val") if k in entry}
        bar.set_postfix(post, refresh=True)
        tqdm.write(f"iteration {entry['iteration']}: {post} ({entry['seconds']:.1f} s)")

    try:
        trainer.iterate(checkpoint)
    finally:
        evaluator.close()
        runs.close()
        bar.close()
    if args.export is not None:
        export(trainer.state, args.export, command)
    return 0


def _tasks(steps: int) -> int:
    """Print (family, arch, optimizers, split); with ``steps``, time each under GRAFF (1 thread)."""
    import torch

    from metatrain.graff_api import fresh_vector
    from metatrain.runner import run_task
    from metatrain.sampler import HELD_OUT_FAMILIES, TaskSpec
    from metatrain.tasks import ARCHS, DEFAULT_LR, lora_base_state

    torch.set_num_threads(1)
    if steps:
        lora_base_state()  # once per process, not part of any step
    for family, archs in ARCHS.items():
        split = "meta-val only" if family in HELD_OUT_FAMILIES else "meta-train + meta-val"
        for arch in archs:
            line = (
                f"{family:12s} {arch:12s} AdamW {DEFAULT_LR[(arch, 'adamw')]:g} / "
                f"SGD(m 0.9) {DEFAULT_LR[(arch, 'sgd')]:g}   {split}"
            )
            if steps:
                res = run_task(TaskSpec(family, arch, "adamw", steps, 1.0, 1), fresh_vector())
                line += f"   {1000 * res.seconds / steps:.1f} ms/step"
            print(line, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = _command(argv)
    if args.cmd == "run":
        return _run(args, command)
    if args.cmd == "tasks":
        return _tasks(args.time)
    if args.cmd == "clone":
        return clone_cli.run(args, command)
    state = load_state(args.out)
    if state is None:
        raise SystemExit(f"no meta-training state in {args.out}")
    sidecar = export(state, args.to, command)
    print(
        f"exported iteration {sidecar['best_iteration']} (meta-val {sidecar['best_meta_val']}) to {args.to}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
