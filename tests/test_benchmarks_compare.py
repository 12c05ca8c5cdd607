"""benchmarks/compare.py: paired per-seed comparison of one scheduler between two runs."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("scipy")

from benchmarks import compare


def _results(values: dict[tuple[str, float], list[float]], commit: str) -> dict:
    tasks: dict = {}
    for (task, mult), losses in values.items():
        cells = tasks.setdefault(task, {"cells": {}})["cells"]
        cells[f"graff@{mult:g}"] = {
            "scheduler": "graff",
            "lr_mult": mult,
            "seeds": {str(i): v for i, v in enumerate(losses)},
        }
        cells[f"cosine@{mult:g}"] = {"scheduler": "cosine", "lr_mult": mult, "seeds": {"0": 9.0}}
    return {"meta": {"git_commit": commit * 8}, "summary": {"tasks": tasks}}


def test_pairs_only_the_scheduler_and_cells_in_both_and_skips_non_finite() -> None:
    base = _results({("a", 1.0): [1.0, 2.0, 4.0], ("a", 0.1): [1.0]}, "b")
    other = _results({("a", 1.0): [2.0, 2.0, math.nan]}, "o")
    rows = compare.pairs(base, other, "graff")
    assert [(r["lr_mult"], r["seed"]) for r in rows] == [(1.0, 0), (1.0, 1)]
    assert rows[0]["log_ratio"] == pytest.approx(math.log(2.0))
    assert rows[1]["log_ratio"] == 0.0


def test_a_consistently_worse_other_is_significant_and_the_files_say_so(tmp_path) -> None:
    base = _results({("a", m): [1.0 + 0.01 * i for i in range(6)] for m in (0.1, 1.0, 10.0)}, "b")
    other = _results({("a", m): [1.1 + 0.01 * i for i in range(6)] for m in (0.1, 1.0, 10.0)}, "o")
    paths = []
    for name, data in (("base.json", base), ("other.json", other)):
        (tmp_path / name).write_text(json.dumps(data))
        paths.append(str(tmp_path / name))
    out = tmp_path / "cmp"
    compare.main(["--base", paths[0], "--other", paths[1], "--out", str(out)])
    result = json.loads((out / "compare.json").read_text())
    s = result["summary"]
    assert (s["pairs"], s["other_worse"], s["other_better"]) == (18, 18, 0)
    assert s["wilcoxon_p"] < 0.001
    assert result["base_commits"] == ["bbbbbbb"]
    text = (out / "compare.md").read_text()
    assert "18 of 18 pairs worse" in text
    assert "| a | 0.1 |" in text
    with pytest.raises(SystemExit):
        compare.main(["--base", paths[0], paths[0], "--other", paths[1], "--out", str(out)])


def _sweep_row(optimizer: str, seed: int, lam: bool, final: float) -> dict:
    return {"family": "tabular", "arch": "mlp", "optimizer": optimizer, "factor": 1.0,
            "seed": seed, "lam": lam, "final": final, "status": "ok"}  # fmt: skip


def test_heldout_pairs_match_cells_of_one_lambda_setting() -> None:
    base = [_sweep_row("adamw", 1, True, 1.0), _sweep_row("adamw", 1, False, 5.0),
            _sweep_row("sgd", 1, True, 2.0), _sweep_row("adamw", 2, True, math.inf)]  # fmt: skip
    other = [_sweep_row("adamw", 1, True, 2.0), _sweep_row("adamw", 1, False, 5.0),
             _sweep_row("adamw", 2, True, 1.0)]  # fmt: skip
    on = compare.heldout_pairs(base, other)
    assert [(r["task"], r["seed"], r["log_ratio"]) for r in on] == [
        ("adamw tabular/mlp", 1, math.log(2.0))
    ]  # the sgd cell has no partner, seed 2's base diverged
    off = compare.heldout_pairs(base, other, lam=False)
    assert [r["log_ratio"] for r in off] == [0.0]


def test_heldout_mode_of_the_command(tmp_path) -> None:
    """``--heldout`` reads two sweeps' runs.jsonl, takes the commit from each summary.md, and
    counts the cells beyond 1 % next to the signs."""
    for name, finals in (("a", (1.0, 1.0, 1.0)), ("b", (1.5, 1.005, 0.5))):
        sweep = tmp_path / name
        sweep.mkdir()
        rows = [_sweep_row("adamw", seed, True, v) for seed, v in enumerate(finals)]
        rows.append(_sweep_row("sgd", 0, True, 1.0))
        (sweep / "runs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        (sweep / "summary.md").write_text(f"`cmd` at commit `{name * 12}` (dirty), date\n")
    out = tmp_path / "cmp"
    compare.main(["--heldout", "--optimizer", "adamw", "--base", str(tmp_path / "a/runs.jsonl"),
                  "--other", str(tmp_path / "b/runs.jsonl"), "--out", str(out)])  # fmt: skip
    result = json.loads((out / "compare.json").read_text())
    assert result["base_commits"] == ["aaaaaaa (dirty)"]
    assert result["summary"]["pairs"] == 3  # the sgd cell is filtered out
    assert result["summary"]["other_worse"] == 2
    assert result["summary"]["other_worse_1pct"] == 1  # +0.5 % is level
    assert result["summary"]["other_better_1pct"] == 1
    assert "By more than 1 %: 1 worse, 1 better." in (out / "compare.md").read_text()
