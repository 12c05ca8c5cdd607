"""graff schedulers under PyTorch Lightning (CPU, offline, one process).

``configure_optimizers`` returns the optimizer and the scheduler with ``"interval": "step"``.
No ``lr_scheduler_step`` override is needed: graff schedulers are ``LRScheduler`` subclasses, so
Lightning accepts them and calls ``scheduler.step()`` (no argument) once per optimizer step,
after gradient accumulation; the loss reaches the planner through ``model=`` (the scheduler
captures ``.loss``/``["loss"]`` from the wrapped network's training forwards and averages it
over the micro-batches of a step). A callback stops training when the budget is used up.
"""

from __future__ import annotations

import math

import pytest
import torch

import graff

try:
    import lightning.pytorch as pl
except ImportError:
    pl = pytest.importorskip("pytorch_lightning")

from tests import _ckpt_worker as worker

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    # Lightning's own notices on a tiny CPU run (few dataloader workers, pytree deprecations)
    pytest.mark.filterwarnings("ignore::UserWarning:lightning|pytorch_lightning|lightning_fabric"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*is deprecated"),
]
LR = 3e-3


class TinyModule(pl.LightningModule):
    """The recipe: a LightningModule around a network whose forward returns the loss."""

    def __init__(self, kind: str, budget_steps: int) -> None:
        super().__init__()
        self.net = worker.TinyLM()
        self.kind, self.budget_steps = kind, budget_steps
        self.micro_losses: list[float] = []

    def training_step(self, batch, batch_idx):
        loss = self.net(input_ids=batch, labels=batch)["loss"]
        self.micro_losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=LR)
        budget = graff.BudgetClock(steps=self.budget_steps)
        if self.kind == "graff":
            sched = graff.GraffScheduler(
                opt, budget=budget, model=self.net, config=graff.GraffConfig(curvature_every=4)
            )
        elif self.kind == "reactor":
            sched = graff.ReactorScheduler(opt, budget=budget, model=self.net, seed=0)
        else:
            sched = graff.BudgetScheduler(opt, budget=budget, model=self.net)
        self.sched = sched
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class StopWhenBudgetExhausted(pl.Callback):
    """Stop the Trainer once the graff scheduler's budget is used up."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.sched.budget.exhausted:
            trainer.should_stop = True


def _loader(n: int) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    return torch.utils.data.DataLoader([worker.batch(g) for _ in range(n)], batch_size=None)


def _fit(
    module, *, max_steps: int, accum: int = 1, callbacks=(), ckpt_path=None, batches=None
) -> pl.Trainer:
    checkpointing = any(isinstance(c, pl.callbacks.ModelCheckpoint) for c in callbacks)
    trainer = pl.Trainer(
        max_steps=max_steps,
        accumulate_grad_batches=accum,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=checkpointing,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
    )
    batches = min(4 * max_steps * accum, 64) if batches is None else batches  # per epoch
    trainer.fit(module, _loader(batches), ckpt_path=ckpt_path)
    return trainer


@pytest.mark.parametrize("kind", ["graff", "reactor", "budget"])
@pytest.mark.parametrize("accum", [1, 2])
def test_scheduler_steps_once_per_optimizer_step(kind, accum) -> None:
    module = TinyModule(kind, budget_steps=100)
    trainer = _fit(module, max_steps=6, accum=accum)
    sched = module.sched
    assert trainer.global_step == 6
    assert sched.budget.steps == 6  # once per optimizer step, not per micro-batch
    assert sched.last_epoch == 6
    assert sched.skipped_steps == 0
    assert len(module.micro_losses) == 6 * accum
    assert all(math.isfinite(lr) and 0 < lr for lr in sched.get_last_lr())
    sched.remove()


@pytest.mark.parametrize("kind", ["graff", "reactor", "budget"])
def test_budget_callback_stops_training(kind) -> None:
    module = TinyModule(kind, budget_steps=8)
    trainer = _fit(module, max_steps=1000, accum=2, callbacks=[StopWhenBudgetExhausted()])
    assert module.sched.budget.exhausted
    assert trainer.global_step == 8  # stopped at the budget, far before max_steps
    assert len(module.micro_losses) == 16
    module.sched.remove()


class _RecordPlannerLosses(pl.Callback):
    """Record the loss each optimizer step hands to the scheduler's planner."""

    def __init__(self) -> None:
        self.received: list[float | None] = []

    def on_train_start(self, trainer, pl_module) -> None:
        sched = pl_module.sched
        original = sched._plan
        sched._plan = lambda loss: (self.received.append(loss), original(loss))[1]


@pytest.mark.parametrize("kind", ["graff", "reactor"])
def test_the_loss_reaches_the_planner_as_the_micro_batch_mean(kind) -> None:
    module, spy = TinyModule(kind, budget_steps=100), _RecordPlannerLosses()
    _fit(module, max_steps=5, accum=2, callbacks=[spy])
    pairs = list(zip(module.micro_losses[::2], module.micro_losses[1::2], strict=True))
    assert spy.received == pytest.approx([(a + b) / 2 for a, b in pairs], rel=1e-6)
    module.sched.remove()


