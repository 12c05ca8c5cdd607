"""Command line: ``python -m benchmarks run --suite quick|full|floor|ablations|anchors|planner|budgets|wallclock``, ``overhead``, ``soak``, ``gpu``, ``heldout``, ``lambda-accuracy``, ``trace``, ``compare`` and ``butterfly``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.tasks import REPO


def _run(args: argparse.Namespace) -> None:
    from benchmarks.meta import provenance
    from benchmarks.report import write_all
    from benchmarks.runner import run_suite
    from benchmarks.suites import SUITES

    graff_kwargs = _graff_kwargs(args.graff_kwargs)
    if args.suite.startswith("wallclock"):
        from benchmarks import wallclock

        if graff_kwargs:
            raise SystemExit("--graff-kwargs is not supported by the wall-clock suites.")

        out = Path(args.out or REPO / "benchmarks" / "results" / args.suite.replace("-", "_"))
        wallclock.run(
            args.suite,
            out,
            seeds=args.seeds,
            data_dir=args.data_dir,
            workers=args.workers,
            resume_key=_resume_key(provenance(), args.fresh, out),
        )
        return
    suite = SUITES[args.suite]
    out = Path(args.out or REPO / "benchmarks" / "results" / suite.name)
    meta = provenance() | {"suite": suite.name, "seeds": args.seeds or suite.seeds}
    if graff_kwargs:
        meta["graff_kwargs"] = graff_kwargs
    only = _only(args.only, suite)
    tasks = _tasks(args.tasks, suite)
    for flag, names in (("only", only), ("tasks", tasks)):
        if names:
            if not args.out:  # a partial suite must never replace the committed one's results
                raise SystemExit(
                    f"--{flag} runs part of a suite: give --out (a folder of its own)."
                )
            meta[flag] = list(names)
    resume_key = _resume_key(meta, args.fresh, out)
    start = time.perf_counter()
    runs, resumed = run_suite(
        suite,
        out,
        seeds=args.seeds,
        data_dir=args.data_dir,
        workers=args.workers,
        graff_kwargs=graff_kwargs,
        resume_key=resume_key,
        only=only,
        tasks=tasks,
    )
    meta["wall_seconds"] = time.perf_counter() - start
    meta["resumed_runs"] = resumed
    write_all(runs, meta, out)
    print(f"wrote {out}/results.json, results.md and plots ({len(runs)} runs)")


def _resume_key(meta: dict[str, Any], fresh: bool, out: Path) -> str | None:
    """The key an interrupted run of the same clean commit resumes under (None: start over)."""
    if meta["git_dirty"] and not fresh and (out / "runs.jsonl").is_file():
        print("graff/ or benchmarks/ has uncommitted changes: starting over, not resuming.")
    return None if fresh or meta["git_dirty"] else meta["git_commit"]


def _only(names: list[str] | None, suite: Any) -> tuple[str, ...]:
    """``--only``: scheduler names of ``suite`` (a clear exit on one it does not run)."""
    if not names:
        return ()
    known = sorted({spec["scheduler"] for spec in suite.specs()})
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(
            f"--only: the {suite.name} suite runs no scheduler {unknown}; it runs {known}."
        )
    return tuple(dict.fromkeys(names))


def _tasks(names: list[str] | None, suite: Any) -> tuple[str, ...]:
    """``--tasks``: task names of ``suite`` (a clear exit on one it does not run)."""
    if not names:
        return ()
    known = [name for name, _ in suite.task_configs]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"--tasks: the {suite.name} suite has no task {unknown}; it has {known}.")
    return tuple(dict.fromkeys(names))


def _graff_kwargs(text: str | None) -> dict[str, Any]:
    """``--graff-kwargs``: a JSON object of GraffScheduler keyword arguments and GraffConfig
    fields (checked here)."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise SystemExit(f"--graff-kwargs must be a JSON object, got {text!r}: {err}") from err
    if not isinstance(value, dict):
        raise SystemExit(f"--graff-kwargs must be a JSON object, got {text!r}.")
    import inspect

    from graff import GraffConfig, GraffScheduler

    params = inspect.signature(GraffScheduler).parameters
    known = {k for k, p in params.items() if p.kind is p.KEYWORD_ONLY} - {"config"}
    unknown = sorted(set(value) - known - GraffConfig.field_names())
    if unknown:
        raise SystemExit(
            f"--graff-kwargs: neither GraffScheduler nor GraffConfig has argument(s) {unknown}."
        )
    return value


def _report(args: argparse.Namespace) -> None:
    """Rebuild results from ``runs.jsonl`` (e.g. of an interrupted run)."""
    from benchmarks.meta import provenance
    from benchmarks.report import write_all

    out = Path(args.out)
    log = out / "runs.jsonl"
    if log.is_file():
        runs = [json.loads(line) for line in log.read_text().splitlines() if line]
    else:  # committed results keep the runs inside results.json only
        runs = json.loads((out / "results.json").read_text())["runs"]
    previous = out / "results.json"
    if previous.is_file():  # keep the provenance of the run itself
        meta = json.loads(previous.read_text())["meta"]
        meta["report_command"] = provenance()["command"]
        if str(meta.get("suite", "")).startswith("wallclock"):
            from benchmarks.wallclock import write

            write(runs, meta, out)
            print(f"rebuilt {out}/results.md from {len(runs)} runs")
            return
    else:
        meta = provenance() | {"suite": args.suite, "wall_seconds": float("nan"), "partial": True}
    write_all(runs, meta, out)
    print(f"rebuilt {out}/results.md from {len(runs)} runs")


