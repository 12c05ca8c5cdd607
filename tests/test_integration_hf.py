"""graff schedulers inside Hugging Face ``Trainer`` (tiny Qwen3 + peft LoRA, offline, CPU).

The recipe under test (see docs/integrations.md): build the optimizer and the scheduler yourself,
pass ``model=`` so the scheduler captures the forward's ``.loss``, hand both to
``Trainer(optimizers=(opt, sched))``, and add :class:`StopWhenBudgetExhausted` so the budget
ends training.
"""

from __future__ import annotations

import math

import pytest
import torch

import graff
from tests.conftest import make_tiny_lora, make_tiny_qwen3

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

VOCAB = 96
SEQ = 12


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class StopWhenBudgetExhausted(transformers.TrainerCallback):
    """Stop ``Trainer`` once the graff scheduler's budget is used up."""

    def __init__(self, scheduler: graff.BudgetScheduler) -> None:
        self.scheduler = scheduler

    def on_step_end(self, args, state, control, **kwargs):
        if self.scheduler.budget.exhausted:
            control.should_training_stop = True
        return control


class RandomTokens(torch.utils.data.Dataset):
    """``n`` sequences of random token ids, with labels (causal-LM loss)."""

    def __init__(self, n: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _args(tmp_path, **overrides) -> transformers.TrainingArguments:
    kwargs = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=6,
        learning_rate=1e-3,  # ignored: the optimizer is ours
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    kwargs.update(overrides)
    return transformers.TrainingArguments(**kwargs)


def _make(kind: str, budget_steps: int):
    model = make_tiny_lora(make_tiny_qwen3())
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    budget = graff.BudgetClock(steps=budget_steps)
    if kind == "graff":
        sched = graff.GraffScheduler(opt, budget=budget, model=model)
    elif kind == "reactor":
        sched = graff.ReactorScheduler(opt, budget=budget, model=model, seed=0)
    else:
        sched = graff.BudgetScheduler(opt, budget=budget, model=model, prior="cosine")
    return model, opt, sched


class RecordLR(transformers.TrainerCallback):
    """Record the optimizer's LR after each step (the one the next optimizer step will use)."""

    def __init__(self, opt: torch.optim.Optimizer) -> None:
        self.opt = opt
        self.lrs: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.lrs.append(float(self.opt.param_groups[0]["lr"]))


@pytest.mark.parametrize("kind", ["graff", "reactor", "budget"])
def test_trainer_steps_scheduler_once_per_optimizer_step(kind, tmp_path):
    model, opt, sched = _make(kind, budget_steps=100)
    record = RecordLR(opt)
    trainer = transformers.Trainer(
        model=model,
        args=_args(tmp_path, max_steps=6, gradient_accumulation_steps=2),
        train_dataset=RandomTokens(64),
        optimizers=(opt, sched),
        callbacks=[record],
    )
    assert trainer.lr_scheduler is sched
    trainer.train()
    assert trainer.state.global_step == 6
    assert (
        sched.budget.steps == trainer.state.global_step
    )  # once per optimizer step, not per micro-batch
    assert sched.last_epoch == 6
    assert sched.skipped_steps == 0
    assert len(record.lrs) == 6
    assert all(math.isfinite(lr) and lr > 0 for lr in record.lrs)
    if kind == "graff":
        assert sched.peak_search.losses.count > 0  # the forward's .loss reached the planner
    if kind == "budget":  # a cosine over 100 steps, 6 taken: the LR follows the prior exactly
        expected = [1e-3 * sched.prior(min(1.0, (i + 1) / 100)) for i in range(6)]
        assert record.lrs == pytest.approx(expected, rel=1e-6)
    sched.remove()


@pytest.mark.parametrize("kind", ["graff", "budget"])
def test_budget_exhausted_stops_trainer(kind, tmp_path):
    model, opt, sched = _make(kind, budget_steps=4)
    trainer = transformers.Trainer(
        model=model,
        args=_args(tmp_path, max_steps=50, gradient_accumulation_steps=1),
        train_dataset=RandomTokens(64),
        optimizers=(opt, sched),
        callbacks=[StopWhenBudgetExhausted(sched)],
    )
    trainer.train()
    assert sched.budget.exhausted
    assert trainer.state.global_step == 4 == sched.budget.steps
    sched.remove()


def _plan_losses(tmp_path, n_samples, max_steps, accepts):
    model, opt, sched = _make("budget", budget_steps=100)
    received: list[float] = []
    original = sched._plan
    sched._plan = lambda loss: (received.append(loss), original(loss))[1]
    trainer = transformers.Trainer(
        model=model,
        args=_args(tmp_path, max_steps=max_steps, gradient_accumulation_steps=2),
        train_dataset=RandomTokens(n_samples),
        optimizers=(opt, sched),
    )
    trainer.model_accepts_loss_kwargs = accepts
    trainer.train()
    sched.remove()
    return received


def test_captured_loss_is_the_mean_over_micro_batches(tmp_path):
    """With accumulation, Trainer gives the model ``num_items_in_batch`` so each micro-batch's
    ``.loss`` is a *share* of the step's loss (sum over its tokens / tokens of the whole step).
    The scheduler averages the captured micro-batch losses, so it sees the step loss divided by
    ``gradient_accumulation_steps``; ``model_accepts_loss_kwargs=False`` restores the per-token mean.
    Here we pin what the planner receives under both settings.
    """
    # Random tokens over a 96-word vocabulary: the per-token loss is near ln(96) ~ 4.56.
    per_token = _plan_losses(tmp_path, n_samples=64, max_steps=3, accepts=False)
    shared = _plan_losses(tmp_path, n_samples=64, max_steps=3, accepts=True)
    assert len(per_token) == len(shared) == 3
    assert all(abs(x - math.log(VOCAB)) < 1.0 for x in per_token)
    assert all(abs(x - math.log(VOCAB) / 2) < 0.5 for x in shared)


def test_evaluation_forwards_do_not_reach_the_planner(tmp_path):
    """Trainer evaluates under ``torch.no_grad``, so eval losses are not captured as train losses."""
    model, opt, sched = _make("budget", budget_steps=100)
    received: list[float] = []
    original = sched._plan
    sched._plan = lambda loss: (received.append(loss), original(loss))[1]
    trainer = transformers.Trainer(
        model=model,
        args=_args(tmp_path, max_steps=3, eval_strategy="steps", eval_steps=1),
        train_dataset=RandomTokens(64),
        eval_dataset=RandomTokens(4, seed=1),
        optimizers=(opt, sched),
    )
    trainer.train()
    sched.remove()
    assert len(received) == 3
    # train micro-batch losses are shares (~ln(96)/2, see above); an eval loss (~ln(96)) mixed in
    # would pull the average far above that.
    assert all(abs(x - math.log(VOCAB) / 2) < 0.5 for x in received)


@pytest.mark.parametrize("kind", ["graff", "reactor", "budget"])
def test_trainer_resume_from_checkpoint_continues_the_budget(kind, tmp_path):
    """Trainer saves ``sched.state_dict()`` in its checkpoints and restores it on resume: the
    budget and the LR trajectory continue as in an uninterrupted run."""

    def run(out, resume=None):
        model, opt, sched = _make(kind, budget_steps=6)
        record = RecordLR(opt)
        trainer = transformers.Trainer(
            model=model,
            args=_args(out, max_steps=6, save_strategy="steps", save_steps=3),
            train_dataset=RandomTokens(64),
            optimizers=(opt, sched),
            callbacks=[record],
        )
        trainer.train(resume_from_checkpoint=resume)
        sched.remove()
        return record.lrs, sched

    full, _ = run(tmp_path / "a")
    tail, resumed = run(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-3"))
    assert len(full) == 6
    assert tail == pytest.approx(full[3:], rel=1e-12)
    assert resumed.budget.steps == 6
    assert resumed.budget.exhausted


def test_short_last_accumulation_step_changes_the_loss_scale(tmp_path):
    """5 micro-batches per epoch with accumulation 2: the epoch's last optimizer step has one
    micro-batch. Under Trainer's ``num_items_in_batch`` convention its captured loss is the full
    mean (not half of it), so the planner sees a 2x jump at every epoch end. With
    ``model_accepts_loss_kwargs = False`` (the workaround in docs/integrations.md) the planner
    sees the per-token mean at every step."""
    level = math.log(VOCAB)
    shared = _plan_losses(tmp_path, n_samples=10, max_steps=3, accepts=True)
    assert len(shared) == 3
    assert all(abs(x - level / 2) < 0.5 for x in shared[:2])
    assert abs(shared[2] - level) < 1.0  # the short step: ~2x the others
    per_token = _plan_losses(tmp_path, n_samples=10, max_steps=3, accepts=False)
    assert all(abs(x - level) < 1.0 for x in per_token)
