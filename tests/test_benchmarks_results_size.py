"""results.json stays small: one compact line per run, curves of at most 200 points."""

from __future__ import annotations

import json
import math
from pathlib import Path

from benchmarks.report import dumps_compact, markdown, summarize, write_all
from benchmarks.runner import MAX_CURVE_POINTS, _subsample


def _run(task: str, sched: str, mult: float, seed: int, loss: float, steps: int = 3000) -> dict:
    curve = _subsample([1.0 / (1 + i) + 1e-9 * seed for i in range(steps)])
    return {
        "task": task,
        "scheduler": sched,
        "lr_mult": mult,
        "seed": seed,
        "status": "ok",
        "final_val_loss": loss,
        "diverged": False,
        "lr": 1e-3 * mult,
        "steps": steps,
        "val_curve": [[steps // 2, loss + 0.1], [steps, loss]],
        "train_curve": curve,
        "lr_curve": curve,
    }


def _runs() -> list[dict]:
    runs = []
    for seed in range(3):
        for mult in (0.1, 1.0, 10.0):
            runs.append(_run("t", "graff", mult, seed, 1.0 + 0.01 * seed + abs(math.log10(mult))))
            runs.append(_run("t", "cosine", mult, seed, 1.1 + 0.01 * seed + mult / 10))
        runs.append(_run("t", "prodigy", 1.0, seed, 1.05 + 0.01 * seed))
        runs.append(_run("t", "dog", 1.0, seed, 1.2 + 0.01 * seed))
    return runs


def test_curves_are_subsampled_to_at_most_200_points_and_keep_the_last() -> None:
    for n in (1, 150, 199, 200, 201, 2000, 100_000):
        curve = _subsample([float(i) for i in range(n)])
        assert len(curve) <= MAX_CURVE_POINTS, n
        assert curve[-1][0] == n - 1
        assert curve[0][0] == 0
    assert _subsample([1.0 / 3.0])[0][1] == 0.333333  # 6 significant digits


def test_results_json_is_one_line_per_run_and_far_smaller_than_pretty_printed() -> None:
    runs = _runs()
    payload = {
        "meta": {"command": "x", "machine": {"cpu_count": 2}},
        "summary": {"a": 1},
        "runs": runs,
    }
    text = dumps_compact(payload)
    assert json.loads(text) == payload
    lines = text.splitlines()
    run_lines = [line for line in lines if line.startswith('{"task"')]
    assert len(run_lines) == len(runs)
    assert len(lines) < len(runs) + 20  # meta is indented, the rest is not
    assert len(text) < 0.5 * len(json.dumps(payload, indent=1))  # the old writer's format


def test_write_all_writes_compact_json_and_marks_anchors_as_taking_no_lr(tmp_path: Path) -> None:
    runs = _runs()
    meta = {
        "suite": "t",
        "command": "python -m benchmarks run",
        "git_commit": "abc",
        "git_dirty": False,
        "date": "2026-01-01",
        "machine": {"cpu_count": 2, "torch": "2"},
        "wall_seconds": 60.0,
    }
    write_all(runs, meta, tmp_path)
    text = (tmp_path / "results.json").read_text()
    assert json.loads(text)["meta"]["git_commit"] == "abc"
    assert len(text.splitlines()) < len(runs) + 40
    summary = summarize(runs)["tasks"]["t"]
    assert summary["robustness"]["prodigy"] == {
        "means": {"1": summary["cells"]["prodigy@1"]["mean"]},
        "spread": None,
        "no_lr_taken": True,
    }
    assert summary["best_anchor"] == "prodigy"
    assert summary["tests"]["best_anchor"]["against"] == "prodigy@1"
    md = markdown(meta, summarize(runs))
    assert "| prodigy | — | " in md
    assert "no LR taken |" in md
    assert "| dog (no LR taken) | — |" in md
    assert "| graff | " in md  # LR-taking schedulers keep their spread


def test_a_target_whose_schedulers_did_not_run_is_not_marked_failed() -> None:
    """The anchors suite runs no REACTOR or prior_only: those targets read 'not run', not 'no'."""
    from benchmarks.report import targets_markdown

    text = targets_markdown(summarize(_runs()), None)
    reactor = next(line for line in text.splitlines() if "REACTOR" in line)
    assert reactor.endswith("| not run | — |")
    spread = next(line for line in text.splitlines() if "spread" in line)
    assert spread.endswith("| **no** |") or spread.endswith("| yes |")  # graff and cosine ran


def test_run_time_is_the_median_ratio_to_cosine_paired_by_seed_and_lr() -> None:
    """GRAFF's run time over cosine's at the same LR and seed (anchors: cosine at × 1), median
    over the pairs; runs without a recorded time, and cosine itself, are left out."""
    from benchmarks.report import run_time_ratios

    runs = []
    graff_ratios = []
    for seed in range(3):
        for k, mult in enumerate((0.1, 1.0, 10.0)):
            cosine = _run("t", "cosine", mult, seed, 1.0)
            cosine["seconds"] = 2.0 + seed + k  # every pair has its own reference
            ratio = 1.1 + 0.1 * (3 * seed + k)  # 1.1, 1.2, ..., 1.9: median 1.5
            graff = _run("t", "graff", mult, seed, 1.0)
            graff["seconds"] = ratio * cosine["seconds"]
            graff_ratios.append(ratio)
            runs += [cosine, graff]
        prodigy = _run("t", "prodigy", 1.0, seed, 1.0)
        prodigy["seconds"] = (0.5 + seed) * (2.0 + seed + 1)  # cosine × 1 of the same seed
        runs.append(prodigy)
    untimed = _run("t", "wsd", 1.0, 0, 1.0)  # an older run without "seconds"
    runs.append(untimed)
    ratios = run_time_ratios(runs)["t"]
    assert math.isclose(ratios["graff"], sorted(graff_ratios)[4])
    assert math.isclose(ratios["prodigy"], 1.5)  # median of 0.5, 1.5, 2.5
    assert "cosine" not in ratios
    assert "wsd" not in ratios
    summary = summarize(runs)["tasks"]["t"]
    assert summary["run_time"] == ratios
    md = markdown(
        {
            "suite": "t",
            "command": "c",
            "git_commit": "abc",
            "git_dirty": False,
            "date": "d",
            "machine": {"cpu_count": 2, "torch": "2"},
            "wall_seconds": 1.0,
        },
        summarize(runs),
    )
    assert "| graff (default LR) | 1 | " in md
    assert "| 1.50 |" in md
    assert "| 1 (reference) |" in md
