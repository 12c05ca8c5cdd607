"""Machinery shared by graff's schedulers: budget, loss capture, skipped steps, safe LR writes.

:class:`BudgetedScheduler` is a :class:`torch.optim.lr_scheduler.LRScheduler`, so ``isinstance``
checks in Hugging Face ``Trainer``, Lightning and accelerate pass. A subclass implements
:meth:`BudgetedScheduler._plan`, which returns one LR *factor* per parameter group; the base class
writes ``lr_g = clamp(initial_lr_g · factor_g, lr_min_g, lr_max_g)`` into the optimizer, where the
clamp bounds are ``lr_min_factor · initial_lr_g`` and ``lr_max_factor · initial_lr_g``. So groups
keep the ratios of their initial LRs, and whatever a planner does, the LR that reaches the
optimizer is finite, positive and bounded.

A call to ``step()`` that follows no ``optimizer.step()`` (e.g. ``GradScaler`` skipped an overflow
step, or a trainer called ``step()`` twice) is not counted as a step: nothing is planned, the
budget's step count does not move, and :attr:`BudgetedScheduler.skipped_steps` counts it. A NaN
or infinite loss never reaches a planner: it is counted in
:attr:`BudgetedScheduler.nonfinite_losses` and the planner sees ``loss=None``.

Under ``torch.distributed`` (detected automatically; ``distributed=False`` opts out) each step
first reduces the rank-local inputs — the loss, the entropy probes' statistics and rank 0's
clock — in one small all-reduce, so that every rank plans the same LR (:mod:`graff.distributed`).
"""

from __future__ import annotations

import math
import sys
from abc import ABCMeta, abstractmethod
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LRScheduler, SequentialLR

from graff._checks import (
    check_adam,
    check_finite_state,
    check_optimizer_and_model,
    check_positive,
)
from graff._hooks import HookSet, hook_state, restore_hooks
from graff._warn import warn
from graff.clock import BudgetClock
from graff.distributed import resolve_sync
from graff.errors import CheckpointError, GraffConfigError, GraffTypeError, GraffWarning
from graff.guard import clamp_lr
from graff.probes._capture import output_loss
from graff.probes._context import reads_pass
from graff.probes.curvature import CurvatureProbe
from graff.probes.entropy import EntropyProbe
from graff.schedulers._loss import NO_LOSS_WARNING_STEPS, loss_value, no_loss_message
from graff.schedulers._state_checks import (
    FORMAT_VERSION,
    check_counters,
    check_group_lr,
    is_positive_finite,
    set_lrs,
)


def as_budget(budget: BudgetClock | float | int) -> BudgetClock:
    """A :class:`BudgetClock` from a clock or a number of seconds."""
    if isinstance(budget, BudgetClock):
        return budget
    if isinstance(budget, (int, float)) and not isinstance(budget, bool):
        return BudgetClock(seconds=budget)
    raise GraffTypeError(
        f"budget must be a graff.BudgetClock or a number of seconds, got {type(budget).__name__}."
    )


def _called_by_sequential_lr(scheduler: Any) -> bool:
    """Whether the running ``step()`` of ``scheduler`` was called by a ``SequentialLR.step``.

    torch < 2.4's ``SequentialLR`` starts a scheduler at its milestone with ``scheduler.step(0)``,
    an epoch that graff's ``step(loss)`` would otherwise read as a loss of 0 (torch 2.4+ calls
    ``scheduler._update_lr(0)``). Only asked when ``step()`` gets an ``int``, so it costs nothing
    on the usual tensor or float loss.
    """
    frame = sys._getframe(1)
    for _ in range(16):  # past this scheduler's own step() frames (a subclass calls super())
        if frame is None:
            return False
        owner = frame.f_locals.get("self")
        if owner is not scheduler:
            return frame.f_code.co_name == "step" and isinstance(owner, SequentialLR)
        frame = frame.f_back
    return False


