"""Drop-in contract: copies keep scheduling, and hooks never keep a dropped scheduler alive.

1. ``copy.deepcopy`` and pickle round trips of ``(model, optimizer, scheduler)``, of
   ``(optimizer, scheduler)`` and of the scheduler alone give a scheduler that schedules exactly
   as the original would from that point (torch's ``Optimizer`` drops its step hooks when copied;
   graff re-registers its hooks on the copied optimizer and model). The original keeps working,
   and neither one's forward passes reach the other's hooks.
2. graff's hooks hold their scheduler (and probes) weakly: dropping the optimizer and the
   scheduler frees both by reference counting alone, and removes every graff hook from the model,
   so rebuilding a scheduler on the same model (a notebook cell run again) leaves one set.

torch's ``LambdaLR``/``CosineAnnealingLR`` run beside graff's three schedulers as a control.
"""

from __future__ import annotations

import copy
import gc
import pickle
import weakref
from typing import Any

import pytest
import torch
from conftest import make_tiny_qwen3
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR, LambdaLR

import graff
from graff import BudgetScheduler, GraffScheduler, ReactorConfig, ReactorScheduler
from graff.schedulers.base import BudgetedScheduler

GRAFF_KINDS = ["graff", "reactor", "budget"]


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    return


def _decay(step: int) -> float:
    return 1.0 / (1.0 + 0.1 * step)


def _build(kind: str, model: nn.Module, opt: torch.optim.Optimizer, wiring: str = "model") -> Any:
    """A scheduler of ``kind``; ``wiring``: ``model`` (model=), ``loss_fn`` or ``plain``."""
    budget = graff.BudgetClock(steps=40)
    kw: dict[str, Any] = {}
    if wiring == "model":
        kw["model"] = model
    elif wiring == "loss_fn" and kind in ("graff", "reactor"):
        batch = _batch(99)
        kw["loss_fn"] = lambda: model(**batch).loss
    probing = bool(kw)
    if kind == "graff":
        return GraffScheduler(
            opt,
            budget,
            seed=0,
            **kw,
            config=graff.GraffConfig(planner=True, plan_every=2, probe_every=1, curvature_every=3),
        )
    if kind == "reactor":
        config = ReactorConfig(decision_interval=2)
        return ReactorScheduler(opt, budget, guard=probing, seed=0, config=config, **kw)
    if kind == "budget":
        return BudgetScheduler(opt, budget, warmup=0.1, model=kw.get("model"))
    if kind == "lambda":
        return LambdaLR(opt, _decay)
    if kind == "cosine":
        return CosineAnnealingLR(opt, T_max=12)
    raise AssertionError(kind)