def test_budget_schedule_is_exact_under_accumulation() -> None:
    """BudgetScheduler under Lightning + accumulation writes its closed-form LRs."""
    module, lrs = TinyModule("budget", budget_steps=6), []

    class RecordLR(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if (batch_idx + 1) % 2 == 0:
                lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    _fit(module, max_steps=6, accum=2, callbacks=[RecordLR()])
    prior = module.sched.prior
    assert lrs == pytest.approx([LR * max(1e-6, prior(k / 6)) for k in range(1, 7)], rel=1e-6)


class _RecordLR(pl.Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.lrs.append(pl_module.sched.get_last_lr()[0])


@pytest.mark.parametrize("kind", ["graff", "budget"])
def test_lightning_checkpoint_resume_continues_the_budget(kind, tmp_path) -> None:
    """Lightning's own checkpoints hold ``sched.state_dict()`` (and so the budget clock);
    ``fit(ckpt_path=...)`` restores it and the run ends at the original budget."""
    saver = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=5, save_top_k=-1)
    first, record = TinyModule(kind, budget_steps=12), _RecordLR()
    _fit(first, max_steps=5, callbacks=[saver, record])
    ckpt = tmp_path / "epoch=0-step=5.ckpt"
    assert torch.load(ckpt, weights_only=True)["lr_schedulers"][0]["budget"]["steps"] == 5
    second, stop = TinyModule(kind, budget_steps=12), StopWhenBudgetExhausted()
    trainer = _fit(second, max_steps=1000, callbacks=[stop, record], ckpt_path=ckpt)
    assert trainer.global_step == 12
    assert second.sched.budget.steps == 12
    assert second.sched.budget.exhausted
    if kind == "budget":  # loss-independent: the LRs across the resume are the closed form
        prior = second.sched.prior
        expected = [LR * max(1e-6, prior(k / 12)) for k in range(1, 13)]
        assert record.lrs == pytest.approx(expected, rel=1e-6)


class BareLossModule(TinyModule):
    """The recipe for a network without a ``.loss`` output: hand the loss to ``step`` yourself."""

    def __init__(self, budget_steps: int) -> None:
        super().__init__("graff", budget_steps)
        self.pending: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        logits = self.net(input_ids=batch, labels=batch)["logits"]  # as if it returned logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, worker.VOCAB), batch[:, 1:].reshape(-1)
        )
        self.micro_losses.append(float(loss.detach()))
        self.pending.append(loss.detach())
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=LR)
        self.sched = graff.GraffScheduler(opt, budget=graff.BudgetClock(steps=self.budget_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.sched, "interval": "step"}}

    def lr_scheduler_step(self, scheduler, metric) -> None:
        scheduler.step(torch.stack(self.pending).mean())  # the mean over the micro-batches
        self.pending.clear()


def test_lr_scheduler_step_override_passes_the_loss_without_model() -> None:
    module, spy = BareLossModule(budget_steps=100), _RecordPlannerLosses()
    trainer = _fit(module, max_steps=4, accum=2, callbacks=[spy])
    pairs = list(zip(module.micro_losses[::2], module.micro_losses[1::2], strict=True))
    assert spy.received == pytest.approx([(a + b) / 2 for a, b in pairs], rel=1e-6)
    assert module.sched.budget.steps == trainer.global_step == 4


class UnfreezingModule(TinyModule):
    """Gradual unfreezing: the embedding is the frozen ``backbone`` of ``BackboneFinetuning``."""

    @property
    def backbone(self) -> torch.nn.Module:
        return self.net.model.embed

    def configure_optimizers(self):
        # BackboneFinetuning froze the backbone before this runs: optimize what is trainable
        trainable = [p for p in self.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=LR)
        budget = graff.BudgetClock(steps=self.budget_steps)
        make = {"graff": graff.GraffScheduler, "budget": graff.BudgetScheduler}[self.kind]
        self.sched = make(opt, budget=budget, model=self.net)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.sched, "interval": "step"}}


@pytest.mark.parametrize("kind", ["graff", "budget"])
def test_backbone_finetuning_adds_a_group_that_the_scheduler_takes_in(kind) -> None:
    # Lightning's stock callback unfreezes the backbone at epoch 1 with
    # optimizer.add_param_group (its LR a tenth of the first group's); graff crashed at the next
    # step (KeyError: 'initial_lr') and now schedules the group with the others
    module = UnfreezingModule(kind, budget_steps=24)
    unfreeze = pl.callbacks.BackboneFinetuning(unfreeze_backbone_at_epoch=1)
    # 8 steps per epoch: unfrozen from step 8 on
    trainer = _fit(module, max_steps=24, callbacks=[unfreeze], batches=8)
    opt, sched = trainer.optimizers[0], module.sched
    assert trainer.global_step == 24
    assert len(opt.param_groups) == 2
    assert sched.last_epoch == 24
    assert all(math.isfinite(lr) and 0 < lr for lr in sched.get_last_lr())
    assert opt.param_groups[1]["initial_lr"] > 0
    assert any(p.grad is not None or p.requires_grad for p in module.backbone.parameters())
    sched.remove()
