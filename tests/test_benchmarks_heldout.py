"""``python -m benchmarks heldout``: pairing of λ̂ on/off runs, the summary, and one real cell."""

from __future__ import annotations

import json
import math

import pytest
import torch

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


def _clean_commit(monkeypatch, commit: str, dirty: bool = False) -> None:
    import benchmarks.meta

    real = benchmarks.meta.provenance

    def fake() -> dict:
        return real() | {"git_commit": commit, "git_dirty": dirty}

    monkeypatch.setattr(benchmarks.meta, "provenance", fake)


def test_a_cell_runs_and_a_rerun_of_the_same_commit_skips_it(tmp_path, monkeypatch) -> None:
    """One real cell (a tabular MLP, 200 steps, λ̂ on and off), then the command again at the
    same clean commit: nothing left to do, the same rows; at another commit it starts over."""
    args = ["--out", str(tmp_path), "--seeds", "1", "--char-seeds", "--optimizers", "adamw",
            "--workers", "1"]  # fmt: skip
    monkeypatch.setattr(heldout, "COMBOS", (("tabular", "mlp"),))
    _clean_commit(monkeypatch, "c0ffee")
    heldout.main(args)
    log = tmp_path / "runs.jsonl"
    rows = [json.loads(s) for s in log.read_text().splitlines()]
    assert len(rows) == 6  # 3 LR factors × λ̂ on/off
    assert all(r["status"] == "ok" and math.isfinite(r["final"]) for r in rows)
    assert {r["resume_key"] for r in rows} == {"c0ffee"}
    heldout.main(args)
    assert [json.loads(s) for s in log.read_text().splitlines()] == rows
    assert "| adamw | tabular | 3 |" in (tmp_path / "summary.md").read_text()
    monkeypatch.setattr(heldout, "COMBOS", ())  # nothing to run: only what is kept
    _clean_commit(monkeypatch, "beef01")
    heldout.main(args)
    assert log.read_text() == ""  # runs of another commit are not kept


def test_kept_rows_are_those_of_the_same_clean_commit(tmp_path) -> None:
    """Rows of another commit, failed rows and a torn last line are not kept; ``None`` (dirty
    tree or ``--fresh``) keeps nothing."""
    log = tmp_path / "runs.jsonl"
    rows = [
        _row("tabular", 1.0, 1, True, 0.5) | {"resume_key": "k"},
        _row("tabular", 1.0, 1, False, 0.6) | {"resume_key": "other"},
        _row("tabular", 10.0, 1, True, 0.7) | {"resume_key": "k", "status": "error"},
        _row("tabular", 0.1, 1, True, 0.8),  # written before runs recorded their commit
    ]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"family": "tab')
    kept = heldout.kept_rows(log, "k")
    assert [(r["factor"], r["final"]) for r in kept] == [(1.0, 0.5)]
    assert heldout.kept_rows(log, None) == []
    assert heldout.kept_rows(tmp_path / "absent.jsonl", "k") == []


def test_a_trace_is_the_sweeps_run_step_by_step(capsys) -> None:
    """``--trace``: the same run as the sweep's cell (same final loss), its rows dense from the
    first λ̂ through the search's end, and the command prints it."""
    cell = {"family": "tabular", "arch": "mlp", "optimizer": "adamw", "factor": 1.0, "seed": 1,
            "lam": True, "graff_kwargs": {}}  # fmt: skip
    rows, final = heldout.trace_cell(cell)
    assert final == heldout.run_cell(cell)["final"]
    steps = [r["step"] for r in rows]
    assert steps == sorted(steps)
    assert steps[-1] == heldout.STEPS
    first = next(r["step"] for r in rows if r["lambda_max"] is not None)
    assert set(range(first, int(0.15 * heldout.STEPS) + 5)) <= set(steps)
    assert all(r["refreshes"] >= 0 and r["lr_factor"] > 0 for r in rows)
    heldout.main(["--trace", "tabular/mlp/adamw/1/1"])
    text = capsys.readouterr().out
    assert f"λ̂ on: final validation loss {final:.4g}" in text
    assert "| step | loss | LR (× user's) | λ̂ |" in text


def test_a_trace_without_lambda_is_the_sweeps_run_and_shows_the_one_step_signals() -> None:
    """The λ̂-off trace is the sweep's run too, whatever the caller's thread count (the sweep runs
    one thread; more reorder reductions); sampled rows carry κ in [-1, 1] and q consistent with
    it: q − 1 = ⟨g_{t+1}, Δθ⟩/(−⟨g_t, Δθ⟩) has κ's sign."""
    cell = {"family": "tabular", "arch": "mlp", "optimizer": "adamw", "factor": 10.0, "seed": 1,
            "lam": False, "graff_kwargs": {}}  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        rows, final = heldout.trace_cell(cell)
        assert torch.get_num_threads() == 2  # restored
    finally:
        torch.set_num_threads(threads)
    assert final == heldout.run_cell(cell)["final"]
    sampled = [r for r in rows if r["hyper_cosine"] is not None]
    assert len(sampled) >= heldout.STEPS // 10 - 1
    for r in sampled:
        assert -1.0 <= r["hyper_cosine"] <= 1.0
        if r["secant_ratio"] is not None and abs(r["hyper_cosine"]) > 1e-6:
            assert (r["secant_ratio"] > 1.0) == (r["hyper_cosine"] > 0.0)
    text = heldout.trace_markdown(cell, rows, final)
    assert "| κ (sample) | q (sample) |" in text


