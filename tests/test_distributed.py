"""graff under torch.distributed: 2 gloo processes on CPU, a tiny LoRA-style LM wrapped in DDP.

Each rank trains on its own shard of the same global batch. After the run the parameters of both
ranks must be bitwise equal and the LR trajectories identical (the schedulers reduce the loss,
the probe statistics and the clock once per step), and both must match a single-process run on
the whole global batch within float tolerance. Scenarios and model: ``tests/_distributed_worker.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("torch.distributed")
if not torch.distributed.is_available():  # pragma: no cover - builds without distributed
    pytest.skip("torch.distributed is not available in this build", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).parent))
import _distributed_worker as W

REPO = Path(__file__).resolve().parents[1]
WORLD = 2
pytestmark = pytest.mark.slow  # two fresh Python processes importing torch: a few seconds


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory) -> dict[str, list[dict]]:
    """Run every scenario once in a 2-rank gloo job; results per scenario, one dict per rank."""
    tmp = tmp_path_factory.mktemp("ddp")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    worker = Path(__file__).parent / "_distributed_worker.py"
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), str(r), str(WORLD), str(tmp / "store"), str(tmp)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(WORLD)
    ]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            p.kill()
            logs.append(p.communicate()[0] + "\n[killed after 240 s]")
    out = {}
    for name in [*W.ALL_SCENARIOS, "mismatch"]:
        files = [tmp / f"{name}.rank{r}.pt" for r in range(WORLD)]
        out[name] = [
            torch.load(f, weights_only=False) if f.is_file() else {"error": "no result:\n" + log}
            for f, log in zip(files, logs, strict=True)
        ]
    return out


def _ranks(results: dict, name: str) -> list[dict]:
    ranks = results[name]
    for r, res in enumerate(ranks):
        assert "error" not in res, f"rank {r} failed in {name!r}:\n{res['error']}"
    return ranks


def _assert_ranks_identical(ranks: list[dict]) -> None:
    a, b = ranks
    assert a["steps"] == b["steps"], "the ranks stopped after different numbers of steps"
    assert a["lrs"] == b["lrs"], "the LR trajectories differ between ranks"
    for n in a["params"]:
        assert torch.equal(a["params"][n], b["params"][n]), f"parameter {n} differs across ranks"


def _assert_matches_reference(rank0: dict, ref: dict) -> None:
    assert ref["steps"] == rank0["steps"]
    torch.testing.assert_close(
        torch.tensor(rank0["lrs"]), torch.tensor(ref["lrs"]), rtol=1e-4, atol=0
    )
    for n, p in ref["params"].items():
        torch.testing.assert_close(rank0["params"][n], p, rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.usefixtures("one_torch_thread")
def test_graff_scheduler_identical_across_ranks_and_equal_to_one_process(ddp_results):
    ranks = _ranks(ddp_results, "graff")
    _assert_ranks_identical(ranks)
    for res in ranks:  # the HVP λ̂ estimate ran, on the same steps, to the same value
        assert res["n_estimates"] >= 1
        assert res["entropy_calls"] >= W.STEPS  # the entropy probe saw every forward
    assert ranks[0]["lambda_max"] == ranks[1]["lambda_max"]
    assert ranks[0]["interval"] == ranks[1]["interval"]
    ref = W.run("graff")
    _assert_matches_reference(ranks[0], ref)
    assert ranks[0]["lambda_max"] == pytest.approx(ref["lambda_max"], rel=1e-4)


@pytest.mark.usefixtures("one_torch_thread")
def test_reactor_scheduler_identical_across_ranks_and_equal_to_one_process(ddp_results):
    ranks = _ranks(ddp_results, "reactor")
    assert ranks[0]["seed"] == ranks[1]["seed"], "seed=None must draw one seed for all ranks"
    _assert_ranks_identical(ranks)
    assert ranks[0]["n_estimates"] >= 1
    assert ranks[0]["entropy_calls"] >= W.STEPS
    assert ranks[0]["lambda_max"] == ranks[1]["lambda_max"]
    ref = W.run("reactor", extra={"seed": ranks[0]["seed"]})
    _assert_matches_reference(ranks[0], ref)


@pytest.mark.usefixtures("one_torch_thread")
def test_budget_scheduler_follows_one_clock_when_rank_clocks_differ(ddp_results):
    ranks = _ranks(ddp_results, "budget_fake_clock")
    _assert_ranks_identical(ranks)
    # rank 0's simulated clock (1 s per step) is the one every rank follows
    expected_steps = round(W.FAKE_BUDGET_SECONDS / W.FAKE_SECONDS_PER_STEP[0])
    assert ranks[0]["steps"] == expected_steps
    _assert_matches_reference(ranks[0], W.run("budget_fake_clock"))


def test_budget_scheduler_stops_on_the_same_step_with_real_clocks(ddp_results):
    ranks = _ranks(ddp_results, "budget_sleep")
    _assert_ranks_identical(ranks)
    assert ranks[0]["steps"] >= 2
    assert ranks[0]["fraction_used"] == ranks[1]["fraction_used"] == 1.0


def test_opting_out_lets_the_ranks_drift_apart(ddp_results):
    """The negative control: planning on rank-local inputs gives different LRs (and parameters)."""
    a, b = _ranks(ddp_results, "graff_opt_out")
    assert a["lrs"] != b["lrs"]
    assert any(not torch.equal(a["params"][n], b["params"][n]) for n in a["params"])


def test_a_step_skipped_on_one_rank_raises_on_every_rank(ddp_results):
    ranks = _ranks(ddp_results, "mismatch")
    assert [r["raised_at"] for r in ranks] == [3, 3]
    assert "optimizer.step() ran on 1 of 2 ranks" in ranks[0]["message"]


def test_single_process_and_one_rank_groups_need_no_communication(tmp_path):
    import torch.distributed as dist

    from graff.distributed import resolve_sync
    from graff.errors import GraffConfigError

    assert resolve_sync() is None  # torch.distributed not initialised
    with pytest.raises(GraffConfigError, match="init_process_group"):
        resolve_sync(distributed=True)
    with pytest.raises(GraffConfigError, match="distributed must be"):
        resolve_sync(distributed="yes")
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        assert resolve_sync() is None  # one rank: nothing to agree on
        p = torch.nn.Parameter(torch.zeros(2))
        sched = W.graff.BudgetScheduler(torch.optim.SGD([p], lr=0.1), W.graff.BudgetClock(steps=4))
        assert sched._sync is None
    finally:
        dist.destroy_process_group()


@pytest.mark.usefixtures("one_torch_thread")
def test_fsdp2_per_step_statistics_are_reduced_over_the_shards(ddp_results):
    """FSDP2 (fully_shard, gloo, CPU): the dot products over parameter shards are partial sums."""
    ranks = _ranks(ddp_results, "fsdp_graff_no_guard")
    _assert_ranks_identical(ranks)
    _assert_matches_reference(ranks[0], W.run("fsdp_graff_no_guard"))


def test_fsdp2_turns_the_hvp_off_with_a_warning_and_ranks_still_agree(ddp_results):
    ranks = _ranks(ddp_results, "fsdp_graff")
    _assert_ranks_identical(ranks)
    for res in ranks:
        assert res["n_estimates"] == 0
        assert any("sharded" in w for w in res["warnings"]), res["warnings"]


def test_fsdp2_a_nan_gradient_shard_on_one_rank_drops_the_sample_on_every_rank(ddp_results):
    """Rank 1's local gradient shard turns NaN after one update: the curvature probe on that
    rank sees a non-finite ⟨g_t, Δθ_t⟩; the flag is reduced with the statistics, so both ranks
    drop that one sample, keep planning the same finite LRs and the same parameters."""
    ranks = _ranks(ddp_results, "fsdp_graff_nan_shard")
    _assert_ranks_identical(ranks)
    assert [r["dropped_samples"] for r in ranks] == [1, 1]
    assert all(0 < lr < float("inf") for r in ranks for step in r["lrs"] for lr in step)
    clean = W.run("fsdp_graff_nan_shard")  # one process: no NaN shard, no dropped sample
    assert clean["dropped_samples"] == 0
