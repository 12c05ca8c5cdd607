"""Training runs for ``tests/test_distributed.py``: one rank of a gloo job, or the 1-process reference.

Run as ``python tests/_distributed_worker.py RANK WORLD_SIZE STORE_FILE OUT_DIR``: joins a gloo
process group through a file store, runs every scenario of :data:`SCENARIOS` on a tiny LoRA-style
causal LM wrapped in ``DistributedDataParallel`` (each rank a different shard of the same global
batch) and saves, per scenario, the LR trajectory, the final parameters and a few probe readings
to ``OUT_DIR/<scenario>.rank<RANK>.pt``. The test imports :func:`run` to compute the same
scenarios in one process on the whole global batch.
"""

from __future__ import annotations

import math
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import nn

import graff

VOCAB, DIM, SEQ, GLOBAL_BATCH = 16, 16, 8, 8
STEPS = 40
#: Simulated seconds per step on each rank's clock (the ranks' clocks disagree on purpose).
FAKE_SECONDS_PER_STEP = (1.0, 2.5)
FAKE_BUDGET_SECONDS = 24.0
SLEEP_BUDGET_SECONDS = 0.6
SLEEP_PER_STEP = (0.0, 0.01)  # rank 1 is slower: its own clock would run out first


class LoRALinear(nn.Module):
    """A frozen linear map plus a trainable low-rank update (parameters named like peft's)."""

    def __init__(self, dim: int, rank: int = 2) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim, dim) / math.sqrt(dim), requires_grad=False)
        self.lora_A = nn.Parameter(torch.randn(rank, dim) * 0.3)
        self.lora_B = nn.Parameter(torch.randn(dim, rank) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ (self.weight + self.lora_B @ self.lora_A).t()


class Layer(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.q_proj, self.up_proj = LoRALinear(dim), LoRALinear(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.up_proj(torch.tanh(self.q_proj(x))))


class Trunk(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList([Layer(DIM), Layer(DIM)])
        self.norm = nn.LayerNorm(DIM)


class TinyLM(nn.Module):
    """Llama-style layout (``model.layers``, ``model.norm``, ``lm_head``): the probes detect it."""

    def __init__(self) -> None:
        super().__init__()
        self.model = Trunk()
        self.lm_head = nn.Linear(DIM, VOCAB)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.model.embed(input_ids)
        for layer in self.model.layers:
            h = layer(h)
        logits = self.lm_head(self.model.norm(h))
        loss = nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1)
        )
        return {"loss": loss, "logits": logits}


def make_model() -> TinyLM:
    torch.manual_seed(0)
    model = TinyLM()
    model.model.embed.requires_grad_(False)
    return model


def global_batch(step: int) -> torch.Tensor:
    """The global batch of ``step``: learnable (next token = token + 1 mod V, with noise)."""
    gen = torch.Generator().manual_seed(1000 + step)
    start = torch.randint(0, VOCAB, (GLOBAL_BATCH, 1), generator=gen)
    ids = (start + torch.arange(SEQ)) % VOCAB
    noise = torch.randint(0, VOCAB, ids.shape, generator=gen)
    keep = torch.rand(ids.shape, generator=gen) < 0.8
    return torch.where(keep, ids, noise)


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    rest = [p for n, p in model.named_parameters() if "lora_" not in n and p.requires_grad]
    return torch.optim.AdamW(
        [{"params": lora, "lr": 3e-3}, {"params": rest, "lr": 1e-3}], weight_decay=0.0
    )


def graff_scheduler(opt, model, rank, extra):
    fields = graff.GraffConfig.field_names()
    # the whole machinery (opt-in planner, entropy probe, online learning) must agree across ranks
    knobs = {"planner": True, **{k: v for k, v in extra.items() if k in fields}}
    kwargs = {k: v for k, v in extra.items() if k not in fields}
    kwargs["config"] = graff.GraffConfig(**knobs)
    return graff.GraffScheduler(opt, graff.BudgetClock(steps=STEPS), model=model, **kwargs)


def reactor_scheduler(opt, model, rank, extra):
    kwargs = {"seed": None, **extra}
    return graff.ReactorScheduler(
        opt,
        graff.BudgetClock(steps=STEPS),
        model=model,
        guard=True,
        prior="cosine",
        config=graff.ReactorConfig(decision_interval=5, controller_lr=1e-2),
        **kwargs,
    )


class SimulatedTime:
    """Seconds that advance only when the training loop says so (one rate per rank)."""

    def __init__(self, per_step: float) -> None:
        self.now, self.per_step = 0.0, per_step

    def __call__(self) -> float:
        return self.now


def budget_fake_scheduler(opt, model, rank, extra):
    clock = graff.BudgetClock(
        seconds=FAKE_BUDGET_SECONDS, time_fn=SimulatedTime(FAKE_SECONDS_PER_STEP[rank])
    )
    return graff.BudgetScheduler(opt, clock, prior="cosine", warmup=0.1, **extra)


def budget_sleep_scheduler(opt, model, rank, extra):
    return graff.BudgetScheduler(
        opt, graff.BudgetClock(seconds=SLEEP_BUDGET_SECONDS), prior="linear", **extra
    )


def graff_opt_out_scheduler(opt, model, rank, extra):
    """Negative control: every rank plans alone on its own shard (the LRs must drift apart)."""
    return graff_scheduler(opt, model, rank, {"distributed": False, **extra})


def graff_no_guard_scheduler(opt, model, rank, extra):
    """GRAFF without the guard (hence without HVPs, which FSDP's sharded parameters cannot run)."""
    return graff_scheduler(opt, model, rank, {"guard": False, **extra})


def graff_sampling_scheduler(opt, model, rank, extra):
    """GRAFF without the guard, sampling the per-step statistics every step."""
    return graff_no_guard_scheduler(opt, model, rank, {"probe_every": 1, **extra})


#: Step after whose update rank 1's local gradient shard turns NaN (``fsdp_graff_nan_shard``).
NAN_SHARD_STEP = 5


def _nan_shard_after_update(step: list[int]) -> Callable[..., None]:
    """A post-step hook that fills one local gradient shard with NaN at ``NAN_SHARD_STEP``.

    It runs after the update (which stays finite) and before the curvature probe's post-step
    hook, which then reads ⟨g_t, Δθ_t⟩ as NaN on this rank only: what a non-finite shard looks
    like to the probe under FSDP.
    """

    def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if step[0] == NAN_SHARD_STEP:
            p = optimizer.param_groups[0]["params"][0]
            local = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
            local.fill_(float("nan"))

    return hook


#: name -> (scheduler factory, stop when the budget is exhausted rather than after STEPS steps)
SCENARIOS: dict[str, tuple[Callable[..., Any], bool]] = {
    "graff": (graff_scheduler, False),
    "graff_opt_out": (graff_opt_out_scheduler, False),
    "reactor": (reactor_scheduler, False),
    "budget_fake_clock": (budget_fake_scheduler, True),
    "budget_sleep": (budget_sleep_scheduler, True),
}
#: Scenarios run with FSDP2 (``fully_shard``) instead of DDP.
FSDP_SCENARIOS: dict[str, tuple[Callable[..., Any], bool]] = {
    "fsdp_graff_no_guard": (graff_no_guard_scheduler, False),
    "fsdp_graff": (graff_scheduler, False),
    "fsdp_graff_nan_shard": (graff_sampling_scheduler, False),
}
ALL_SCENARIOS = {**SCENARIOS, **FSDP_SCENARIOS}


def _shard(model: TinyLM) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def _full(p: torch.Tensor) -> torch.Tensor:
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def run(
    name: str, rank: int = 0, world_size: int = 1, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Train one scenario; with ``world_size > 1`` inside an initialised gloo group, under DDP."""
    factory, until_exhausted = ALL_SCENARIOS[name]
    model = make_model()
    net: nn.Module = model
    if world_size > 1 and name in FSDP_SCENARIOS:
        net = _shard(model)
    elif world_size > 1:
        net = nn.parallel.DistributedDataParallel(model)
    opt = make_optimizer(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sched = factory(opt, net, rank, dict(extra or {}))
    time_fn = sched.budget._time_fn
    lrs, losses, step = [], [], 0
    current = [0]  # the step the loop is in, for the NaN-shard hook
    if name == "fsdp_graff_nan_shard" and rank == 1:
        handle = opt.register_step_post_hook(_nan_shard_after_update(current))
        opt._optimizer_step_post_hooks.move_to_end(handle.id, last=False)  # before the probe's
    shard = GLOBAL_BATCH // world_size
    while (not sched.budget.exhausted) if until_exhausted else step < STEPS:
        ids = global_batch(step)[rank * shard : (rank + 1) * shard]
        current[0] = step
        loss = net(input_ids=ids, labels=ids)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if isinstance(time_fn, SimulatedTime):
            time_fn.now += time_fn.per_step
        if name == "budget_sleep":
            time.sleep(SLEEP_PER_STEP[rank])
        sched.step()  # the loss comes from the model's forward output (loss capture)
        lrs.append(sched.get_last_lr())
        losses.append(float(loss.detach()))
        step += 1
        if step > 500:
            raise RuntimeError("the budget never ran out")
    out: dict[str, Any] = {
        "lrs": lrs,
        "steps": step,
        "params": {n: _full(p.detach()).clone() for n, p in model.named_parameters()},
        "warnings": [str(w.message) for w in caught],
        "fraction_used": sched.budget.fraction_used,
    }
    probe = getattr(sched, "curvature", None) or getattr(sched, "curvature_probe", None)
    if probe is not None:
        out.update(
            lambda_max=probe.lambda_max,
            n_estimates=probe.n_estimates,
            interval=probe.interval,
            dropped_samples=probe.dropped_samples,
        )
    entropy = getattr(sched, "entropy_probe", None)
    out["entropy_calls"] = 0 if entropy is None else entropy.calls
    if hasattr(sched, "seed"):
        out["seed"] = sched.seed
    sched.remove()
    return out


def skipped_step_on_one_rank(rank: int, world_size: int) -> dict[str, Any]:
    """Rank 1 calls ``sched.step()`` without ``optimizer.step()`` at step 3: both ranks must raise."""
    model = make_model()
    net = nn.parallel.DistributedDataParallel(model)
    opt = make_optimizer(model)
    sched = graff.BudgetScheduler(opt, graff.BudgetClock(steps=10))
    shard = GLOBAL_BATCH // world_size
    for step in range(5):
        ids = global_batch(step)[rank * shard : (rank + 1) * shard]
        net(input_ids=ids, labels=ids)["loss"].backward()
        if not (step == 3 and rank == 1):
            opt.step()
        opt.zero_grad(set_to_none=True)
        try:
            sched.step()
        except graff.errors.RankMismatchError as err:
            return {"raised_at": step, "message": str(err)}
    return {"raised_at": None}


def main(rank: int, world_size: int, store: str, out_dir: str, names: list[str]) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=30),
    )
    try:
        for name in names:
            try:
                result = run(name, rank, world_size)
            except Exception:  # recorded for the test to show; the other scenarios still run
                result = {"error": traceback.format_exc()}
            torch.save(result, Path(out_dir) / f"{name}.rank{rank}.pt")
            dist.barrier()
        torch.save(
            skipped_step_on_one_rank(rank, world_size), Path(out_dir) / f"mismatch.rank{rank}.pt"
        )
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(
        int(sys.argv[1]),
        int(sys.argv[2]),
        sys.argv[3],
        sys.argv[4],
        sys.argv[5].split(",") if len(sys.argv) > 5 else list(ALL_SCENARIOS),
    )
