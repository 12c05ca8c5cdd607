"""Issue 18's targets and issue 17's planner table, on hand-made runs with known answers."""

from __future__ import annotations

from benchmarks.report import summarize
from benchmarks.targets import planner_rows, targets_markdown, tuning_free_targets


def _runs(losses: dict[tuple[str, float], list[float]], task: str = "t") -> list[dict]:
    return [
        {
            "task": task,
            "scheduler": s,
            "lr_mult": m,
            "seed": i,
            "status": "ok",
            "diverged": False,
            "final_val_loss": v,
        }
        for (s, m), values in losses.items()
        for i, v in enumerate(values)
    ]


BASE = {
    ("graff", 0.1): [1.10, 1.11, 1.12],
    ("graff", 1.0): [1.00, 1.01, 1.02],
    ("graff", 10.0): [1.05, 1.06, 1.07],
    ("cosine", 0.1): [1.50, 1.50, 1.50],
    ("cosine", 1.0): [1.02, 1.03, 1.04],
    ("cosine", 10.0): [1.30, 1.30, 1.30],
    ("fixed", 0.1): [1.60, 1.60, 1.60],
    ("fixed", 1.0): [1.20, 1.20, 1.20],
    ("fixed", 10.0): [2.00, 2.00, 2.00],
    ("prodigy", 1.0): [1.04, 1.05, 1.06],
    ("graff_planner_off", 1.0): [1.10, 1.12, 1.13],
    ("graff_fresh", 1.0): [1.00, 1.02, 1.01],
}


def test_every_target_met_where_graff_wins_everything() -> None:
    rows = tuning_free_targets(summarize(_runs(BASE)))
    assert [met for _, _, met in rows] == [True, True, True, True, True]


def test_an_anchor_that_beats_graff_fails_the_first_target_and_is_named() -> None:
    losses = dict(BASE) | {("prodigy", 1.0): [0.90, 0.91, 0.92]}
    _name, evidence, met = tuning_free_targets(summarize(_runs(losses)))[0]
    assert met is False
    assert "prodigy" in evidence


def test_a_baseline_more_than_one_percent_better_fails_within_and_half() -> None:
    losses = dict(BASE) | {("cosine", 1.0): [0.95, 0.96, 0.97]}
    rows = tuning_free_targets(summarize(_runs(losses)))
    assert rows[1][2] is False
    assert rows[2][2] is False
    assert "+5.21 %" in rows[1][1]


def test_a_flatter_baseline_fails_the_spread_target() -> None:
    losses = dict(BASE) | {("cosine", 0.1): [1.03] * 3, ("cosine", 10.0): [1.04] * 3}
    assert tuning_free_targets(summarize(_runs(losses)))[3][2] is False


def test_targets_not_run_are_marked_so() -> None:
    losses = {k: v for k, v in BASE.items() if k[0] not in ("prodigy", "fixed")}
    rows = tuning_free_targets(summarize(_runs(losses)))
    assert rows[0][2] is None
    assert rows[4][2] is None
    assert "| not run in this suite | — |" in targets_markdown(summarize(_runs(losses)))


def test_planner_table_calls_a_consistent_gain_and_a_tie() -> None:
    rows = {r[1]: r for r in planner_rows(summarize(_runs(BASE)))}
    assert rows["planner off"][-1] == "shipped better"  # -0.107 ± 0.006 over 3 seeds
    assert rows["fresh planner"][-1] == "level"


def test_a_planner_only_suite_reports_the_planner_table_alone() -> None:
    from benchmarks.targets import planner_markdown

    runs = {k: v for k, v in BASE.items() if k[0].startswith("graff") and k[1] == 1.0}
    text = planner_markdown(summarize(_runs(runs)))
    assert text.startswith("## What the learned planner adds")
    assert "| t | planner off |" in text
    assert "| t | fresh planner |" in text
    assert "Targets" not in text