class BudgetedScheduler(LRScheduler, metaclass=ABCMeta):
    """Base class: a budget-aware LR scheduler around any torch optimizer.

    Args:
        optimizer: Any :class:`torch.optim.Optimizer` whose update is linear in ``lr``.
        budget: A :class:`~graff.BudgetClock`, or a number of seconds.
        model: Optional model; the loss in its forward outputs (``.loss``, ``["loss"]``, or a
            tuple's scalar first entry) is captured so that ``step()`` can be called without a
            loss (averaged over gradient-accumulation micro-batches).
        lr_min_factor: Lower clamp of every group's LR, as a fraction of its initial LR.
        lr_max_factor: Upper clamp of every group's LR, as a multiple of its initial LR.
        process_group: The ``torch.distributed`` group to agree over (``None``: the default).
        distributed: ``None`` reduces the rank-local inputs when ``torch.distributed`` is
            initialised with more than one rank, ``False`` never, ``True`` requires it.
    """

    #: Whether the schedule is planned from the training loss (GRAFF, REACTOR): such a
    #: scheduler warns once when it gets no loss for ``NO_LOSS_WARNING_STEPS`` steps in a row.
    plans_from_loss = False

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        budget: BudgetClock | float | int,
        *,
        model: nn.Module | None = None,
        lr_min_factor: float = 1e-3,
        lr_max_factor: float = 100.0,
        process_group: Any = None,
        distributed: bool | None = None,
    ) -> None:
        check_optimizer_and_model(optimizer, model)
        self._sync = resolve_sync(process_group, distributed)
        self.lr_min_factor = check_positive("lr_min_factor", lr_min_factor)
        self.lr_max_factor = check_positive("lr_max_factor", lr_max_factor)
        if not self.lr_min_factor <= 1.0 <= self.lr_max_factor:
            raise GraffConfigError(
                "need lr_min_factor <= 1 <= lr_max_factor, got "
                f"lr_min_factor={lr_min_factor!r}, lr_max_factor={lr_max_factor!r}."
            )
        for i, group in enumerate(optimizer.param_groups):
            check_group_lr(i, group.get("initial_lr", group["lr"]), type(self).__name__)
        self.budget = as_budget(budget)
        self.model = model
        self.skipped_steps = 0
        self.nonfinite_losses = 0
        self._optimizer_steps = 0  # optimizer steps since the last scheduler step
        # sum and count of the forward losses captured since the last step (a tensor sum: no
        # device sync per forward pass, bounded memory however many forwards come in between)
        self._captured_sum: Tensor | None = None
        self._captured_count = 0
        # False while step() gets its loss passed in: the forward hook then keeps nothing
        self._capture_wanted = True
        self._steps_without_loss = 0  # for the no-loss warning (-1: given); not saved
        self.optimizer = optimizer  # what _register_hooks hooks (LRScheduler sets it too)
        self._hooks = HookSet(self)
        self._register_hooks()
        super().__init__(optimizer)
        self.budget.start()
        self._share_sync()

    # ------------------------------------------------------------------ hooks
    def _register_hooks(self) -> None:
        """Hook ``self.optimizer`` (counts its steps) and ``self.model`` (captures the loss).

        The hooks hold the scheduler weakly (:mod:`graff._hooks`): the optimizer and the model
        never keep a dropped scheduler alive, and its hooks go when it is collected.
        """
        self._hooks.add(self.optimizer.register_step_post_hook, "_on_optimizer_step")
        if self.model is not None:
            self._hooks.add_module_hook(self.model, "forward", "_capture_loss")

    def __getstate__(self) -> dict[str, Any]:
        """Hooks are not copied: torch's ``Optimizer`` drops its step hooks when copied."""
        return hook_state(self)

    def __setstate__(self, state: dict[str, Any]) -> None:
        """A copy (``deepcopy``, pickle) hooks the optimizer and model it holds, so it schedules
        as the original would from that point; its probes re-hook themselves likewise."""
        restore_hooks(self, state)

    def _on_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._optimizer_steps += 1

    def _capture_loss(self, module: nn.Module, args: Any, output: Any) -> None:
        if not self._capture_wanted or not reads_pass():
            return
        loss = output_loss(output)
        if loss is None or loss.numel() == 0 or not loss.is_floating_point():
            return
        # a new tensor (in-place edits of the loss must not change it), read in step() only if
        # step() gets no loss; several entries (nn.DataParallel's one loss per replica, which
        # Hugging Face's Trainer averages too) count as their mean, as a loss passed to step() does
        value = loss.detach() if loss.numel() == 1 else loss.detach().float().mean()
        total = self._captured_sum
        if total is not None:
            self._captured_sum = total + value.float()
        elif value.dtype == torch.float32:
            self._captured_sum = value.clone()
        else:
            self._captured_sum = value.float()  # a conversion is a new tensor already
        self._captured_count += 1

    def _share_sync(self) -> None:
        """Let the curvature probes this scheduler holds average their HVPs over the same group."""
        for value in vars(self).values():
            if isinstance(value, CurvatureProbe):
                value.sync = self._sync

    def _entropy_probes(self) -> list[EntropyProbe]:
        probes = {id(v): v for v in vars(self).values() if isinstance(v, EntropyProbe)}
        return list(probes.values())

    def _agree_across_ranks(self, loss: float | None) -> float | None:
        """One all-reduce of the step's rank-local inputs (:mod:`graff.distributed`): returns the
        global loss, sets the clock to rank 0's reading and the entropy probes' pooled stats."""
        clock, probes = self.budget, self._entropy_probes()
        wall = clock.kind == "seconds"
        agreed = self._sync.exchange_step(
            loss,
            self._optimizer_steps > 0,
            clock.local_elapsed_seconds() if wall else 0.0,
            [probe.sufficient_statistics() for probe in probes],
        )
        if wall:
            clock.agree_elapsed(agreed.rank0_elapsed)
        for probe, sums in zip(probes, agreed.sums, strict=True):
            probe.set_pooled(sums)
        return agreed.loss

    def remove(self) -> None:
        """Detach every hook this scheduler registered (idempotent; the LR stays as last written).

        Dropping the scheduler does the same: its hooks go as soon as it is collected.
        """
        hooks = getattr(self, "_hooks", None)  # None: a constructor that failed before hooking
        if hooks is not None:
            hooks.remove()

    # ------------------------------------------------------------------- step
    def _initial_step(self) -> None:
        self._step_count = 0
        self.last_epoch = 0
        self._write(self._initial_factors())

    def step(self, loss: Any = None) -> None:  # type: ignore[override]
        """Plan and apply the LR for the next optimizer step. Call after ``optimizer.step()``.

        Args:
            loss: The training loss of the step just taken (tensor, float or HF output). When
                omitted, the loss captured from ``model``'s forward passes is used, if any.
                While ``step()`` is given a loss, the forward hook keeps none (it costs nothing);
                it resumes with the first ``step()`` that has no loss, so the step right after a
                switch from passing losses to omitting them has no loss.
        """
        if type(loss) is int and _called_by_sequential_lr(self):
            self._update_lr(loss)  # torch < 2.4's SequentialLR passes an epoch, not a loss
            return
        self._adopt_new_groups()
        value = loss_value(loss)
        self._capture_wanted = value is None  # the next steps' losses come from the hook
        if value is None and self._captured_sum is not None:
            value = float(self._captured_sum) / self._captured_count
        self._captured_sum, self._captured_count = None, 0
        if self._sync is not None:  # one all-reduce: loss, entropy statistics, rank 0's clock
            value = self._agree_across_ranks(value)
        if self._optimizer_steps == 0:
            self.skipped_steps += 1
            self._write(self._current_factors())
            return
        self._optimizer_steps = 0
        self._watch_for_no_loss(value)
        if value is not None and not math.isfinite(value):
            self.nonfinite_losses += 1
            value = None
        self.budget.tick()
        self.last_epoch += 1
        self._step_count += 1
        self._write(self._plan(value))

    def _update_lr(self, epoch: int | None = None) -> None:
        """Start the schedule where another scheduler hands over (torch's ``SequentialLR``).

        ``SequentialLR`` keeps the schedulers after its first at ``last_epoch == -1`` ("not
        started") and, at the milestone, calls ``_update_lr(0)`` (torch < 2.4: ``step(0)``). A
        graff scheduler then writes the LRs of its current plan (at the first milestone: its
        initial LRs) and counts no step: like a torch scheduler at its epoch 0. The losses the
        model's forward hook captured and the optimizer steps counted while the other
        scheduler ran belong to none of this scheduler's steps and are dropped. A graff
        scheduler cannot jump to another epoch: ``epoch`` must be 0 or None.
        """
        if epoch is not None and epoch != 0:
            raise GraffConfigError(
                f"{type(self).__name__} plans from the losses it has seen and cannot jump to "
                f"epoch={epoch!r}; call step() once per optimizer step instead."
            )
        self._adopt_new_groups()
        self.last_epoch = max(self.last_epoch, 0)
        self._captured_sum, self._captured_count = None, 0
        self._optimizer_steps = 0
        self._write(self._current_factors())

    def _watch_for_no_loss(self, value: float | None) -> None:
        """Warn once when a scheduler that plans from the loss has had none for a while."""
        if not self.plans_from_loss or self._steps_without_loss < 0:  # -1: warned already
            return
        run = self._steps_without_loss + 1 if value is None else 0
        self._steps_without_loss = run
        if run == NO_LOSS_WARNING_STEPS:
            self._steps_without_loss = -1  # never again for this scheduler
            warn(no_loss_message(type(self).__name__, run, self.model is not None), GraffWarning)

    def _adopt_new_groups(self) -> None:
        """Schedule the parameter groups added since the last step (``add_param_group``).

        As torch's chainable schedulers do, a new group comes in at the LR it was added with and
        from then on moves by the same factor as the others: its ``initial_lr`` (unless it
        brought one) is that LR over the factor in force, so the ratio of its LR to the others'
        stays what it was when it came in (gradual unfreezing, e.g. Lightning's
        ``BackboneFinetuning``, sets it from the first group's current LR).
        """
        groups = self.optimizer.param_groups
        known = len(self._factors)
        if len(groups) <= known:
            return
        factor = self._factors[0] if known else 1.0
        owner = type(self).__name__
        for i in range(known, len(groups)):
            group = groups[i]
            lr = check_group_lr(i, group["lr"], owner)
            initial = check_group_lr(i, group.setdefault("initial_lr", lr / factor), owner)
            self.base_lrs.append(initial)
            self._factors.append(lr / initial)
            self._last_lr.append(lr)

    def _write(self, factors: list[float], apply: bool = True) -> None:
        """Clamp the factors' LRs and write them into the optimizer (``apply=False``: only
        remember them, for a scheduler that ``SequentialLR`` has not started yet)."""
        lrs = []
        for group, factor in zip(self.optimizer.param_groups, factors, strict=True):
            initial = float(group["initial_lr"])
            lr = clamp_lr(
                initial * factor, initial * self.lr_min_factor, initial * self.lr_max_factor
            )
            if not apply:
                pass
            elif isinstance(group["lr"], Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
            lrs.append(lr)
        self._last_lr = lrs
        self._factors = [
            lr / float(g["initial_lr"])
            for lr, g in zip(lrs, self.optimizer.param_groups, strict=True)
        ]

    def get_lr(self) -> list[float]:  # type: ignore[override]
        """The LRs last written to the optimizer (graff plans in :meth:`step`)."""
        return list(self._last_lr)

    def _current_factors(self) -> list[float]:
        return list(self._factors)

    # -------------------------------------------------------- subclass hooks
    @abstractmethod
    def _initial_factors(self) -> list[float]:
        """Per-group LR factors before the first step."""

    @abstractmethod
    def _plan(self, loss: float | None) -> list[float]:
        """Per-group LR factors for the next step, given the finite loss of the last (or None)."""

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        return None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Versioned state: counters, budget clock, LRs and the subclass's planner state.

        Holds only tensors, numbers, strings, lists and dicts, so it loads with
        ``torch.load(..., weights_only=True)``.
        """
        return {
            "format_version": FORMAT_VERSION,
            "scheduler": type(self).__name__,
            "num_groups": len(self.optimizer.param_groups),
            "last_epoch": self.last_epoch,
            "step_count": self._step_count,
            "skipped_steps": self.skipped_steps,
            "nonfinite_losses": self.nonfinite_losses,
            "budget": self.budget.state_dict(),
            "last_lr": list(self._last_lr),
            "extra": self._extra_state(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict` and re-apply its LRs to the optimizer.

        A state saved while torch's ``SequentialLR`` had not started this scheduler yet
        (``last_epoch == -1``, no step taken) loads too; its LRs are then not written into the
        optimizer, whose LR belongs to the scheduler running before the milestone.

        Raises:
            CheckpointError: if the state is of another version, another scheduler type or
                another number of parameter groups, or is missing keys. Nothing is changed then.
        """
        state = state_dict
        if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(
                f"not a graff scheduler state of format_version {FORMAT_VERSION} "
                f"(got {type(state).__name__}"
                f"{', version ' + repr(state.get('format_version')) if isinstance(state, dict) else ''})."
            )
        if state.get("scheduler") != type(self).__name__:
            raise CheckpointError(
                f"state was saved by {state.get('scheduler')!r}, cannot load into {type(self).__name__}."
            )
        n = len(self.optimizer.param_groups)
        last_lr = state.get("last_lr")
        if state.get("num_groups") != n or not isinstance(last_lr, list) or len(last_lr) != n:
            raise CheckpointError(
                f"state has {state.get('num_groups')!r} parameter groups, the optimizer has {n}."
            )
        missing = {
            "last_epoch",
            "step_count",
            "skipped_steps",
            "nonfinite_losses",
            "budget",
            "extra",
        } - set(state)
        if missing:
            raise CheckpointError(f"scheduler state is missing keys {sorted(missing)}.")
        check_counters(state)
        if not all(is_positive_finite(x) for x in last_lr):
            raise CheckpointError(f"scheduler state has invalid last_lr {last_lr!r:.200}.")
        # Validate what can be checked before changing anything; then load, check what was
        # loaded, and restore the previous state on any failure (never a half-loaded scheduler).
        scratch = BudgetClock(steps=1) if self.budget.kind == "steps" else BudgetClock(seconds=1)
        scratch.load_state_dict(state["budget"])  # raises CheckpointError on a bad clock state
        try:
            self._check_extra_state(state["extra"])
        except CheckpointError:
            raise
        except Exception as err:  # a malformed entry the checks tripped over
            raise CheckpointError(
                f"{type(self).__name__} state is malformed: {type(err).__name__}: {err}"
            ) from err
        previous = self.state_dict()  # a snapshot: it shares no tensor with the live state
        lrs_before = [float(g["lr"]) for g in self.optimizer.param_groups]
        try:
            self._load_checked(state, prechecked=True)
        except Exception as err:
            self._load_checked(previous)
            set_lrs(self.optimizer, lrs_before)  # a not-started previous state writes none
            if isinstance(err, CheckpointError):
                raise
            raise CheckpointError(
                f"{type(self).__name__} state does not fit: {type(err).__name__}: {err}"
            ) from err
        built_with = previous["budget"]["total"]
        if self.budget.total != built_with:
            unit = "steps" if self.budget.kind == "steps" else "seconds"
            warn(
                f"the loaded state's budget ({self.budget.total:g} {unit}) replaces the "
                f"{built_with:g} {unit} this {type(self).__name__} was built with: a resumed run "
                "keeps the budget it was saved with (as a torch scheduler keeps its T_max), and "
                "its schedule anneals by that deadline. Build the scheduler with the saved "
                "budget to silence this.",
                GraffWarning,
            )

    def _load_checked(self, state: dict[str, Any], prechecked: bool = False) -> None:
        """Load a state, then check what was loaded (raises CheckpointError)."""
        if not prechecked:
            self._check_extra_state(state["extra"])
        lrs = [float(x) for x in state["last_lr"]]
        self.budget.load_state_dict(state["budget"])
        self._load_extra_state(state["extra"])
        self.last_epoch = int(state["last_epoch"])
        self._step_count = int(state["step_count"])
        self.skipped_steps = int(state["skipped_steps"])
        self.nonfinite_losses = int(state["nonfinite_losses"])
        self._optimizer_steps = 0
        initial = [float(g["initial_lr"]) for g in self.optimizer.param_groups]
        factors = [lr / base for lr, base in zip(lrs, initial, strict=True)]
        self._write(factors, apply=self.last_epoch >= 0)
        check_finite_state(self._extra_state(), f"{type(self).__name__} state")
        for name, optimizer in self._inner_optimizers().items():
            check_adam(optimizer, f"{type(self).__name__} state {name!r}")

    def _inner_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """The scheduler's own (Adam) optimizers, checked after a load (default: none)."""
        return {}

    def _check_extra_state(self, extra: dict[str, Any]) -> None:
        """Raise :class:`CheckpointError` if ``extra`` cannot be loaded (default: accept dicts)."""
        if not isinstance(extra, dict):
            raise CheckpointError(
                f"scheduler state 'extra' must be a dict, got {type(extra).__name__}."
            )