def test_one_step_signals_closed_form() -> None:
    """κ and q of a hand-made sample: g_{t+1} = (1, 0), Δθ = (−1, −1), g_t = (2, 2)."""
    from graff.probes.stats import CurvatureStats

    t = torch.tensor
    stats = CurvatureStats(
        step=3, hypergrad=t([-1.0]), grad_dot_update=t([-4.0]), update_sq_norm=t([2.0]),
        grad_sq_norm=t([1.0]), secant=t([0.0]), secant_ratio=t([0.0]),
    )  # fmt: skip
    kappa, q = heldout.one_step_signals(stats)
    assert kappa == pytest.approx(-1.0 / 2.0**0.5, rel=1e-6)
    assert q == pytest.approx((-1.0 + 4.0) / 4.0)  # ⟨g_{t+1} − g_t, Δθ⟩ / (−⟨g_t, Δθ⟩)
    ascent = CurvatureStats(
        step=3, hypergrad=t([1.0]), grad_dot_update=t([1.0]), update_sq_norm=t([1.0]),
        grad_sq_norm=t([1.0]), secant=t([0.0]), secant_ratio=t([0.0]),
    )  # fmt: skip
    assert heldout.one_step_signals(ascent)[1] is None  # not a descent step: no q


def test_a_bad_trace_argument_is_refused() -> None:
    for bad in ("tabular/mlp/adamw/1", "tabular/cnn/adamw/1/1", "tabular/mlp/lion/1/1",
                "tabular/mlp/adamw/x/1"):  # fmt: skip
        with pytest.raises(SystemExit, match="--trace"):
            heldout.main(["--trace", bad])


@pytest.mark.parametrize(("dirty", "fresh", "key"), [(False, False, "c0ffee"), (True, False, None),
                                                     (False, True, None)])  # fmt: skip
def test_the_sweep_resumes_only_clean_code(tmp_path, monkeypatch, dirty, fresh, key) -> None:
    """The key a rerun keeps runs by: the clean commit; None with uncommitted changes or
    ``--fresh``."""
    seen: list = []
    monkeypatch.setattr(heldout, "COMBOS", ())
    monkeypatch.setattr(heldout, "kept_rows", lambda path, k: seen.append(k) or [])
    _clean_commit(monkeypatch, "c0ffee", dirty=dirty)
    heldout.main(["--out", str(tmp_path), "--char-seeds", *(["--fresh"] if fresh else [])])
    assert seen == [key]


def test_steps_sets_the_budget_of_the_family_cells_and_keys_them_apart() -> None:
    """``--steps``: the metatrain-family cells carry their budget (the char transformer keeps its
    own), and a cell at another budget never resumes from one at the default."""
    default = heldout.cells([1], ["adamw"], [0], {}, None)
    longer = heldout.cells([1], ["adamw"], [0], {}, None, steps=800)
    assert all("steps" not in c for c in default)
    assert {c.get("steps") for c in longer if c["family"] != "char"} == {800}
    assert all("steps" not in c for c in longer if c["family"] == "char")
    family = [i for i, c in enumerate(default) if c["family"] != "char"]
    assert all(heldout._key(default[i]) != heldout._key(longer[i]) for i in family)
    char = [i for i, c in enumerate(default) if c["family"] == "char"]
    assert all(heldout._key(default[i]) == heldout._key(longer[i]) for i in char)


def test_a_cell_trains_for_its_own_budget(monkeypatch) -> None:
    seen = []
    monkeypatch.setattr(heldout, "_train", lambda *a: seen.append(a[4]) or {"final": 1.0})
    cell = {"family": "tabular", "arch": "mlp", "optimizer": "adamw", "factor": 1.0, "seed": 1,
            "lam": False, "steps": 37}  # fmt: skip
    assert heldout.run_cell(cell)["status"] == "ok"
    assert seen == [37]


def test_lr_jitter_scales_the_lr_and_keys_the_cells_apart(monkeypatch) -> None:
    """``--lr-jitter``: every cell's optimizer LR is the default × factor × jitter, recorded in
    the cell and its key (a jittered run never resumes from, or is counted with, a default one)."""
    from metatrain.tasks import DEFAULT_LR

    default = heldout.cells([1], ["sgd"], [0], {}, None)
    jittered = heldout.cells([1], ["sgd"], [0], {}, None, jitter=1.01)
    assert all("lr_jitter" not in c for c in default)
    assert {c["lr_jitter"] for c in jittered} == {1.01}
    assert all(heldout._key(a) != heldout._key(b) for a, b in zip(default, jittered, strict=True))
    lrs = []
    monkeypatch.setattr(
        heldout,
        "_train",
        lambda task, model, opt, *a: lrs.append(opt.param_groups[0]["initial_lr"]) or {},
    )
    cell = {"family": "tabular", "arch": "mlp", "optimizer": "sgd", "factor": 0.1, "seed": 1,
            "lam": False}  # fmt: skip
    for jitter in (1.0, 1.01):
        assert heldout.run_cell({**cell, "lr_jitter": jitter})["status"] == "ok"
    base = DEFAULT_LR[("mlp", "sgd")] * 0.1
    assert lrs == [pytest.approx(base), pytest.approx(base * 1.01)]
    with pytest.raises(SystemExit):
        heldout.main(["--lr-jitter", "0"])
