"""graff.pretrain (ES meta-training of the default planner) and the shipped planner file."""

from __future__ import annotations

import json

import pytest
import torch

from graff.planner.features import StatsWindow
from graff.planner.net import PlannerNet, default_planner_path, load_planner
from graff.pretrain import CharCorpus, Task, main, run_task


def test_shipped_default_planner_loads_and_records_its_provenance() -> None:
    path = default_planner_path()
    planner = load_planner("default")
    assert isinstance(planner, PlannerNet)
    provenance = json.loads(path.with_suffix(".json").read_text())
    assert provenance["command"].startswith("python")
    assert "graff.pretrain" in provenance["command"]
    assert len(provenance["log"]) >= 1


def test_es_run_moves_the_planner_and_writes_provenance(gsm8k_dir, tmp_path) -> None:
    corpus = CharCorpus(gsm8k_dir, chars=20_000)
    task = Task(seed=1, hidden=32, lr=1e-3, steps=3)
    assert run_task(task, corpus, None) == run_task(task, corpus, None)  # seeded: reproducible
    out = tmp_path / "p.safetensors"
    argv = [
        "--out",
        str(out),
        "--data-dir",
        str(gsm8k_dir),
        "--iterations",
        "1",
        "--pairs",
        "1",
        "--steps",
        "3",
    ]
    assert main(argv) == 0
    torch.manual_seed(0)
    start = torch.nn.utils.parameters_to_vector(PlannerNet().parameters())
    moved = torch.nn.utils.parameters_to_vector(load_planner(out).parameters())
    assert not torch.equal(start, moved)
    assert torch.isfinite(moved).all()
    provenance = json.loads(out.with_suffix(".json").read_text())
    assert provenance["args"]["iterations"] == "1"
    assert len(provenance["log"]) == 1


def test_missing_data_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"train\.jsonl"):
        CharCorpus(tmp_path)


def test_stats_window_sums_samples_once() -> None:
    class Sample:
        def __init__(self, step: int, value: float) -> None:
            self.step = step
            self.hypergrad = torch.tensor([value, -value])
            self.grad_sq_norm = torch.tensor([1.0, 4.0])
            self.update_sq_norm = torch.tensor([2.0, 2.0])
            self.secant_ratio = torch.tensor([value, 0.0])

    window = StatsWindow(2)
    assert window.stats() is None
    first = Sample(0, 1.0)
    window.add(first)
    window.add(first)  # the probe's last sample, seen again: counted once
    window.add(Sample(1, 3.0))
    window.add(Sample(2, float("nan")))  # non-finite: dropped
    stats = window.stats()
    torch.testing.assert_close(stats.hypergrad, torch.tensor([4.0, -4.0]))
    torch.testing.assert_close(stats.grad_sq_norm, torch.tensor([2.0, 8.0]))
    torch.testing.assert_close(stats.secant_ratio, torch.tensor([2.0, 0.0]))
    clone = StatsWindow(2)
    clone.load_state_dict(window.state_dict())
    torch.testing.assert_close(clone.stats().hypergrad, stats.hypergrad)
    window.reset()
    assert window.stats() is None
