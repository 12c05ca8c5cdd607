"""Contract: under a step budget a run is a function of step counts, data and seeds, never of time.

Issue #15, item 5. The same seeded run is repeated three times: plainly, with a thread that
competes for the CPU (torch matmuls), and with every clock graff's modules read replaced by one
that returns wildly varying readings. Under ``BudgetClock(steps=...)`` the LRs must come out
bit-identical (list equality, not approx) and so must the parameters, with λ̂ on: GRAFF with
``model=`` (captured probe batch), ``curvature_every="auto"``, block multipliers and the peak
search's extra λ̂ refreshes; REACTOR with the guard (its own probe, and a user-given one whose
``auto`` interval falls inside the run). BudgetScheduler and torch's CosineAnnealingLR run
beside them as controls (they read no clock under a step budget).
"""

from __future__ import annotations

import math
import random
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch
from torch import nn

import graff
from graff.probes.curvature import CurvatureProbe

VOCAB, DIM, SEQ, BATCH = 24, 16, 10, 8
STEPS = 50  # optimizer steps of each run
BUDGET = 80  # of a step budget this long (the refresh allowance is a fraction of it)


class _LoRALinear(nn.Module):
    """A frozen linear map plus a trainable low-rank update (parameter names like peft's)."""

    def __init__(self, dim: int, rank: int = 2) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim, dim) / math.sqrt(dim), requires_grad=False)
        self.lora_A = nn.Parameter(torch.randn(rank, dim) * 0.3)
        self.lora_B = nn.Parameter(torch.randn(dim, rank) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ (self.weight + self.lora_B @ self.lora_A).t()


class _Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.up_proj = _LoRALinear(DIM), _LoRALinear(DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.up_proj(torch.tanh(self.q_proj(x))))


class _Trunk(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList([_Layer(), _Layer()])
        self.norm = nn.LayerNorm(DIM)


class _TinyLM(nn.Module):
    """Llama-style layout (``model.layers``, ``model.norm``, ``lm_head``): the probes find it,
    and its forward returns the loss, so the schedulers capture it and the probe batch."""

    def __init__(self) -> None:
        super().__init__()
        self.model = _Trunk()
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


def _model() -> _TinyLM:
    torch.manual_seed(0)
    model = _TinyLM()
    model.model.embed.requires_grad_(False)
    return model


def _batch(step: int) -> torch.Tensor:
    """A learnable batch (next token = token + 1, 20 % noise), a function of the step only."""
    gen = torch.Generator().manual_seed(1000 + step)
    start = torch.randint(0, VOCAB, (BATCH, 1), generator=gen)
    ids = (start + torch.arange(SEQ)) % VOCAB
    noise = torch.randint(0, VOCAB, ids.shape, generator=gen)
    return torch.where(torch.rand(ids.shape, generator=gen) < 0.8, ids, noise)


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _graff(model: nn.Module) -> tuple[torch.optim.Optimizer, object]:
    # SGD at a high LR: the guard binds below the user's LR, so the peak search asks for extra
    # λ̂ refreshes (their allowance is what is tested), and every LR depends on λ̂.
    opt = torch.optim.SGD(_trainable(model), lr=2.0, momentum=0.9)
    sched = graff.GraffScheduler(
        opt,
        graff.BudgetClock(steps=BUDGET),
        model=model,
        seed=0,
        config=graff.GraffConfig(
            curvature_every="auto",
            planner=True,
            block_multipliers=True,
            refresh_allowance=0.5,
            search_fraction=0.5,
        ),
    )
    return opt, sched


def _reactor(model: nn.Module) -> tuple[torch.optim.Optimizer, object]:
    opt = torch.optim.SGD(_trainable(model), lr=2.0, momentum=0.9)
    sched = graff.ReactorScheduler(
        opt,
        graff.BudgetClock(steps=BUDGET),
        model=model,
        guard=True,
        seed=0,
        config=graff.ReactorConfig(decision_interval=5),
    )
    return opt, sched


def _reactor_given_probe(model: nn.Module) -> tuple[torch.optim.Optimizer, object]:
    # a probe built by the user (cost_model not given): a large overhead target puts the
    # ``auto`` interval inside the run, so scheduled refreshes happen
    opt = torch.optim.AdamW(_trainable(model), lr=1.0)
    probe = CurvatureProbe(opt, model=model, every="auto", overhead_target=0.35, seed=0)
    sched = graff.ReactorScheduler(
        opt,
        graff.BudgetClock(steps=BUDGET),
        model=model,
        guard=True,
        curvature_probe=probe,
        seed=0,
        config=graff.ReactorConfig(decision_interval=5),
    )
    return opt, sched


def _budget(model: nn.Module) -> tuple[torch.optim.Optimizer, object]:
    opt = torch.optim.SGD(_trainable(model), lr=0.5, momentum=0.9)
    return opt, graff.BudgetScheduler(opt, graff.BudgetClock(steps=BUDGET), model=model)


def _cosine(model: nn.Module) -> tuple[torch.optim.Optimizer, object]:
    opt = torch.optim.SGD(_trainable(model), lr=0.5, momentum=0.9)
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=BUDGET)


SCHEDULERS: dict[str, Callable[[nn.Module], tuple[torch.optim.Optimizer, object]]] = {
    "graff": _graff,
    "reactor": _reactor,
    "reactor_given_probe": _reactor_given_probe,
    "budget": _budget,
    "torch_cosine": _cosine,
}


def _run(name: str) -> tuple[list[list[float]], list[torch.Tensor], object]:
    """``STEPS`` seeded steps: the LRs after each step, the final parameters, the scheduler."""
    model = _model()
    opt, sched = SCHEDULERS[name](model)
    lrs = []
    for step in range(STEPS):
        ids = _batch(step)
        loss = model(input_ids=ids, labels=ids)["loss"]
        loss.backward()
        opt.step()
        sched.step()  # graff's schedulers take the loss captured from the forward pass
        opt.zero_grad()
        lrs.append(list(sched.get_last_lr()))
    return lrs, [p.detach().clone() for p in model.parameters()], sched


class _WildClock:
    """Readings that move forward by anything from a nanosecond to 20 minutes per call."""

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)
        self._now = 1e6

    def __call__(self) -> float:
        self._now += 10.0 ** self._rng.uniform(-9.0, 3.1)
        return self._now


