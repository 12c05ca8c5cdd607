"""The quality-floor table of the benchmark report (benchmarks/floor.py), on hand-made runs."""

from __future__ import annotations

import math

from benchmarks.floor import floor_markdown, floor_summary
from benchmarks.report import summarize


def _runs(values: dict[tuple[str, float], list[float]]) -> list[dict]:
    runs = []
    for (sched, mult), losses in values.items():
        for seed, v in enumerate(losses):
            runs.append(
                {
                    "task": "t",
                    "scheduler": sched,
                    "lr_mult": mult,
                    "seed": seed,
                    "status": "ok",
                    "diverged": not math.isfinite(v),
                    "final_val_loss": v if math.isfinite(v) else None,
                }
            )
    return runs


def test_floor_uses_medians_and_flags_each_lr() -> None:
    runs = _runs(
        {
            ("graff", 0.1): [1.0, 5.0, 1.2],  # median 1.2 (the mean, 2.4, would fail)
            ("prior_only", 0.1): [2.0, 2.0, 2.0],
            ("graff", 1.0): [1.0, 1.0, 1.0],
            ("prior_only", 1.0): [1.0, 1.0, 1.0],  # a tie holds
            ("graff", 10.0): [1.5, 1.6, math.inf],  # one diverged seed: median 1.6
            ("prior_only", 10.0): [1.55, 1.55, 1.55],
        }
    )
    floor = floor_summary(summarize(runs))["t"]
    assert [r["graff_median"] for r in floor["rows"]] == [1.2, 1.0, 1.6]
    assert [r["holds"] for r in floor["rows"]] == [True, True, False]
    assert floor["spread"]["graff"] == 1.6 - 1.0
    assert floor["spread"]["prior"] == 2.0 - 1.0
    assert floor["spread"]["holds"]
    text = floor_markdown({"t": floor})
    assert "| t | 10 | 1.6000 | 1.5500 | **fails** |" in text
    assert "diverged" in text


def test_no_floor_without_both_schedulers() -> None:
    runs = _runs({("graff", 1.0): [1.0]})
    assert floor_summary(summarize(runs)) == {}
    assert floor_markdown({}) == ""
