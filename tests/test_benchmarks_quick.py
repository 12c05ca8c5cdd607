"""Smoke test: the quick benchmark suite runs end to end and writes finite results."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from benchmarks.__main__ import main
from benchmarks.tasks import DEFAULT_GSM8K

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = Path(os.environ.get("GRAFF_GSM8K_DIR", DEFAULT_GSM8K))
    if not (data / "train.jsonl").is_file():
        pytest.skip(f"GSM8K data not found in {data}; set GRAFF_GSM8K_DIR")
    out = tmp_path_factory.mktemp("quick")
    main(["run", "--suite", "quick", "--out", str(out), "--data-dir", str(data)])
    return out


def test_outputs_exist(quick_results: Path) -> None:
    for name in ("results.json", "results.md", "runs.jsonl"):
        assert (quick_results / name).is_file(), name
    pngs = sorted(quick_results.glob("*.png"))
    assert len(pngs) == 8, pngs  # loss + LR plot for each of the four tasks
    assert all(p.stat().st_size > 1000 for p in pngs)


def test_json_has_provenance_and_finite_numbers(quick_results: Path) -> None:
    payload = json.loads((quick_results / "results.json").read_text())
    meta = payload["meta"]
    assert meta["suite"] == "quick"
    assert {"command", "git_commit", "date", "machine"} <= meta.keys()
    ok = [r for r in payload["runs"] if r["status"] == "ok"]
    baselines = {r["scheduler"] for r in ok}
    assert {"fixed", "cosine", "schedule_free"} <= baselines
    for run in ok:
        assert not run["diverged"], run["scheduler"]
        assert math.isfinite(run["final_val_loss"])
        assert run["final_val_loss"] > 0
        assert all(math.isfinite(lr) and lr >= 0 for _, lr in run["lr_curve"])
    assert {r["task"] for r in ok} == {"digits_mlp", "digits_cnn_sgd", "gsm8k_qwen3", "gsm8k_lora"}
    sgd = [r for r in ok if r["task"] == "digits_cnn_sgd"]
    assert {r["optimizer"] for r in sgd} == {"sgd"}
    # the anchors: the LR range test spends part of the budget; none takes the user's LR
    ranged = [r for r in ok if r["scheduler"] == "lr_range_wsd"]
    assert len(ranged) == 4
    assert all(0 < r["range_test"]["steps"] < r["steps"] for r in ranged)
    anchors = [r for r in payload["runs"] if r["scheduler"] in ("prodigy", "lr_range_wsd")]
    assert all(r["status"] in ("ok", "skipped") for r in anchors)
    assert all(r["lr_taken"] is False for r in anchors if r["status"] == "ok")


def test_markdown_has_a_table_per_task(quick_results: Path) -> None:
    text = (quick_results / "results.md").read_text()
    for task in ("digits_mlp", "digits_cnn_sgd", "gsm8k_qwen3", "gsm8k_lora"):
        assert f"## {task}" in text
    assert "| scheduler | LR × | val loss |" in text
    assert "| lr_range_wsd (no LR taken) | — |" in text


def test_no_scheduler_crashed(quick_results: Path) -> None:
    """Every scheduler ran (or was skipped for a documented reason, e.g. no planner file)."""
    payload = json.loads((quick_results / "results.json").read_text())
    errors = {
        f"{r['task']}/{r['scheduler']}": r["error"]
        for r in payload["runs"]
        if r["status"] == "error"
    }
    assert not errors


def test_wallclock_quick_suite(tmp_path: Path) -> None:
    """The wall-clock-budget suite runs end to end: B per task recorded, steps counted, finite."""
    data = Path(os.environ.get("GRAFF_GSM8K_DIR", DEFAULT_GSM8K))
    if not (data / "train.jsonl").is_file():
        pytest.skip(f"GSM8K data not found in {data}; set GRAFF_GSM8K_DIR")
    main(["run", "--suite", "wallclock-quick", "--out", str(tmp_path), "--data-dir", str(data)])
    payload = json.loads((tmp_path / "results.json").read_text())
    meta = payload["meta"]
    assert meta["suite"] == "wallclock-quick"
    assert {"command", "git_commit", "date", "machine", "budgets"} <= meta.keys()
    assert all(b["budget_seconds"] > 0 for b in meta["budgets"].values())
    errors = [r for r in payload["runs"] if r["status"] == "error"]
    assert not errors, errors
    ok = [r for r in payload["runs"] if r["status"] == "ok"]
    assert {r["scheduler"] for r in ok} >= {"fixed", "cosine", "wsd", "schedule_free", "reactor"}
    for run in ok:
        assert 1 <= run["steps_done"] <= 5 * run["step_budget"]
        assert run["train_seconds"] >= run["budget_seconds"] or run["hit_step_cap"]
        assert math.isfinite(run["final_val_loss"])
    text = (tmp_path / "results.md").read_text()
    assert "| scheduler | final val loss (mean ± std) | steps done" in text


def test_long_wallclock_suite_reports_graffs_own_time(tmp_path: Path, monkeypatch) -> None:
    """``wallclock-60`` on the quick tasks with a 1 s floor instead of 60 s: every budget is at
    least the floor, no step cap, GRAFF's own seconds recorded and summarised as a share."""
    from benchmarks import wallclock

    data = Path(os.environ.get("GRAFF_GSM8K_DIR", DEFAULT_GSM8K))
    if not (data / "train.jsonl").is_file():
        pytest.skip(f"GSM8K data not found in {data}; set GRAFF_GSM8K_DIR")
    monkeypatch.setitem(wallclock.WALLCLOCK_SUITES, "wallclock-60", ("quick", 1))
    monkeypatch.setitem(wallclock.LONG_SUITES, "wallclock-60", 1.0)
    wallclock.run("wallclock-60", tmp_path, seeds=None, data_dir=str(data), workers=1)
    payload = json.loads((tmp_path / "results.json").read_text())
    assert all(b["budget_seconds"] >= 1.0 for b in payload["meta"]["budgets"].values())
    ok = [r for r in payload["runs"] if r["status"] == "ok"]
    assert {r["scheduler"] for r in ok} == set(wallclock.LONG_SCHEDULERS)
    for run in ok:
        assert not run["hit_step_cap"]
        assert run["train_seconds"] >= run["budget_seconds"]
        own = run["scheduler_seconds"]
        is_graff = run["scheduler"].startswith("graff")
        assert (set(own) == {"per_step", "lambda_max"}) == is_graff
    shares = [c["graff"]["overhead_share"] for c in payload["summary"].values()]
    # a share, not a fraction: own time is measured and may pass a 1 s budget on a loaded machine
    assert all(s > 0.0 and math.isfinite(s) for s in shares)
    text = (tmp_path / "results.md").read_text()
    assert "own time" in text
    assert "| graff_time_share |" in text
