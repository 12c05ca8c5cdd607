"""The GSM8K example: scoring on real GSM8K answers and tricky generations, trial runs, evaluate."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "gsm8k"
CONFIGS = EXAMPLE / "configs"
sys.path.insert(0, str(EXAMPLE))

scoring = pytest.importorskip("scoring")

RUN_CONFIGS = {
    "proposed-iter1-Qwen3-0.6B-gsm8k": "proposed-iter1-Qwen3-0.6B-gsm8k.yaml",
    "comparative-1-iter1-Qwen3-0.6B-gsm8k": "comparative-1-iter1-Qwen3-0.6B-gsm8k.yaml",
    "baseline-cosine-Qwen3-0.6B-gsm8k": "baseline-cosine.yaml",
}


def _read_jsonl(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------ scoring
def test_gold_extraction_matches_every_real_answer(gsm8k_dir: Path) -> None:
    """Oracle: the text after '####', commas removed, for all 8792 GSM8K answers."""
    for split in ("train", "test"):
        for row in _read_jsonl(gsm8k_dir / f"{split}.jsonl"):
            oracle = row["answer"].split("####")[-1].strip().replace(",", "")
            assert scoring.extract_gold(row["answer"]) == oracle


def test_training_target_scores_as_correct(gsm8k_dir: Path) -> None:
    """A model that reproduces the training target exactly gets every item right."""
    rows = _read_jsonl(gsm8k_dir / "test.jsonl")[:300]
    gens = [scoring.format_target(r["answer"]) + "\nQuestion: next one" for r in rows]
    assert scoring.exact_match_rate(gens, [r["answer"] for r in rows]) == 1.0


def test_real_answers_with_thousands_separators(gsm8k_dir: Path) -> None:
    rows = [
        r for r in _read_jsonl(gsm8k_dir / "train.jsonl") if "," in r["answer"].split("####")[-1]
    ]
    assert rows, "GSM8K has answers such as '#### 1,600'"
    for r in rows[:20]:
        assert "," not in scoring.extract_gold(r["answer"])


@pytest.mark.parametrize(
    ("generation", "expected"),
    [
        (" 3 + 4 = 7\n#### 7", "7"),
        (" She has $1,250.00 left.\n#### $1,250.00", "1250"),
        (" 18 / 2 = 9\n#### 9.\n\nQuestion: How many", "9"),
        (" #### 5\n#### 6", "5"),  # the first answer line counts
        (" 10 - 12 = -2\n#### -2", "-2"),
        (" The price rose by 25%.\n#### 25%", "25"),
        (" so x = 3.50 dollars\n#### 3.50", "3.5"),
        (" 40 cookies.\n#### 40.0", "40"),
        (" The answer is 42.", "42"),
        (" so the total is \\boxed{1,024}", "1024"),
        (" 2 apples and then 3 apples, 5 in all", "5"),
        (" 12 eggs\nQuestion: Tom has 99 eggs", "12"),  # text after a new question is ignored
        (" #### −7", "-7"),  # unicode minus
        (" I don't know", None),
        ("", None),
    ],
)
def test_prediction_extraction_on_tricky_generations(generation: str, expected: str | None) -> None:
    assert scoring.extract_prediction(generation) == expected


@pytest.mark.parametrize(
    ("prediction", "gold", "match"),
    [
        ("5", "5", True),
        ("5.0", "5", True),
        ("0.5", ".5", True),
        ("6", "5", False),
        (None, "5", False),
    ],
)
def test_exact_match(prediction: str | None, gold: str, match: bool) -> None:
    assert (
        scoring.exact_match(scoring.normalize_number(prediction), scoring.normalize_number(gold))
        is match
    )


def test_stop_criterion_and_bad_input() -> None:
    assert scoring.is_complete(" 2 + 2 = 4\n#### 4\n")
    assert not scoring.is_complete(" 2 + 2 = 4\n#### 4")  # the number may still grow: 4 -> 42
    assert scoring.is_complete(" 4\nQuestion:")
    with pytest.raises(ValueError, match="####"):
        scoring.extract_gold("The answer is 4")
    with pytest.raises(ValueError, match="empty"):
        scoring.format_prompt("   ")
    with pytest.raises(ValueError, match="gold answers"):
        scoring.exact_match_rate(["#### 1"], [])


# ------------------------------------------------------------------------- evaluate
def _fake_metrics(run_id: str, group: str, em: float, energy: float) -> dict[str, object]:
    return {
        "run_id": run_id,
        "group": group,
        "method": "x",
        "mode": "full",
        "budget_seconds": 1800.0,
        "em_at_30min": em,
        "em_at_budget": em,
        "energy_joules": energy,
        "eval_history": [{"time_s": 600.0, "em": em / 2}, {"time_s": 1700.0, "em": em}],
        "lr_trajectory": [{"step": 1, "time_s": 1.0, "lr": 2e-4}],
        "train_loss": [{"step": 1, "time_s": 1.0, "loss": 1.0}],
    }


def test_aggregate_gap_sign_rules_and_significance() -> None:
    evaluate = pytest.importorskip("evaluate")
    runs = {}
    for seed, (p, b) in enumerate([(92.2, 90.6), (92.4, 90.8), (92.6, 91.0)]):
        runs[f"proposed-s{seed}"] = _fake_metrics(f"proposed-s{seed}", "proposed", p, 100.0)
        runs[f"comparative-1-s{seed}"] = _fake_metrics(
            f"comparative-1-s{seed}", "comparative-1", b, 200.0
        )
    runs["baseline-fixed"] = _fake_metrics("baseline-fixed", "baseline-fixed", 74.0, 50.0)
    agg = evaluate.aggregate(runs)
    assert agg["primary_metric"] == "em_at_30min"
    assert (agg["best_proposed"], agg["best_baseline"]) == ("proposed", "comparative-1")
    assert agg["gap"] == pytest.approx((92.4 - 90.8) / 90.8 * 100)
    # energy is minimised: the best baseline is the lowest energy (50 J), and using 100 J
    # instead is a negative gap of 100 %.
    assert agg["gaps"]["energy_joules"]["gap"] == pytest.approx(-100.0)
    sig = agg["significance"]
    assert sig["permutation_p_value"] == pytest.approx(0.1)  # 3 vs 3 fully separated: 2/20
    assert 0 < sig["welch"]["p_value"] < 0.01
    assert agg["metrics"]["em_at_30min"]["baseline-fixed"] == 74.0


def _captured_figures(evaluate, monkeypatch: pytest.MonkeyPatch) -> list:
    """Make ``evaluate._save`` render each figure (as it would) and keep it for inspection."""
    figures = []

    def save(fig, stem):
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        canvas = FigureCanvasAgg(fig)
        canvas.draw()  # lays the figure out as savefig would
        fig.test_renderer = canvas.get_renderer()  # plt.close drops the canvas
        figures.append(fig)
        return [str(stem)]

    monkeypatch.setattr(evaluate, "_save", save)
    return figures


def test_all_zero_em_bar_chart_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    evaluate = pytest.importorskip("evaluate")
    pytest.importorskip("matplotlib")
    runs = {
        rid: _fake_metrics(rid, rid, 0.0, 1.0)
        for rid in ("proposed-a", "baseline-cosine", "comparative-1")
    }
    figures = _captured_figures(evaluate, monkeypatch)
    evaluate.comparison_figures(tmp_path, runs, evaluate.aggregate(runs))
    bar_ax = figures[0].axes[0]
    assert any("all EM = 0" in text.get_text() for text in bar_ax.texts)
    assert bar_ax.get_ylim()[1] > 0.5  # not a strip around 0
    runs["proposed-a"]["em_at_30min"] = 12.5  # one nonzero EM: no such note
    figures.clear()
    evaluate.comparison_figures(tmp_path, runs, evaluate.aggregate(runs))
    assert not any("all EM = 0" in text.get_text() for text in figures[0].axes[0].texts)


def test_run_figure_title_clears_the_panel_titles(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    evaluate = pytest.importorskip("evaluate")
    pytest.importorskip("matplotlib")
    figures = _captured_figures(evaluate, monkeypatch)
    evaluate.run_figures(tmp_path, _fake_metrics("proposed-iter1-Qwen3", "p", 50.0, 1.0))
    (fig,) = figures
    renderer = fig.test_renderer
    top = fig._suptitle.get_window_extent(renderer)
    for ax in fig.axes:
        title = ax.title.get_window_extent(renderer)
        assert not top.overlaps(title), (ax.get_title(), top, title)
        assert top.y0 >= title.y1


def test_auc_is_anytime_accuracy() -> None:
    train = pytest.importorskip("train")
    history = [{"time_s": 10.0, "em": 50.0}, {"time_s": 30.0, "em": 80.0}]
    assert train.auc_em_time(history, 40.0) == pytest.approx((50 * 20 + 80 * 10) / 40)


# ------------------------------------------------------------------------ stop rule
def _run_at(train, fake_time, *, remaining: float, step: int, max_step: float, per_item: float):
    """A ``train.Run`` with only what ``should_stop`` reads: a 10 s budget with ``remaining`` left."""
    from graff.clock import BudgetClock

    run = object.__new__(train.Run)
    run.tcfg = {"max_steps": 100, "eval_every": 10, "checkpoint_every": 10, "safety_seconds": 0}
    run.ecfg = {"intermediate_examples": 4, "final_examples": 8}
    run.test = list(range(20))
    run.clock = BudgetClock(seconds=10.0, time_fn=fake_time).start()
    fake_time.advance(10.0 - remaining)
    run.step, run.max_step_seconds, run.eval_seconds_per_item = step, max_step, per_item
    run.eval_every, run.checkpoint_every, run.checkpoint_seconds = 10, 10, 0.05
    return run


def test_stop_rule_keeps_the_next_step_out_of_the_final_eval_reserve(fake_time) -> None:
    """The final eval (8 items × 0.0625 s × 1.2 = 0.6 s) must still fit after the next step."""
    train = pytest.importorskip("train")
    # a 0.5 s step with 1.0 s left would leave 0.5 s for a 0.6 s evaluation: stop now
    assert _run_at(
        train, fake_time, remaining=1.0, step=5, max_step=0.5, per_item=0.0625
    ).should_stop()
    # with 1.2 s left the step and the evaluation both fit
    run = _run_at(train, fake_time, remaining=1.2, step=5, max_step=0.5, per_item=0.0625)
    assert not run.should_stop()


def test_stop_rule_counts_the_evaluation_and_checkpoint_the_next_step_triggers(fake_time) -> None:
    train = pytest.importorskip("train")
    # step 10 is followed by an intermediate eval (4 items: 0.3 s) and a checkpoint (0.05 s)
    before_eval = _run_at(train, fake_time, remaining=1.3, step=9, max_step=0.5, per_item=0.0625)
    assert before_eval.should_stop()
    plain = _run_at(train, fake_time, remaining=1.3, step=8, max_step=0.5, per_item=0.0625)
    assert not plain.should_stop()
    capped = _run_at(train, fake_time, remaining=9.0, step=100, max_step=0.5, per_item=0.0625)
    assert capped.should_stop()


# ------------------------------------------------------------------------- trial runs
@pytest.fixture(scope="module")
def trial_results(tmp_path_factory: pytest.TempPathFactory, gsm8k_dir: Path) -> Path:
    """Trial runs of GRAFF, REACTOR and the cosine baseline, then evaluate.py (in-process)."""
    train = pytest.importorskip("train")
    evaluate = pytest.importorskip("evaluate")
    pytest.importorskip("peft")
    pytest.importorskip("matplotlib")
    out = tmp_path_factory.mktemp("gsm8k_results")
    for name in RUN_CONFIGS.values():
        args = ["--config", str(CONFIGS / name), "--mode", "trial", "--results-dir", str(out)]
        assert train.main([*args, "--data-dir", str(gsm8k_dir)]) == 0
    assert evaluate.main(["--results-dir", str(out)]) == 0
    return out


@pytest.mark.slow
@pytest.mark.parametrize("run_id", sorted(RUN_CONFIGS))
def test_trial_run_writes_complete_metrics(trial_results: Path, run_id: str) -> None:
    m = json.loads((trial_results / run_id / "metrics.json").read_text())
    for key in (
        "em_at_budget",
        "auc_em_time_normalized",
        "eval_loss_at_budget",
        "energy_joules",
        "energy_available",
        "lr_trajectory",
        "guard_activations",
        "eval_history",
        "primary_metric",
    ):
        assert key in m, key
    assert 0.0 <= m["em_at_budget"] <= 100.0
    assert 0.0 <= m["auc_em_time_normalized"] <= m["em_at_budget"] + 1e-9 or m["em_at_budget"] == 0
    assert math.isfinite(m["eval_loss_at_budget"])
    assert m["energy_joules"] is None
    assert m["energy_available"] is False
    assert 1 <= m["steps"] <= 10
    assert len(m["lr_trajectory"]) == m["steps"]
    assert all(p["lr"] > 0 for p in m["lr_trajectory"])
    assert m["eval_history"][-1]["final"] is True
    # EM at budget: the final evaluation finished inside the wall-clock budget, for every method
    assert m["eval_history"][-1]["time_s"] <= m["budget_seconds"]
    assert m["final_eval_within_budget"] is True
    if m["method"] == "graff":
        assert isinstance(m["guard_activations"], int)
    for ext in ("pdf", "png"):
        assert (trial_results / run_id / f"curves.{ext}").stat().st_size > 0
    assert (trial_results / run_id / "checkpoint.pt").is_file()


def test_scheduler_seconds_count_graffs_hooks_and_estimates() -> None:
    """``own_seconds``: GRAFF's whole reported time (probe hooks inside ``optimizer.step()``,
    λ̂ estimates, ``step()``), which timing ``scheduler.step()`` alone would miss; None for a
    torch scheduler (the example times its ``step()``)."""
    import torch

    import graff

    train = pytest.importorskip("train")
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randn(16, 4)

    def loss_fn() -> torch.Tensor:
        return model(x).pow(2).mean()

    sched = graff.GraffScheduler(opt, graff.BudgetClock(steps=30), loss_fn=loss_fn)
    for _ in range(15):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
        sched.step(loss)
    report = sched.overhead_seconds()
    assert report["lambda_max"] > 0  # the cold start ran inside optimizer.step()
    assert train.own_seconds(sched) == pytest.approx(sum(report.values()))
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    assert train.own_seconds(cosine) is None


@pytest.mark.slow
def test_trial_aggregation_outputs(trial_results: Path) -> None:
    comp = trial_results / "comparison"
    agg = json.loads((comp / "aggregated_metrics.json").read_text())
    assert agg["primary_metric"] == "em_at_budget"
    assert set(agg["metrics"]["em_at_budget"]) == set(RUN_CONFIGS)
    assert agg["best_proposed"] == "proposed-iter1-Qwen3-0.6B-gsm8k"
    assert agg["best_baseline"] in {
        "comparative-1-iter1-Qwen3-0.6B-gsm8k",
        "baseline-cosine-Qwen3-0.6B-gsm8k",
    }
    assert "gap" in agg
    assert agg["gap"] is None or math.isfinite(agg["gap"])
    loss_gap = agg["gaps"]["eval_loss_at_budget"]  # EM is ~0 in trial; the loss gap is defined
    expected = -(loss_gap["proposed"] - loss_gap["baseline"]) / loss_gap["baseline"] * 100
    assert loss_gap["gap"] == pytest.approx(expected)
    assert agg["significance"]["test"] is None  # one seed per run: the reason is reported
    for stem in ("primary_metric_bar", "learning_curves"):
        for ext in ("pdf", "png"):
            assert (comp / f"{stem}.{ext}").stat().st_size > 0


@pytest.mark.slow
def test_budget_bound_trial_stops_in_time_for_the_final_eval(
    tmp_path: Path, gsm8k_dir: Path
) -> None:
    """With no step cap in reach, the stop rule (not the cap) ends training, and the final
    evaluation still finishes inside the budget."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load > 1.5 * (os.cpu_count() or 1):  # e.g. benchmark workers beside the tests
        pytest.skip(f"machine loaded (load {load:.1f}): a 3 s wall-clock budget is not testable")
    train = pytest.importorskip("train")
    cfg = train.load_config(CONFIGS / "baseline-cosine.yaml", "trial")
    # 3 s; the 0.5 s safety margin (the example's knob for it) absorbs a loaded machine's
    # jitter between the last timed evaluation and the final one, which the rule extrapolates
    cfg["training"].update(max_steps=10_000, budget_minutes=0.05, safety_seconds=0.5)
    m = train.run_training(cfg, "trial", tmp_path, str(gsm8k_dir), resume=False)
    assert 1 <= m["steps"] < 10_000
    assert m["eval_history"][-1]["final"] is True
    assert m["eval_history"][-1]["time_s"] <= m["budget_seconds"] == 3.0
    assert m["final_eval_within_budget"] is True


@pytest.mark.slow
def test_resume_continues_an_interrupted_run(tmp_path: Path, gsm8k_dir: Path) -> None:
    train = pytest.importorskip("train")
    args = [
        "--config",
        str(CONFIGS / "baseline-fixed.yaml"),
        "--mode",
        "trial",
        "--results-dir",
        str(tmp_path),
        "--data-dir",
        str(gsm8k_dir),
    ]
    assert train.main([*args, "--session-steps", "2"]) == 0
    run_dir = tmp_path / "baseline-fixed-Qwen3-0.6B-gsm8k"
    assert not (run_dir / "metrics.json").exists()
    with pytest.raises(FileExistsError, match="--resume"):
        train.main(args)
    assert train.main([*args, "--resume"]) == 0
    m = json.loads((run_dir / "metrics.json").read_text())
    steps = [p["step"] for p in m["lr_trajectory"]]
    assert steps == list(range(1, m["steps"] + 1))
    assert m["steps"] > 2
