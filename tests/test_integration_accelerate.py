"""graff schedulers under ``accelerate`` (CPU, one process) and in a plain AMP loop.

``accelerator.prepare(model, opt, sched)`` wraps the scheduler in ``AcceleratedScheduler``, which
forwards ``step()`` only on gradient-sync steps and only when the optimizer really stepped, so a
graff budget advances once per optimizer step. These tests pin that, with and without
accumulation, and check that skipped optimizer steps (GradScaler overflow) are not counted.
"""

from __future__ import annotations

import math

import pytest
import torch

import graff
from tests.conftest import make_tiny_lora, make_tiny_qwen3

accelerate = pytest.importorskip("accelerate")
pytest.importorskip("transformers")
pytest.importorskip("peft")

VOCAB = 96


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _loader(n_batches: int, batch_size: int = 2, seed: int = 0) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n_batches * batch_size, 12), generator=g)
    rows = [
        {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()} for x in ids
    ]
    return torch.utils.data.DataLoader(rows, batch_size=batch_size, shuffle=False)


def _make(kind: str, budget_steps: int = 100):
    model = make_tiny_lora(make_tiny_qwen3())
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    budget = graff.BudgetClock(steps=budget_steps)
    if kind == "graff":
        sched = graff.GraffScheduler(opt, budget=budget, model=model)
    elif kind == "reactor":
        sched = graff.ReactorScheduler(
            opt, budget=budget, model=model, seed=0, config=graff.ReactorConfig(decision_interval=2)
        )
    else:
        sched = graff.BudgetScheduler(opt, budget=budget, model=model)
    return model, opt, sched


def _fresh_accelerator(**kwargs) -> accelerate.Accelerator:
    accelerate.state.AcceleratorState._reset_state(reset_partial_state=True)
    accelerate.state.GradientState._reset_state()
    return accelerate.Accelerator(cpu=True, **kwargs)


def _train(accelerator, model, opt, sched, loader, on_sync=None) -> list[float]:
    """The documented accelerate loop; returns the LR after each optimizer step."""
    model, opt, wrapped, loader = accelerator.prepare(model, opt, sched, loader)
    lrs = []
    for batch in loader:
        with accelerator.accumulate(model):
            out = model(**batch)
            accelerator.backward(out.loss)
            if on_sync is not None and accelerator.sync_gradients:
                on_sync(model)
            opt.step()
            wrapped.step()
            opt.zero_grad()
        if accelerator.sync_gradients:
            lrs.append(float(opt.param_groups[0]["lr"]))
    return lrs


@pytest.mark.parametrize("kind", ["graff", "reactor", "budget"])
@pytest.mark.parametrize("accum", [1, 2])
def test_prepare_steps_scheduler_once_per_optimizer_step(kind, accum):
    accelerator = _fresh_accelerator(gradient_accumulation_steps=accum)
    model, opt, sched = _make(kind)
    n_batches = 8
    lrs = _train(accelerator, model, opt, sched, _loader(n_batches))
    steps = n_batches // accum
    assert sched.budget.steps == steps  # not once per micro-batch, not once per process
    assert sched.last_epoch == steps
    assert sched.skipped_steps == 0
    assert len(lrs) == steps
    assert all(math.isfinite(lr) and lr > 0 for lr in lrs)
    if kind == "graff":
        assert sched.peak_search.losses.count > 0
    sched.remove()


def test_prepare_keeps_budget_schedule_exact():
    """BudgetScheduler under accelerate + accumulation gives the same LRs as its closed form."""
    accelerator = _fresh_accelerator(gradient_accumulation_steps=2)
    model, opt, sched = _make("budget", budget_steps=4)
    lrs = _train(accelerator, model, opt, sched, _loader(8))
    assert sched.budget.exhausted
    expected = [1e-3 * max(1e-6, sched.prior(k / 4)) for k in range(1, 5)]
    assert lrs == pytest.approx(expected, rel=1e-6, abs=1e-12)


def test_adjust_scheduler_plugin_does_not_move_the_budget():
    """``GradientAccumulationPlugin(adjust_scheduler=True)`` bumps ``scheduler._step_count`` on
    every non-sync micro-batch; the graff budget and ``last_epoch`` must not move with it."""
    plugin = accelerate.utils.GradientAccumulationPlugin(num_steps=2, adjust_scheduler=True)
    accelerator = _fresh_accelerator(gradient_accumulation_plugin=plugin)
    # accelerate 1.15 drops the (default-valued) flag from plugin_kwargs, so it never takes effect;
    # force it to exercise AcceleratedScheduler's adjust branch.
    accelerator.gradient_state.plugin_kwargs["adjust_scheduler"] = True
    model, opt, sched = _make("budget")
    _train(accelerator, model, opt, sched, _loader(8))
    assert sched.budget.steps == 4
    assert sched.last_epoch == 4
    assert sched._step_count == 8  # accelerate's bump landed on torch's private counter only
    sched.remove()


