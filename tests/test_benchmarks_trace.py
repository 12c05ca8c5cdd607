"""``python -m benchmarks trace``: one GRAFF run of a suite task, step by step."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks import trace


def test_task_config_is_the_suites_and_empty_for_an_unlisted_name() -> None:
    assert trace.task_config("digits_mlp") == {"steps": 300}  # anchors', not quick's 40 steps
    assert trace.task_config("digits_mlp", "quick")["steps"] == 40
    assert trace.task_config("gsm8k_qwen3@800") == {}  # the budgets suite's: steps in the name
    assert trace.task_config("no_such_task") == {}
    with pytest.raises(KeyError, match="has no task"):
        trace.task_config("gsm8k_qwen3@800", "anchors")
    with pytest.raises(KeyError, match="unknown suite"):
        trace.task_config("digits_mlp", "nope")


def test_trace_reports_every_search_step_then_every_n(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trace, "task_config", lambda name, suite=None: {"steps": 60})
    threads = torch.get_num_threads()
    rows, final = trace.trace("digits_mlp", seed=0, every=25)
    assert torch.get_num_threads() == threads  # one thread for the run only
    steps = [r["step"] for r in rows]
    assert steps == [*range(1, 10), 25, 50, 60]  # the search phase (15 % of 60), then every 25
    assert math.isfinite(final)
    assert rows[0]["lambda_max"] is None  # AdamW: the first λ̂ comes at steps 10-12
    last = rows[-1]
    assert last["estimates"] >= 1
    assert last["lambda_max"] > 0
    assert last["bound_factor"] > 0
    assert last["lr_factor"] == pytest.approx(last["lr"] / 1e-3)
    table = trace.markdown("digits_mlp", 0, 1.0, rows, final)
    assert table.startswith("GRAFF on `digits_mlp`, LR × 1, seed 0: final validation loss")
    assert table.count("\n| ") == len(rows) + 1  # header + one line per row


def test_trace_cli_rejects_an_unknown_task() -> None:
    from benchmarks.__main__ import main

    with pytest.raises(SystemExit, match="unknown task"):
        main(["trace", "--task", "no_such_task"])