@contextmanager
def _wild_clocks(seed: int) -> Iterator[None]:
    """Every graff module's ``time`` replaced by one whose clocks all read ``_WildClock``."""
    clock = _WildClock(seed)
    fake = types.SimpleNamespace(
        **{name: getattr(time, name) for name in dir(time) if not name.startswith("_")}
    )
    for name in ("perf_counter", "monotonic", "time", "process_time", "thread_time"):
        setattr(fake, name, clock)
    with pytest.MonkeyPatch.context() as mp:
        patched = 0
        for module_name, module in list(sys.modules.items()):
            if module_name.split(".")[0] == "graff" and getattr(module, "time", None) is time:
                mp.setattr(module, "time", fake)
                patched += 1
        assert patched >= 3, "test premise: graff's modules read time through `time`"
        yield


@contextmanager
def _busy_thread() -> Iterator[None]:
    """A thread doing torch matmuls for as long as the block runs (competes for the CPU)."""
    stop = threading.Event()
    done = []

    def spin() -> None:
        a = torch.randn(96, 96, generator=torch.Generator().manual_seed(0))  # not the global RNG
        while not stop.is_set():
            a = torch.tanh(a @ a)
            done.append(1)

    thread = threading.Thread(target=spin, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
    assert done, "test premise: the competing thread ran"


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_step_budget_runs_are_bit_identical_whatever_the_clocks(
    name: str, one_torch_thread
) -> None:
    lrs, params, sched = _run(name)
    with _busy_thread():
        busy_lrs, busy_params, _ = _run(name)
    with _wild_clocks(seed=1):
        wild_lrs, wild_params, _ = _run(name)
    with _wild_clocks(seed=2):
        wild2_lrs, wild2_params, _ = _run(name)
    assert all(math.isfinite(lr) and lr > 0 for row in lrs for lr in row)
    for other_lrs, other_params in (
        (busy_lrs, busy_params),
        (wild_lrs, wild_params),
        (wild2_lrs, wild2_params),
    ):
        assert other_lrs == lrs  # bit-identical, not approximately equal
        assert all(torch.equal(a, b) for a, b in zip(params, other_params, strict=True))
    # the runs did exercise what used to follow the clock
    if name == "graff":
        assert sched.curvature.n_estimates >= 2
        assert sched.peak_search.allowance.count >= 1  # extra λ̂ refreshes of the peak search
        assert sched.guard_activations > 0
    elif name.startswith("reactor"):
        probe = sched.curvature_probe
        assert probe.lambda_max is not None
        assert max(sched.get_last_lr()) < sched.optimizer.param_groups[0]["initial_lr"]
        if name == "reactor_given_probe":
            assert probe.n_estimates >= 2  # scheduled refreshes at the ``auto`` interval


def _quadratic_probe_run(**kwargs) -> tuple[list[tuple[int, int, float | None]], CurvatureProbe]:
    """A probe on its own (SGD on a quadratic, ``every="auto"``): (step, interval, λ̂) per step."""
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    a = q @ torch.diag(torch.linspace(1.0, 10.0, 6, dtype=torch.float64)) @ q.T
    x = nn.Parameter(torch.ones(6, dtype=torch.float64))
    opt = torch.optim.SGD([x], lr=0.01)
    probe = CurvatureProbe(
        opt, loss_fn=lambda: 0.5 * x @ a @ x, every="auto", min_every=2, **kwargs
    )
    trace = []
    for _ in range(40):
        opt.zero_grad()
        (0.5 * x @ a @ x).backward()
        opt.step()
        trace.append((probe.step, probe.interval, probe.lambda_max))
    return trace, probe


def test_a_probe_on_its_own_prices_the_auto_interval_in_steps() -> None:
    """No budget to follow: the ``auto`` interval comes from the product counts, not the clock."""
    from graff.probes.curvature import estimate_cost_steps

    trace, probe = _quadratic_probe_run(overhead_target=0.5)
    with _wild_clocks(seed=3):
        wild_trace, wild_probe = _quadratic_probe_run(overhead_target=0.5)
    assert probe.cost_model == "steps"
    assert wild_trace == trace
    # after the cold start in step 1 (interval min_every), refreshes every ceil((1 + 2·3) / 0.5)
    assert probe.interval == math.ceil(estimate_cost_steps(probe.power_iters) / 0.5) == 14
    assert probe.n_estimates == wild_probe.n_estimates == 4  # steps 1, 3, 17 and 31
    assert probe.overhead_seconds > 0  # timings are still measured (and reported)


def test_the_budget_kind_picks_the_cost_model() -> None:
    model = _model()
    for kind, clock in (
        ("steps", graff.BudgetClock(steps=10)),
        ("seconds", graff.BudgetClock(seconds=60)),
    ):
        opt = torch.optim.SGD(_trainable(model), lr=0.1)
        graff_sched = graff.GraffScheduler(opt, clock, model=model)
        assert graff_sched.curvature.cost_model == kind
        graff_sched.remove()
        reactor = graff.ReactorScheduler(opt, clock, model=model, guard=True, seed=0)
        assert reactor.curvature_probe.cost_model == kind
        reactor.remove()
        # an explicit "steps" is kept under any budget
        probe = CurvatureProbe(opt, model=model, cost_model="steps")
        graff.ReactorScheduler(opt, clock, curvature_probe=probe, guard=True, seed=0).remove()
        assert probe.cost_model == "steps"
        probe.remove()


def test_an_explicit_seconds_cost_model_under_a_step_budget_is_refused() -> None:
    model = _model()
    opt = torch.optim.SGD(_trainable(model), lr=0.1)
    probe = CurvatureProbe(opt, model=model, cost_model="seconds")
    hooks = len(opt._optimizer_step_pre_hooks), len(opt._optimizer_step_post_hooks)
    with pytest.raises(graff.errors.GraffConfigError, match="cost_model='seconds'"):
        graff.ReactorScheduler(
            opt, graff.BudgetClock(steps=10), curvature_probe=probe, guard=True, seed=0
        )
    # the failed constructor left no hook of its own behind (the user's probe keeps its own)
    assert (len(opt._optimizer_step_pre_hooks), len(opt._optimizer_step_post_hooks)) == hooks
    graff.ReactorScheduler(
        opt, graff.BudgetClock(seconds=60), curvature_probe=probe, guard=True, seed=0
    ).remove()
    assert probe.cost_model == "seconds"
    with pytest.raises(graff.errors.GraffConfigError, match="cost_model"):
        CurvatureProbe(opt, model=model, cost_model="minutes")
