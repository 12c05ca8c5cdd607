"""The wall-clock suites resume like the step-budget ones: kept runs, kept budgets.

Training and timing are replaced by fakes (what is tested is which runs run, and against which
budget B); the suites themselves run end to end in ``tests/test_benchmarks_quick.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from benchmarks import wallclock


class _Task(SimpleNamespace):
    def setup(self, data_dir: Path | None) -> None:
        self.ready = True


@pytest.fixture
def fake_suite(monkeypatch):
    """Two tasks, fake timing (B = steps × 1 ms, counted) and fake training (recorded)."""
    tasks = [_Task(name="a", steps=10), _Task(name="b", steps=20)]
    calls = {"timed": [], "trained": []}

    def time_steps(task, steps):
        calls["timed"].append(task.name)
        return 1e-3

    def train(task, sched, seed, budget, cap):
        calls["trained"].append((task.name, sched, seed))
        return {
            "final_val_loss": 1.0,
            "steps_done": 5,
            "hit_step_cap": False,
            "budget_seconds": budget,
            "scheduler_seconds": {"per_step": 0.1, "lambda_max": 0.0}
            if sched.startswith("graff")
            else {},
        }

    monkeypatch.setattr(
        wallclock, "_suite", lambda name: SimpleNamespace(build_tasks=lambda: tasks)
    )
    monkeypatch.setattr(wallclock, "_time_steps", time_steps)
    monkeypatch.setattr(wallclock, "_train", train)
    return calls


def _run(out: Path, key: str | None) -> dict:
    wallclock.run("wallclock-60", out, seeds=1, data_dir=None, workers=1, resume_key=key)
    return json.loads((out / "results.json").read_text())


def test_an_interrupted_wallclock_suite_runs_only_what_is_missing(fake_suite, tmp_path) -> None:
    first = _run(tmp_path, "abc")
    every = {(r["task"], r["scheduler"], r["seed"]) for r in first["runs"]}
    assert len(every) == 2 * len(wallclock.LONG_SCHEDULERS)
    assert fake_suite["timed"] == ["a", "b"]
    lines = (tmp_path / "runs.jsonl").read_text().splitlines()
    (tmp_path / "runs.jsonl").write_text("\n".join(lines[:3]) + '\n{"task": "a", "sch')  # torn
    fake_suite["timed"].clear()
    fake_suite["trained"].clear()

    second = _run(tmp_path, "abc")
    assert fake_suite["timed"] == []  # B is the interrupted call's, not re-measured
    assert len(fake_suite["trained"]) == len(every) - 3  # only the missing runs
    assert {(r["task"], r["scheduler"], r["seed"]) for r in second["runs"]} == every
    assert second["meta"]["resumed_runs"] == 3
    assert second["meta"]["budgets"] == first["meta"]["budgets"]
    assert all(r["resume_key"] == "abc" for r in second["runs"])


@pytest.mark.parametrize("key", [None, "other"])
def test_another_commit_or_fresh_starts_the_wallclock_suite_over(fake_suite, tmp_path, key):
    _run(tmp_path, "abc")
    fake_suite["timed"].clear()
    fake_suite["trained"].clear()
    again = _run(tmp_path, key)
    assert fake_suite["timed"] == ["a", "b"]  # budgets measured again
    assert len(fake_suite["trained"]) == len(again["runs"]) == 2 * len(wallclock.LONG_SCHEDULERS)
    assert again["meta"]["resumed_runs"] == 0
