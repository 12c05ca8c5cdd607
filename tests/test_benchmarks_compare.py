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
