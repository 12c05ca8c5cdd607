"""``python -m benchmarks heldout``: pairing of λ̂ on/off runs, the summary, and one real cell."""

from __future__ import annotations

import json
import math

from benchmarks import heldout


def _row(family: str, factor: float, seed: int, lam: bool, final: float) -> dict:
    return {"family": family, "arch": "mlp", "optimizer": "adamw", "factor": factor,
            "seed": seed, "lam": lam, "graff_kwargs": {}, "final": final, "lr_max": 1e-3,
            "status": "ok"}  # fmt: skip


def test_pairs_match_on_and_off_of_the_same_cell_only() -> None:
    rows = [
        _row("tabular", 1.0, 1, True, 0.5),
        _row("tabular", 1.0, 1, False, 1.0),
        _row("tabular", 10.0, 1, True, 2.0),  # its λ̂-off run is missing: no pair
        _row("shapes", 1.0, 1, False, 3.0),
    ]
    pairs = heldout.pairs(rows)
    assert len(pairs) == 1
    assert pairs[0]["log_ratio"] == math.log(0.5)


def test_summary_counts_better_worse_and_level_at_one_percent() -> None:
    rows = []
    for seed, (on, off) in enumerate(((0.5, 1.0), (1.0, 0.5), (1.0, 1.005))):
        rows += [_row("tabular", 1.0, seed, True, on), _row("tabular", 1.0, seed, False, off)]
    text = heldout.summary(rows)
    assert "| adamw | tabular | 3 | 1 | 1 | 1 |" in text
    assert "+0.693" in text  # the worst cell, log 2


def test_a_cell_runs_and_a_rerun_skips_it(tmp_path) -> None:
    """One real cell (a tabular MLP, 200 steps, λ̂ on and off), then the command again: nothing
    left to do."""
    args = ["--out", str(tmp_path), "--seeds", "1", "--char-seeds", "--optimizers", "adamw",
            "--workers", "1"]  # fmt: skip
    original = heldout.COMBOS
    heldout.COMBOS = (("tabular", "mlp"),)
    try:
        heldout.main(args)
        rows = [json.loads(s) for s in (tmp_path / "runs.jsonl").read_text().splitlines()]
        assert len(rows) == 6  # 3 LR factors × λ̂ on/off
        assert all(r["status"] == "ok" and math.isfinite(r["final"]) for r in rows)
        heldout.main(args)
        assert len((tmp_path / "runs.jsonl").read_text().splitlines()) == 6
    finally:
        heldout.COMBOS = original
    assert "| adamw | tabular | 3 |" in (tmp_path / "summary.md").read_text()