def _overhead(args: argparse.Namespace) -> None:
    from benchmarks.overhead import main

    main(args)


def _soak(args: argparse.Namespace) -> None:
    from benchmarks.soak import main

    main(args)


def _gpu(args: argparse.Namespace) -> None:
    from benchmarks.gpu import main

    main(args)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["heldout"]:  # its own parser (benchmarks/heldout.py)
        from benchmarks.heldout import main as heldout

        heldout(argv[1:])
        return
    if argv[:1] == ["lambda-accuracy"]:  # its own parser (benchmarks/lambda_accuracy.py)
        from benchmarks.lambda_accuracy import main as lambda_accuracy

        lambda_accuracy(argv[1:])
        return
    if argv[:1] == ["compare"]:  # its own parser (benchmarks/compare.py)
        from benchmarks.compare import main as compare

        compare(argv[1:])
        return
    if argv[:1] == ["butterfly"]:  # its own parser (benchmarks/butterfly.py)
        from benchmarks.butterfly import main as butterfly

        butterfly(argv[1:])
        return
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train every scheduler on every task of a suite")
    run.add_argument(
        "--suite",
        choices=[
            "quick",
            "full",
            "floor",
            "ablations",
            "anchors",
            "planner",
            "budgets",
            "wallclock",
            "wallclock-quick",
            "wallclock-60",
        ],
        default="quick",
    )
    run.add_argument("--out", help="results folder (default benchmarks/results/<suite>/)")
    run.add_argument("--seeds", type=int, help="number of seeds (default: the suite's)")
    run.add_argument(
        "--data-dir", help="GSM8K folder (default $GRAFF_GSM8K_DIR or ../shared/data/gsm8k)"
    )
    run.add_argument("--workers", type=int, default=1, help="worker processes (1 thread each)")
    run.add_argument(
        "--only",
        nargs="+",
        metavar="SCHEDULER",
        help="run only these schedulers of the suite (e.g. 'graff' with --graff-kwargs, to pair "
        "a variant with a committed run by `compare` without re-running every baseline)",
    )
    run.add_argument(
        "--tasks",
        nargs="+",
        metavar="TASK",
        help="run only these tasks of the suite (e.g. 'digits_cnn_sgd' with --only graff and "
        "--graff-kwargs, to pair a rule for one optimizer with a committed run)",
    )
    run.add_argument(
        "--fresh",
        action="store_true",
        help="start over: ignore the runs an interrupted call of the same commit left in "
        "runs.jsonl (by default they are kept and only the missing runs are done)",
    )
    run.add_argument(
        "--graff-kwargs",
        help="extra GraffScheduler arguments for every GRAFF variant, as JSON, e.g. "
        "'{\"probe_every\": 2}' (recorded in results.json); not for the wall-clock suites",
    )
    run.set_defaults(func=_run)
    rep = sub.add_parser("report", help="rebuild results.json/md/plots from runs.jsonl")
    rep.add_argument("--out", required=True)
    rep.add_argument("--suite", default="full")
    rep.set_defaults(func=_report)
    ovh = sub.add_parser("overhead", help="per-step time and memory of each scheduler (LoRA task)")
    ovh.add_argument("--out", help="results folder (default benchmarks/results/overhead/)")
    ovh.add_argument("--rounds", type=int, default=40)
    ovh.add_argument("--larger-rounds", type=int, default=30, help="rounds of the larger config")
    ovh.add_argument("--data-dir")
    ovh.add_argument(
        "--amortised-steps", type=int, default=150, help="steps of each run alone (λ̂ amortised)"
    )
    ovh.add_argument(
        "--amortised-repeats", type=int, default=3, help="graff/cosine run pairs (amortised λ̂)"
    )
    ovh.set_defaults(func=_overhead)
    soak = sub.add_parser(
        "soak", help="thousands of steps of each scheduler with injected NaN steps and LR spikes"
    )
    soak.add_argument("--out", help="results folder (default benchmarks/results/soak/)")
    soak.add_argument("--steps", type=int, default=3000)
    soak.add_argument("--seed", type=int, default=0)
    soak.set_defaults(func=_soak)
    from benchmarks.gpu import add_arguments

    gpu = sub.add_parser(
        "gpu",
        help="GRAFF vs WSD/cosine/schedule-free at one wall-clock budget on a GPU (--tiny: CPU)",
    )
    add_arguments(gpu)
    gpu.set_defaults(func=_gpu)
    from benchmarks import trace

    tr = sub.add_parser(
        "trace", help="one GRAFF run of a suite task, step by step (λ̂, guard, search)"
    )
    trace.add_arguments(tr)
    tr.set_defaults(func=trace.main)
    sub.add_parser("heldout", help="GRAFF with and without λ̂ on tasks the benchmark never uses")
    sub.add_parser("lambda-accuracy", help="λ̂ (Lanczos, power iteration) against ARPACK's top")
    sub.add_parser("compare", help="pair two runs of a suite (or two held-out sweeps) seed by seed")
    sub.add_parser(
        "butterfly", help="λ̂ on vs off against each held-out cell's spread under a 1 %% LR nudge"
    )
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
