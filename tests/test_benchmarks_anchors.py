"""Issue 18's tuning-free anchors and the SGD task: what each builds, and that anchors take no LR."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from torch import nn

from benchmarks import runner
from benchmarks.schedulers import ANCHORS, SGD_MOMENTUM, current_lr, make
from benchmarks.suites import build_task

ANCHOR_PACKAGES = {
    "prodigy": "prodigyopt",
    "dadapt": "dadaptation",
    "dog": "dog",
    "schedule_free_default": "schedulefree",
}


def _quadratic_run(name: str, lr: float, optimizer: str = "adamw", steps: int = 6) -> list[float]:
    """A few steps of ``name`` on a fixed least-squares problem; the parameters afterwards."""
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    setup = make(name, model, lr, 20, seed=0, optimizer=optimizer)
    for _ in range(steps):
        setup.train_mode()
        setup.optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        setup.optimizer.step()
        setup.after_step()
        if setup.scheduler is not None:
            setup.scheduler.step()
    setup.eval_mode()
    return [float(v) for v in torch.cat([p.detach().flatten() for p in model.parameters()])]


@pytest.mark.parametrize("name", sorted(ANCHOR_PACKAGES))
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_anchors_ignore_the_users_lr(name: str, optimizer: str) -> None:
    pytest.importorskip(ANCHOR_PACKAGES[name])
    assert _quadratic_run(name, 1e-3, optimizer) == _quadratic_run(name, 3e-1, optimizer)


@pytest.mark.parametrize("control", ["cosine", "fixed", "schedule_free"])
def test_lr_taking_variants_do_take_it(control: str) -> None:
    """The control for the test above: the same comparison tells LR-taking variants apart."""
    assert _quadratic_run(control, 1e-3) != _quadratic_run(control, 3e-1)


@pytest.mark.parametrize(
    ("name", "optimizer", "expected"),
    [
        ("prodigy", "adamw", "Prodigy"),
        ("prodigy", "sgd", "Prodigy"),  # no SGD flavour: stays Adam-type
        ("dadapt", "adamw", "DAdaptAdam"),
        ("dadapt", "sgd", "DAdaptSGD"),
        ("dog", "adamw", "DoG"),
        ("dog", "sgd", "DoG"),
        ("schedule_free_default", "adamw", "AdamWScheduleFree"),
        ("schedule_free_default", "sgd", "SGDScheduleFree"),
    ],
)
def test_each_anchor_builds_its_own_optimizer(name: str, optimizer: str, expected: str) -> None:
    pytest.importorskip(ANCHOR_PACKAGES[name])
    setup = make(name, nn.Linear(4, 2), 1e-3, 20, seed=0, optimizer=optimizer)
    assert type(setup.optimizer).__name__ == expected
    group = setup.optimizer.param_groups[0]
    default_lr = {"AdamWScheduleFree": 0.0025}.get(expected, 1.0)
    assert group.get("initial_lr", group["lr"]) == pytest.approx(default_lr)


def test_prodigy_uses_its_readme_settings_and_cosine_annealing() -> None:
    pytest.importorskip("prodigyopt")
    model = nn.Linear(4, 2)
    setup = make("prodigy", model, 1e-3, 10, seed=0, weight_decay=0.01)
    group = setup.optimizer.param_groups[0]
    assert group["safeguard_warmup"] is True
    assert group["use_bias_correction"] is True
    assert group["weight_decay"] == 0.01
    # the factor the anchor applies is CosineAnnealingLR(T_max=steps)'s, step by step
    ref_opt = torch.optim.SGD(nn.Linear(4, 2).parameters(), lr=1.0)
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(ref_opt, T_max=10)
    for _ in range(10):
        assert group["lr"] == pytest.approx(ref_opt.param_groups[0]["lr"], abs=1e-12)
        setup.optimizer.step()
        setup.scheduler.step()
        ref_opt.step()
        ref.step()


def test_dog_evaluates_its_averaged_iterate() -> None:
    pytest.importorskip("dog")
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    setup = make("dog", model, 1e-3, 20, seed=0)
    assert setup.eval_model is not None
    assert setup.eval_model is not model
    assert math.isnan(current_lr(setup))  # DoG has no step size before its first step
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    for _ in range(5):
        setup.optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        setup.optimizer.step()
        setup.after_step()
    assert current_lr(setup) > 0
    averaged = torch.cat([p.flatten() for p in setup.eval_model.parameters()])
    current = torch.cat([p.flatten() for p in model.parameters()])
    assert not torch.equal(averaged, current)


@pytest.mark.parametrize("name", ["fixed", "cosine", "wsd", "graff", "prior_only", "reactor"])
def test_sgd_task_variants_use_sgd_with_momentum(name: str) -> None:
    setup = make(name, nn.Linear(4, 2), 0.05, 20, seed=0, optimizer="sgd", weight_decay=5e-4)
    assert type(setup.optimizer) is torch.optim.SGD
    group = setup.optimizer.param_groups[0]
    assert (group["momentum"], group["nesterov"], group["weight_decay"]) == (
        SGD_MOMENTUM,
        False,
        5e-4,
    )
    adam = make(name, nn.Linear(4, 2), 0.05, 20, seed=0)
    assert type(adam.optimizer) is torch.optim.AdamW  # the control: the default stays AdamW


def test_schedule_free_baseline_takes_the_users_lr_in_its_sgd_flavour() -> None:
    setup = make("schedule_free", nn.Linear(4, 2), 0.05, 20, seed=0, optimizer="sgd")
    assert type(setup.optimizer).__name__ == "SGDScheduleFree"
    assert setup.optimizer.param_groups[0]["lr"] == 0.05


def test_sgd_task_runs_record_the_optimizer_and_its_default_lr(monkeypatch) -> None:
    task = build_task("digits_cnn_sgd", {"steps": 6, "channels": 2})
    task.setup()
    monkeypatch.setitem(runner._TASKS, task.name, task)
    result = runner.run_one({"task": task.name, "scheduler": "cosine", "lr_mult": 3.0, "seed": 0})
    assert result["status"] == "ok", result.get("traceback")
    assert (result["optimizer"], result["lr_taken"]) == ("sgd", True)
    assert result["lr"] == pytest.approx(0.05 * 3.0)


@pytest.mark.parametrize("name", ["prodigy", "dog"])
def test_anchor_runs_are_marked_as_taking_no_lr(monkeypatch, name: str) -> None:
    pytest.importorskip(ANCHOR_PACKAGES[name])
    task = build_task("digits_mlp", {"steps": 4})
    task.setup()
    monkeypatch.setitem(runner._TASKS, task.name, task)
    result = runner.run_one({"task": task.name, "scheduler": name, "lr_mult": 1.0, "seed": 0})
    assert result["status"] == "ok", result.get("traceback")
    assert result["lr_taken"] is False
    assert result["lr"] == 1.0


def test_a_missing_anchor_package_is_a_skip_not_an_error(monkeypatch) -> None:
    task = build_task("digits_mlp", {"steps": 4})
    task.setup()
    monkeypatch.setitem(runner._TASKS, task.name, task)
    monkeypatch.setitem(sys.modules, "prodigyopt", None)  # makes the import fail
    result = runner.run_one({"task": task.name, "scheduler": "prodigy", "lr_mult": 1.0, "seed": 0})
    assert result["status"] == "skipped"
    assert ".[bench]" in result["error"]


def test_every_anchor_is_known_to_make() -> None:
    assert set(ANCHORS) == {*ANCHOR_PACKAGES, "lr_range_wsd"}
    with pytest.raises(ValueError, match="lr_range"):
        make("lr_range_wsd", nn.Linear(4, 2), 1e-3, 20, seed=0)