def _poison_one_grad(model) -> None:
    p = next(p for p in model.parameters() if p.requires_grad and p.grad is not None)
    p.grad.view(-1)[0] = math.inf


def test_skipped_optimizer_step_is_not_counted_under_accelerate():
    """An overflow step that GradScaler skips must not advance the budget.

    accelerate gives no GradScaler on CPU, so the test installs ``torch.amp.GradScaler("cpu")``
    as the accelerator's scaler (the same code path a CUDA fp16 run takes) and poisons one
    gradient on the first sync step.
    """
    accelerator = _fresh_accelerator(gradient_accumulation_steps=2)
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    model, opt, sched = _make("budget")
    poisoned = []

    def poison_first(m):
        if not poisoned:
            poisoned.append(True)
            _poison_one_grad(m)

    _train(accelerator, model, opt, sched, _loader(8), on_sync=poison_first)
    assert sched.budget.steps == 3  # 4 sync steps, the first skipped by the scaler
    assert sched.last_epoch == 3
    sched.remove()


def test_plain_loop_with_gradscaler_and_autocast_counts_skips():
    """The plain-loop recipe of docs/integrations.md: accumulation, autocast, GradScaler."""
    model, opt, sched = _make("graff")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    accum = 2
    for i, batch in enumerate(_loader(8)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batch).loss / accum
        scaler.scale(loss).backward()
        if (i + 1) % accum == 0:
            if i + 1 == 2 * accum:  # the second optimizer step overflows
                _poison_one_grad(model)
            scaler.step(opt)
            scaler.update()
            sched.step()  # loss captured from the forward passes (model=model)
            opt.zero_grad(set_to_none=True)
    assert sched.budget.steps == 3
    assert sched.skipped_steps == 1
    assert sched.peak_search.losses.count > 0
    assert all(math.isfinite(g["lr"]) and g["lr"] > 0 for g in opt.param_groups)
    sched.remove()


def test_checkpoint_resume_recipe(tmp_path):
    """Save model+optimizer+scheduler with torch.save, load with weights_only=True, continue:
    the LR trajectory equals an uninterrupted run (step budget, deterministic schedule)."""

    def run(n_batches, resume_from=None, save_to=None):
        model, opt, sched = _make("budget", budget_steps=6)
        if resume_from is not None:
            ckpt = torch.load(resume_from, weights_only=True)
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            sched.load_state_dict(ckpt["scheduler"])
        lrs = []
        for batch in _loader(n_batches, seed=len(lrs)):
            model(**batch).loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad()
            lrs.append(opt.param_groups[0]["lr"])
        if save_to is not None:
            torch.save(
                {
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                },
                save_to,
            )
        sched.remove()
        return lrs, sched

    full, _ = run(6)
    path = tmp_path / "ckpt.pt"
    first, _ = run(3, save_to=path)
    second, resumed = run(3, resume_from=path)
    assert first + second == pytest.approx(full, rel=1e-12)
    assert resumed.budget.steps == 6
    assert resumed.budget.exhausted


def test_prepare_with_bf16_autocast_captures_the_loss():
    """``mixed_precision="bf16"`` wraps the model's forward in autocast; the scheduler's forward
    hook still sees each training ``.loss``."""
    accelerator = _fresh_accelerator(gradient_accumulation_steps=2, mixed_precision="bf16")
    model, opt, sched = _make("graff")
    lrs = _train(accelerator, model, opt, sched, _loader(8))
    assert sched.budget.steps == 4
    assert sched.peak_search.losses.count == 4
    assert all(math.isfinite(lr) and lr > 0 for lr in lrs)
    sched.remove()


def test_step_scheduler_with_optimizer_false_still_counts_optimizer_steps_only():
    """With ``step_scheduler_with_optimizer=False`` accelerate forwards every ``step()`` call,
    including those of non-sync micro-batches: graff counts them as skipped, not as steps."""
    accelerator = _fresh_accelerator(
        gradient_accumulation_steps=2, step_scheduler_with_optimizer=False
    )
    model, opt, sched = _make("budget")
    _train(accelerator, model, opt, sched, _loader(8))
    assert sched.budget.steps == 4
    assert sched.last_epoch == 4
    assert sched.skipped_steps == 4  # the 4 non-sync micro-batches
    sched.remove()
