"""``benchmarks run --graff-kwargs``: extra GraffScheduler arguments reach every GRAFF variant."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from benchmarks import runner
from benchmarks.__main__ import _graff_kwargs
from benchmarks.schedulers import make
from benchmarks.tasks import DigitsTask


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{plan_every: 3}", "JSON object"),
        ("[1, 2]", "JSON object"),
        ('{"plan_evrey": 3}', "plan_evrey"),
    ],
)
def test_bad_graff_kwargs_are_clear_errors(text: str, message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        _graff_kwargs(text)


def test_graff_kwargs_parse_to_a_dict() -> None:
    assert _graff_kwargs(None) == {}
    assert _graff_kwargs('{"plan_every": 3, "probe_every": 2}') == {
        "plan_every": 3,
        "probe_every": 2,
    }


def test_make_passes_graff_kwargs_to_graff_variants_only() -> None:
    extra = {"plan_every": 3, "probe_every": 2}
    for name in ("graff", "graff_frozen", "prior_only"):
        setup = make(name, nn.Linear(4, 2), 1e-3, 20, seed=0, graff_kwargs=extra)
        assert (setup.scheduler.config.plan_every, setup.scheduler.config.probe_every) == (3, 2)
        assert setup.scheduler.config.online is (
            name == "graff"
        )  # the variant's own switch is kept
    default = make("graff", nn.Linear(4, 2), 1e-3, 20, seed=0)
    assert (default.scheduler.config.plan_every, default.scheduler.config.probe_interval) == (
        10,
        10,
    )
    # a variant's own switches win over the extra arguments: each stays its ablation
    frozen = make("graff_frozen", nn.Linear(4, 2), 1e-3, 20, seed=0, graff_kwargs={"online": True})
    assert frozen.scheduler.config.online is False
    graff = make("graff", nn.Linear(4, 2), 1e-3, 20, seed=0, graff_kwargs={"online": False})
    assert graff.scheduler.config.online is False
    cosine = make("cosine", nn.Linear(4, 2), 1e-3, 20, seed=0, graff_kwargs=extra)
    assert isinstance(cosine.scheduler, torch.optim.lr_scheduler.LambdaLR)


def test_a_run_records_and_uses_its_graff_kwargs(monkeypatch) -> None:
    task = DigitsTask(steps=6)
    task.setup()
    monkeypatch.setitem(runner._TASKS, task.name, task)
    seen = {}
    original = make

    def spy(*args, **kwargs):
        setup = original(*args, **kwargs)
        seen["plan_every"] = setup.scheduler.config.plan_every
        return setup

    monkeypatch.setattr(runner, "make", spy)
    spec = {
        "task": task.name,
        "scheduler": "graff",
        "lr_mult": 1.0,
        "seed": 0,
        "graff_kwargs": {"plan_every": 4},
    }
    result = runner.run_one(spec)
    assert result["status"] == "ok", result.get("traceback")
    assert result["graff_kwargs"] == {"plan_every": 4}
    assert seen["plan_every"] == 4


def test_provenance_records_the_cpu_that_decides_the_bits() -> None:
    """Two machines give slightly different results under the same step budget (other CPU
    kernels): every results file names the CPU and torch's kernel set."""
    import torch

    from benchmarks.meta import cpu_model, provenance

    machine = provenance()["machine"]
    assert machine["cpu"] == cpu_model()
    assert isinstance(machine["cpu"], str)
    assert machine["cpu"]
    assert machine["cpu_kernels"] == torch.backends.cpu.get_cpu_capability()