def _batch(i: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    ids = torch.randint(0, 96, (2, 12), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def _step(model: nn.Module, opt: torch.optim.Optimizer, sched: Any, i: int) -> list[float]:
    """One training step; graff's schedulers take the loss their model= hook captured."""
    loss = model(**_batch(i)).loss
    opt.zero_grad()
    loss.backward()
    opt.step()
    if isinstance(sched, BudgetedScheduler) and sched.model is None:
        sched.step(loss)
    else:
        sched.step()
    return [float(g["lr"]) for g in opt.param_groups]


def _setup(kind: str) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    model = make_tiny_qwen3()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    return model, opt, _build(kind, model, opt)


def _copy(how: str, model: nn.Module, opt: torch.optim.Optimizer, sched: Any) -> tuple:
    if how == "deepcopy":
        return copy.deepcopy((model, opt, sched))
    if how == "pickle":
        return pickle.loads(pickle.dumps((model, opt, sched)))
    if how == "deepcopy_opt_sched":  # no model: the copy has its own, as sched.model
        opt2, sched2 = copy.deepcopy((opt, sched))
        return sched2.model, opt2, sched2
    if how == "deepcopy_sched":  # torch's way: the copy copies its optimizer (and model)
        sched2 = copy.deepcopy(sched)
        return sched2.model, sched2.optimizer, sched2
    raise AssertionError(how)


def _counters(sched: Any) -> dict[str, Any]:
    """What a frozen or doubled-up scheduler would show: step counts and probe call counts."""
    out: dict[str, Any] = {"last_epoch": sched.last_epoch}
    if isinstance(sched, BudgetedScheduler):
        out.update(
            skipped=sched.skipped_steps,
            budget_steps=sched.budget.state_dict()["steps"],
            extra=_plain(sched.state_dict()["extra"]),
        )
        for name in ("entropy_probe", "curvature", "curvature_probe"):
            probe = getattr(sched, name, None)
            if probe is not None:
                out[name] = getattr(probe, "calls", None), getattr(probe, "step", None)
    return out


#: wall-clock timings in a state, and what they steer (the λ̂ refresh interval of 'auto')
_TIMINGS = ("elapsed", "seconds", "interval")


def _plain(obj: Any) -> Any:
    """A state as plain lists and numbers, timings left out (two runs never take equal time)."""
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items() if not any(t in str(k) for t in _TIMINGS)}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _is_graff(hook: Any) -> bool:
    module = getattr(hook, "__module__", None) or type(hook).__module__
    return module.startswith("graff")


def _owner(hook: Any) -> Any:
    """The object a graff hook calls (a bound method's, a weak hook's or a closure's referent)."""
    if hasattr(hook, "__self__"):
        return hook.__self__
    ref = getattr(hook, "_ref", None)
    if ref is None:
        cells = [c.cell_contents for c in getattr(hook, "__closure__", None) or ()]
        ref = next((c for c in cells if isinstance(c, weakref.ref)), None)
    return ref() if ref is not None else None


def _graff_hooks(model: nn.Module) -> list[Any]:
    """graff's forward (pre-)hooks on ``model`` and its submodules."""
    return [
        hook
        for m in model.modules()
        for d in (m._forward_hooks, m._forward_pre_hooks)
        for hook in d.values()
        if _is_graff(hook)
    ]


def _all_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# --------------------------------------------------------------------------- 1. copies
@pytest.mark.parametrize("how", ["deepcopy", "pickle", "deepcopy_opt_sched", "deepcopy_sched"])
@pytest.mark.parametrize("kind", [*GRAFF_KINDS, "torch"])
def test_a_copy_schedules_exactly_as_the_original(kind: str, how: str) -> None:
    if kind == "torch":
        if how in ("deepcopy_opt_sched", "deepcopy_sched"):
            pytest.skip("a torch scheduler holds no model to train the copy with")
        kind = "cosine" if how == "pickle" else "lambda"  # a lambda does not pickle
    reference = _setup(kind)  # never copied: what the original must still do
    model, opt, sched = _setup(kind)
    for i in range(3):
        _step(*reference, i)
        _step(model, opt, sched, i)
    model2, opt2, sched2 = _copy(how, model, opt, sched)
    assert sched2.optimizer is opt2
    assert sched2 is not sched
    assert {id(p) for g in opt2.param_groups for p in g["params"]} == {
        id(p) for p in model2.parameters()
    }
    lrs_ref, lrs, lrs2 = [], [], []
    for i in range(3, 10):
        lrs_ref.append(_step(*reference, i))
        lrs.append(_step(model, opt, sched, i))
        lrs2.append(_step(model2, opt2, sched2, i))
    assert len({tuple(x) for x in lrs_ref}) > 1, "the LR should move in these steps"
    assert lrs == lrs_ref, "copying changed the original's schedule"
    assert lrs2 == lrs_ref, "the copy does not schedule as the original"
    for a, b, c in zip(
        reference[0].parameters(), model.parameters(), model2.parameters(), strict=True
    ):
        assert torch.equal(a, b)
        assert torch.equal(a, c)
    assert _counters(sched) == _counters(reference[2])
    assert _counters(sched2) == _counters(reference[2])
    if isinstance(sched, BudgetedScheduler):
        assert sched2.skipped_steps == sched.skipped_steps == 0
        # the copy's model carries only the copy's hooks, the original's only the original's
        assert len(_graff_hooks(model2)) == len(_graff_hooks(model))
        owners = {id(_owner(h)) for h in _graff_hooks(model2)}
        assert owners.isdisjoint({id(_owner(h)) for h in _graff_hooks(model)})


@pytest.mark.parametrize("kind", GRAFF_KINDS)
def test_a_removed_scheduler_copies_without_hooks_and_remove_is_idempotent(kind: str) -> None:
    model, opt, sched = _setup(kind)
    baseline = _all_hooks(make_tiny_qwen3())
    _step(model, opt, sched, 0)
    sched.remove()
    sched.remove()  # idempotent
    assert _graff_hooks(model) == []
    assert _all_hooks(model) == baseline
    assert opt._optimizer_step_pre_hooks == {}
    assert opt._optimizer_step_post_hooks == {}
    model2, opt2, sched2 = copy.deepcopy((model, opt, sched))
    assert _graff_hooks(model2) == []
    assert opt2._optimizer_step_post_hooks == {}
    sched2.remove()
    lr = sched.get_last_lr()
    _step(model, opt, sched, 1)  # detached: step() sees no optimizer step, the LR stays
    assert sched.get_last_lr() == lr
    assert sched.skipped_steps == 1


# ------------------------------------------------------------------- 2. weak hooks
@pytest.mark.parametrize("wiring", ["plain", "model", "loss_fn"])
@pytest.mark.parametrize("kind", [*GRAFF_KINDS, "lambda"])
def test_dropping_optimizer_and_scheduler_frees_both_by_refcount(kind: str, wiring: str) -> None:
    if kind in ("budget", "lambda") and wiring == "loss_fn":
        pytest.skip("takes no loss_fn")
    model = make_tiny_qwen3()
    baseline = _all_hooks(model)
    gc.collect()
    gc.disable()
    try:
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        sched = _build(kind, model, opt, wiring)
        for i in range(4):
            _step(model, opt, sched, i)
        if kind != "lambda" and wiring == "model":
            assert _graff_hooks(model)
        refs = weakref.ref(opt), weakref.ref(sched)
        del opt, sched
        assert refs[0]() is None, "the optimizer outlives its dropped scheduler (a cycle)"
        assert refs[1]() is None, "the scheduler outlives being dropped (a cycle or the model)"
        assert _graff_hooks(model) == []
        assert _all_hooks(model) == baseline
    finally:
        gc.enable()


def _own_objects(sched: Any) -> set[int]:
    """ids of the scheduler and of the probes (and probe-batch capture) it holds."""
    objs = [sched, getattr(sched, "entropy_probe", None)]
    for name in ("curvature", "curvature_probe"):
        probe = getattr(sched, name, None)
        objs += [probe, getattr(probe, "_capture", None)]
    return {id(o) for o in objs if o is not None}


@pytest.mark.parametrize("kind", GRAFF_KINDS)
def test_rebuilding_a_scheduler_on_one_model_runs_one_set_of_hooks(kind: str) -> None:
    """A notebook cell run three times: dropping the last scheduler removed its hooks."""
    model = make_tiny_qwen3()
    counts = []
    for i in range(3):
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        sched = _build(kind, model, opt)  # the previous optimizer and scheduler are dropped
        counts.append(len(_graff_hooks(model)))
        _step(model, opt, sched, i)
        # every graff hook on the model calls this scheduler or its probes
        assert {id(_owner(h)) for h in _graff_hooks(model)} <= _own_objects(sched)
    assert counts[0] > 0
    assert counts == [counts[0]] * 3
    # a forward pass reaches this scheduler's hooks once: one captured loss per forward
    captured = sched._captured_count
    model(**_batch(7))
    assert sched._captured_count == captured + 1


@pytest.mark.parametrize("kind", GRAFF_KINDS)
def test_a_copy_of_the_model_alone_does_not_reach_the_scheduler(kind: str) -> None:
    """``deepcopy(model)`` (e.g. an EMA or an eval copy) neither copies the scheduler nor calls
    it: the copied hooks are inert (a graff scheduler built on the copy drops them)."""
    model, opt, sched = _setup(kind)
    _step(model, opt, sched, 0)
    before = _counters(sched), sched._captured_count
    twin = copy.deepcopy(model)
    assert all(_owner(h) is None for h in _graff_hooks(twin))
    twin(**_batch(1))
    assert (_counters(sched), sched._captured_count) == before
    opt2 = torch.optim.Adam(twin.parameters(), lr=1e-3)
    sched2 = _build(kind, twin, opt2)
    _step(twin, opt2, sched2, 0)  # as far as the original (whose probe batch is captured)
    assert len(_graff_hooks(twin)) == len(_graff_hooks(model))
    assert {id(_owner(h)) for h in _graff_hooks(twin)} <= _own_objects(sched2)
