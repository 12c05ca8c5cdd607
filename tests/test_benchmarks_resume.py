"""A benchmark suite cut off mid-way goes on where it stopped, and never mixes in other code's runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import runner
from benchmarks.__main__ import main
from benchmarks.suites import Suite

TINY = Suite(
    name="tiny",
    task_configs=(("digits_mlp", {"steps": 6}),),
    baselines=("cosine",),
    learned=("graff",),
    ablations=(),
    sweep_mults=(1.0, 3.0),
    robust_mults=(1.0,),
    seeds=2,
    eval_points=2,
)


def _run(out: Path, key: str | None, monkeypatch) -> tuple[list[dict], int, list[dict]]:
    """The tiny suite in-process; returns its runs, the number kept and the specs it trained."""
    trained: list[dict] = []
    original = runner.run_one

    def counting(spec: dict) -> dict:
        trained.append(dict(spec))
        return original(spec)

    monkeypatch.setattr(runner, "run_one", counting)
    runs, kept = runner.run_suite(
        TINY, out, seeds=None, data_dir=None, workers=1, progress=False, resume_key=key
    )
    return runs, kept, trained


def _finals(runs: list[dict]) -> dict[str, float]:
    return {runner._spec_key(r): r["final_val_loss"] for r in runs}


def test_an_interrupted_suite_resumes_and_ends_with_the_same_results(tmp_path, monkeypatch):
    """Run all 6 runs; keep 2 finished lines and a line torn by the kill; the next call at the
    same commit trains only the 4 others and ends with the same numbers (runs are seeded)."""
    full, kept, trained = _run(tmp_path, "abc123", monkeypatch)
    assert (len(full), kept, len(trained)) == (6, 0, 6)
    assert all(r["resume_key"] == "abc123" for r in full)
    log = tmp_path / "runs.jsonl"
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines[:2]) + "\n" + lines[2][: len(lines[2]) // 2])
    again, kept, trained = _run(tmp_path, "abc123", monkeypatch)
    assert (len(again), kept, len(trained)) == (6, 2, 4)
    assert {runner._spec_key(s) for s in trained}.isdisjoint(
        {runner._spec_key(json.loads(line)) for line in lines[:2]}
    )
    assert _finals(again) == _finals(full)
    assert len(log.read_text().splitlines()) == 6  # the torn line is gone


def test_runs_of_other_code_or_a_fresh_start_are_not_kept(tmp_path, monkeypatch):
    """Another commit's runs, or ``resume_key=None`` (``--fresh``, uncommitted changes): all
    runs again, and the log holds only the new ones."""
    _run(tmp_path, "abc123", monkeypatch)
    runs, kept, trained = _run(tmp_path, "def456", monkeypatch)
    assert (kept, len(trained)) == (0, 6)
    assert {r["resume_key"] for r in runs} == {"def456"}
    runs, kept, trained = _run(tmp_path, None, monkeypatch)
    assert (kept, len(trained)) == (0, 6)
    assert all("resume_key" not in json.loads(line) for line in
               (tmp_path / "runs.jsonl").read_text().splitlines())  # fmt: skip


def test_finished_runs_keeps_only_finished_runs_of_the_suite_at_the_key(tmp_path) -> None:
    specs = [{"task": "t", "scheduler": s, "lr_mult": 1.0, "seed": 0} for s in ("a", "b", "c")]
    rows = [
        {**specs[0], "status": "ok", "resume_key": "k", "final_val_loss": 1.0},
        {**specs[1], "status": "error", "resume_key": "k"},  # failed: run again
        {**specs[2], "status": "ok", "resume_key": "other"},  # other code
        {"task": "t", "scheduler": "gone", "lr_mult": 1.0, "seed": 0, "status": "ok",
         "resume_key": "k"},  # no longer in the suite
        {**specs[0], "status": "ok", "resume_key": "k", "final_val_loss": 2.0},  # a re-run: last
        {**specs[1], "status": "ok", "resume_key": "k", "graff_kwargs": {"x": 1}},  # other kwargs
    ]  # fmt: skip
    log = tmp_path / "runs.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"task": "t", "sch')
    kept = runner.finished_runs(log, specs, "k")
    assert [(r["scheduler"], r["final_val_loss"]) for r in kept] == [("a", 2.0)]
    assert runner.finished_runs(log, specs, None) == []
    assert runner.finished_runs(tmp_path / "absent.jsonl", specs, "k") == []


@pytest.mark.parametrize("dirty", [False, True])
def test_the_command_resumes_only_clean_code(tmp_path, monkeypatch, capsys, dirty) -> None:
    """``python -m benchmarks run`` passes the clean commit as the key, None when graff/ or
    benchmarks/ has uncommitted changes or with ``--fresh``."""
    import benchmarks.meta
    import benchmarks.suites

    monkeypatch.setitem(benchmarks.suites.SUITES, "quick", TINY)  # nothing runs (fake below)
    keys: list = []

    def fake_run_suite(suite, out, **kwargs):
        keys.append(kwargs["resume_key"])
        return [], 0

    monkeypatch.setattr(runner, "run_suite", fake_run_suite)
    monkeypatch.setattr(
        benchmarks.meta,
        "provenance",
        lambda: {"git_commit": "c0ffee", "git_dirty": dirty, "command": "x"},
    )
    monkeypatch.setattr("benchmarks.report.write_all", lambda runs, meta, out: None)
    (tmp_path / "runs.jsonl").write_text("")
    main(["run", "--suite", "quick", "--out", str(tmp_path)])
    main(["run", "--suite", "quick", "--out", str(tmp_path), "--fresh"])
    assert keys == [None if dirty else "c0ffee", None]
    assert ("uncommitted changes" in capsys.readouterr().out) == dirty


def test_only_runs_the_named_schedulers_and_reports(tmp_path, monkeypatch) -> None:
    """``--only graff``: the suite's GRAFF runs alone (2 seeds × 1 LR), reported without the
    baselines it skipped; a scheduler the suite does not run is a clear exit."""
    import benchmarks.suites

    monkeypatch.setitem(benchmarks.suites.SUITES, "quick", TINY)
    main(["run", "--suite", "quick", "--out", str(tmp_path), "--only", "graff", "--fresh"])
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert sorted((r["scheduler"], r["seed"]) for r in runs) == [("graff", 0), ("graff", 1)]
    assert json.loads((tmp_path / "results.json").read_text())["meta"]["only"] == ["graff"]
    assert (tmp_path / "results.md").is_file()
    with pytest.raises(SystemExit, match="runs no scheduler"):
        main(["run", "--suite", "quick", "--out", str(tmp_path), "--only", "prodigy"])
    with pytest.raises(SystemExit, match="give --out"):  # never over the committed results
        main(["run", "--suite", "quick", "--only", "graff"])


def test_tasks_runs_the_named_tasks_only(tmp_path, monkeypatch) -> None:
    """``--tasks``: the suite's runs of those tasks alone, recorded in the meta; an unknown task
    is a clear exit, and a partial run needs its own --out."""
    import dataclasses

    import benchmarks.suites

    two = (*TINY.task_configs, ("digits_cnn_sgd", {"steps": 6, "channels": 4}))
    monkeypatch.setitem(
        benchmarks.suites.SUITES, "quick", dataclasses.replace(TINY, task_configs=two)
    )
    first = "digits_cnn_sgd"
    args = ["run", "--suite", "quick", "--only", "graff", "--tasks", first, "--fresh"]
    main([*args, "--out", str(tmp_path)])
    data = json.loads((tmp_path / "results.json").read_text())
    assert {r["task"] for r in data["runs"]} == {first}
    assert data["meta"]["tasks"] == [first]
    with pytest.raises(SystemExit, match="has no task"):
        main(["run", "--suite", "quick", "--out", str(tmp_path), "--tasks", "no_such_task"])
    with pytest.raises(SystemExit, match="give --out"):
        main(["run", "--suite", "quick", "--tasks", first])
