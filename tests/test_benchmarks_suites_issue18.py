"""Issue 18's suites: five tasks, a long horizon, one task at three budgets, anchors in `quick`."""

from __future__ import annotations

import pytest

from benchmarks.schedulers import ANCHORS
from benchmarks.suites import SUITES, build_task, task_optimizer


def test_a_budget_suffix_sets_the_steps_and_keeps_the_name() -> None:
    task = build_task("gsm8k_qwen3@800", {"hidden": 32})
    assert (task.steps, task.name, task.hidden) == (800, "gsm8k_qwen3@800", 32)
    assert build_task("digits_mlp", {"steps": 5}).name == "digits_mlp"
    with pytest.raises(ValueError, match="contradicts"):
        build_task("digits_mlp@10", {"steps": 20})
    with pytest.raises(ValueError, match="positive integer"):
        build_task("digits_mlp@ten", {})
    with pytest.raises(KeyError, match="unknown task"):
        build_task("mnist@10", {})


def test_tasks_declare_their_optimizer() -> None:
    assert task_optimizer(build_task("digits_cnn_sgd", {"steps": 5})) == ("sgd", 0.05, 5e-4)
    assert task_optimizer(build_task("digits_mlp", {"steps": 5})) == ("adamw", 1e-3, 0.01)


def test_the_two_suites_cover_five_tasks_with_sgd_and_a_long_horizon() -> None:
    """``anchors`` (four tasks) and ``budgets`` (the char transformer at 200/800/2,000 steps)
    meet every tuning-free anchor and the swept baselines on five distinct tasks."""
    suites = (SUITES["anchors"], SUITES["budgets"])
    tasks = [t for suite in suites for t in suite.build_tasks()]
    names = {t.name for t in tasks}
    assert len(names) >= 5
    assert {"digits_mlp", "gsm8k_qwen3", "gsm8k_lora"} <= names
    assert any(task_optimizer(t)[0] == "sgd" for t in tasks)
    assert any(t.name.startswith("gsm8k_qwen3") and t.steps >= 1000 for t in tasks)
    for suite in suites:
        assert set(suite.anchors) == set(ANCHORS)
        specs = suite.specs()
        for task in {t.name for t in suite.build_tasks()}:  # each anchor once per seed, at ×1
            for anchor in ANCHORS:
                runs = [s for s in specs if s["task"] == task and s["scheduler"] == anchor]
                assert sorted(s["seed"] for s in runs) == list(range(suite.seeds))
                assert {s["lr_mult"] for s in runs} == {1.0}
        assert {s["scheduler"] for s in specs} >= {"graff", "wsd", "cosine", "schedule_free"}


def test_the_anchors_suite_runs_the_planner_ablations_at_the_users_lr() -> None:
    """Issue 17's evidence: shipped planner vs planner-off vs fresh, same seeds, ×1."""
    specs = SUITES["anchors"].specs()
    for variant in ("graff", "graff_planner_off", "graff_fresh"):
        runs = [s for s in specs if s["scheduler"] == variant and s["lr_mult"] == 1.0]
        assert len(runs) == 4 * SUITES["anchors"].seeds


def test_the_planner_suite_pairs_three_variants_on_five_seeds_of_the_anchors_tasks() -> None:
    """Issue 17's own suite: only the planner variants, every (task, seed) with all three."""
    suite = SUITES["planner"]
    specs = suite.specs()
    assert {t.name for t in suite.build_tasks()} == {
        t.name for t in SUITES["anchors"].build_tasks()
    }
    assert {s["scheduler"] for s in specs} == {"graff", "graff_planner_off", "graff_fresh"}
    assert {s["lr_mult"] for s in specs} == {1.0}
    pairs = {(s["task"], s["seed"]) for s in specs}
    assert len(pairs) == 4 * suite.seeds
    assert suite.seeds >= 5
    assert len(specs) == 3 * len(pairs)


def test_budgets_suite_is_one_task_at_three_lengths() -> None:
    tasks = SUITES["budgets"].build_tasks()
    assert len({t.name.split("@")[0] for t in tasks}) == 1
    assert sorted(t.steps for t in tasks) == [200, 800, 2000]


def test_quick_suite_covers_an_anchor_and_the_sgd_task() -> None:
    suite = SUITES["quick"]
    assert set(suite.anchors) & set(ANCHORS)
    assert any(task_optimizer(t)[0] == "sgd" for t in suite.build_tasks())
