"""metatrain/clone.py: behaviour cloning of the best constant LR shift (#17, attempt 3)."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("sklearn")

from metatrain import __main__ as cli
from metatrain import clone, graff_api, runner
from metatrain.sampler import TaskSpec


def test_best_shift_is_the_parabola_vertex_inside_and_the_grid_point_at_an_edge():
    s = clone.SHIFTS
    # a parabola in the shift with its minimum at 0.3: the three points around it recover it
    assert clone.best_shift([(x - 0.3) ** 2 for x in s]) == pytest.approx(0.3)
    assert clone.best_shift([(x + 0.5) ** 2 for x in s]) == pytest.approx(-0.5)
    # decreasing to the top edge: the edge itself (no extrapolation past the grid)
    assert clone.best_shift([5.0, 4.0, 3.0, 2.0, 1.0]) == s[-1]
    assert clone.best_shift([1.0, 2.0, 3.0, 4.0, 5.0]) == s[0]
    # two equal best points: half-way between them
    assert clone.best_shift([2.0, 1.0, 1.0, 3.0, 3.0]) == pytest.approx(0.5 * (s[1] + s[2]))
    assert clone.best_shift([1.0] * 5) == s[0]  # flat: the first point (no information)


def test_the_recording_run_is_planner_off_step_for_step_and_records_every_plan():
    for spec in (
        TaskSpec("shapes", "cnn", "adamw", 30, 1.0, 7),
        TaskSpec("markov", "transformer", "sgd", 30, 3.0, 8),
    ):
        off = runner.run_task(spec, None)
        result, x, adjacency = clone.record(spec)
        assert result.final == off.final  # same LR at every step
        assert x.shape == (3, adjacency.shape[0], 10)  # one plan every 10 steps
        assert bool(torch.isfinite(x).all())


def test_fit_reduces_the_regression_loss_on_a_learnable_target():
    torch.manual_seed(0)
    # the target is a function of the first feature: the planner must read it
    seqs = []
    for i in range(24):
        level = (i % 5 - 2) / 2.0
        x = torch.randn(6, 2, 10) * 0.1
        x[..., 0] = level
        seqs.append(clone.Sequence(str(i), x, torch.ones(2, 2) / 2, level * 0.8, 1.0))
    state = {"vectors": [graff_api.fresh_vector(0)], "adam": None, "log": []}
    saved = []
    clone.fit(
        seqs[:18], seqs[18:], clone.FitConfig(epochs=15, lr=1e-2, batch=6), state, saved.append
    )
    log = state["log"]
    assert len(state["vectors"]) == len(log) == len(saved) == 16
    assert log[-1]["train"] < 0.2 * log[0]["train"]
    assert log[-1]["val"] < 0.3 * log[0]["val"]  # held-out sequences too


def test_clone_cli_runs_resumes_without_rerunning_and_exports(
    tmp_path, monkeypatch, cheap_lora_base
):
    calls = []
    real = runner.run_with

    def counting(spec, build):
        calls.append(spec.key())
        return real(spec, build)

    monkeypatch.setattr(clone, "run_with", counting)
    monkeypatch.setattr(clone, "VAL_SEEDS", (12345,))
    out = tmp_path / "bc"
    args = [
        "clone",
        "--out",
        str(out),
        "--train-tasks",
        "1",
        "--val-sets",
        "1",
        "--max-steps",
        "20",
    ]
    cli.main([*args, "--epochs", "1", "--eval-epochs", "0,last"])
    swept = len(calls)
    assert swept == 12 * len(clone.SHIFTS)  # 1 train + 11 val tasks, 5 shifts each
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["eval"]) == {"0", "1"}
    assert len(summary["val_tasks"]) == 11
    assert all(math.isfinite(v) for v in summary["eval"].values())
    # resume: extend the fit, nothing swept again, and export the last epoch
    cli.main(
        [
            *args,
            "--epochs",
            "2",
            "--eval-epochs",
            "last",
            "--export",
            str(tmp_path / "p.safetensors"),
        ]
    )
    assert len(calls) == swept
    state = torch.load(out / "fit.pt", weights_only=False)
    assert len(state["vectors"]) == 3
    assert torch.equal(graff_api.load_vector(tmp_path / "p.safetensors"), state["vectors"][2])
    with pytest.raises(SystemExit, match="fitted with"):
        cli.main([*args, "--epochs", "2", "--lr", "0.5"])
    assert (out / "curve.png").stat().st_size > 0


def test_linear_probe_finds_a_readable_target_and_not_a_random_one():
    gen = torch.Generator().manual_seed(0)

    def seqs(n: int, readable: bool) -> list[clone.Sequence]:
        out = []
        for i in range(n):
            x = torch.randn(5, 3, 10, generator=gen)
            target = (
                float(x[..., 2].mean()) * 3 if readable else float(torch.randn(1, generator=gen))
            )
            out.append(clone.Sequence(str(i), x, torch.eye(3), target, 1.0))
        return out

    readable = clone.linear_probe(seqs(80, True), seqs(40, True))
    assert readable["ridge"]["1"]["val"] < 0.2 * readable["zero_residual"]
    noise = clone.linear_probe(seqs(80, False), seqs(40, False))
    assert min(r["val"] for r in noise["ridge"].values()) > 0.8 * noise["zero_residual"]
