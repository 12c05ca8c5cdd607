"""graff under ``torch.distributed``: what is rank-local, and the one small all-reduce per step.

Under ``DistributedDataParallel`` (DDP) every rank holds the same parameters and, after
``backward()``, the same all-reduced gradients, so everything graff computes from them is already
identical on every rank and needs **no communication**: the curvature probe's per-step
hypergradients :math:`\\langle g_{t+1}, \\Delta\\theta_t\\rangle`, gradient and update norms and
secants; the optimizer state (Adam moments, hence the preconditioner); and the planner's and
REACTOR policy's weights, which are seeded (``ReactorScheduler(seed=None)`` draws its seed once on
rank 0 and broadcasts it at construction).

Four inputs are rank-local, and a scheduler step reduces them so that every rank plans the same LR:

- **loss** (each rank's batch shard): the mean :math:`\\frac1W\\sum_r L_r` over the ranks that have
  a finite loss; a non-finite loss on any rank is non-finite everywhere, as the all-reduced
  gradient would be;
- **entropy-probe statistics** (each rank's sampled tokens): pooled sums
  :math:`\\sum H_j, \\sum H_j^2, n` give the mean and (population) std of all ranks' samples;
  ``min``/``max`` stay rank-local (no planner reads them);
- **wall clock** (each rank's own): every rank adopts rank 0's elapsed time, so
  ``budget.exhausted`` flips on the same step everywhere;
- **λ̂** (HVP Lanczos on each rank's captured probe batch): every Hessian-vector product
  is averaged over the ranks (the Hessian of the global probe batch), so λ̂ and the eigenvector
  are identical everywhere; the probe's automatic refresh interval is rank 0's.

Cost per scheduler step: **one** ``all_reduce(SUM)`` of a float64 tensor of
``5 + 5 × (number of entropy probes)`` entries: 40 bytes for BudgetScheduler, 80 for
GraffScheduler/ReactorScheduler with an entropy probe. During a λ̂ estimate (every ``curvature_every``
steps, by default tuned to ≤ 1 % of training time, communication included) each
Hessian-vector product adds one all-reduce the size of the trainable parameters, as a
gradient all-reduce does, and one 8-byte all-reduce agrees the next refresh step.

Sharded parameters (FSDP2's ``fully_shard``): each rank's dot products over its parameter shards
are partial sums, so the curvature probe sums them over the ranks (:meth:`RankSync.sum_partials`,
one more all-reduce per step of 4 floats per parameter tensor); Hessian-vector products cannot
reach sharded parameters, so λ̂ is off there (``docs/distributed.md``).

Distributed mode is detected when ``torch.distributed.is_available() and is_initialized()`` and
the group has more than one rank; pass ``distributed=False`` to a scheduler to opt out (each rank
then plans on its own data) and ``process_group=`` to use another group. Build the schedulers on
every rank, after ``init_process_group``; the reductions are collective calls, so every rank must
call ``scheduler.step()`` equally often.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from graff.errors import GraffConfigError, RankMismatchError

__all__ = ["RankSync", "is_sharded", "local_shard", "resolve_sync", "unwrap_data_parallel"]

_STEP_FIELDS = 5  # loss sum, finite losses, non-finite losses, ranks that stepped, rank 0's clock


def unwrap_data_parallel(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel``/``DataParallel`` wrappers (others unchanged).

    Probes hook and re-run the inner module: its forward hooks fire inside the wrapper's forward,
    and a probe's own re-evaluation then stays out of DDP's gradient reducer.
    """
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    while isinstance(model, wrappers):
        model = model.module
    return model


def is_sharded(t: Tensor) -> bool:
    """Whether ``t`` is a DTensor sharded over its mesh (FSDP2's ``fully_shard`` parameters)."""
    return any(p.is_shard() for p in getattr(t, "placements", ()))


def local_shard(t: Tensor) -> Tensor:
    """This rank's local tensor of a DTensor (a view of its storage), else ``t`` itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


class RankSync:
    """The process group a scheduler reduces its rank-local inputs over (see module docstring).

    Args:
        group: A ``torch.distributed`` process group, or ``None`` for the default group.

    Attributes:
        rank: This process's rank in ``group``.
        world_size: Number of ranks in ``group`` (> 1).
    """

    def __init__(self, group: Any = None) -> None:
        import torch.distributed as dist

        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        backend = str(dist.get_backend(group))
        use_cuda = "nccl" in backend and "gloo" not in backend and torch.cuda.is_available()
        self.device = (
            torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
        )

    # ---------------------------------------------------------------- collectives
    def all_reduce_sum(self, values: Sequence[float]) -> list[float]:
        """Sum ``values`` over the ranks in one ``all_reduce`` (float64); identical on every rank."""
        import torch.distributed as dist

        buf = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.group)
        return buf.cpu().tolist()

    def from_rank0(self, value: float) -> float:
        """Rank 0's ``value`` on every rank (a one-entry sum where the other ranks add 0)."""
        return self.all_reduce_sum([value if self.rank == 0 else 0.0])[0]

    def shared_seed(self) -> int:
        """A random 56-bit seed drawn on rank 0 (``os.urandom``), the same on every rank."""
        import torch.distributed as dist

        seed = int.from_bytes(os.urandom(7), "little") if self.rank == 0 else 0
        buf = torch.tensor([seed], dtype=torch.int64, device=self.device)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.group)  # the others add 0
        return int(buf.item())

    def average(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """The elementwise mean over the ranks of ``tensors`` (one all-reduce, float32 buffer)."""
        import torch.distributed as dist

        if not tensors:
            return []
        flat = torch.cat([t.detach().reshape(-1).to(torch.float32) for t in tensors])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
        flat /= self.world_size
        return [
            chunk.view_as(t).to(t.dtype)
            for chunk, t in zip(flat.split([t.numel() for t in tensors]), tensors, strict=True)
        ]

    def sum_partials(self, per_param: Tensor, sharded: Tensor) -> Tensor:
        """Sum per-parameter partial sums over the ranks (columns: parameters; one all-reduce).

        A sharded parameter's dot products are partial sums over this rank's shard; a
        replicated one's are complete on every rank, so only rank 0 contributes them.
        """
        import torch.distributed as dist

        weight = sharded.to(torch.float64) if self.rank else torch.ones(len(sharded))
        buf = (per_param.to(torch.float64) * torch.where(sharded, 1.0, weight)).to(self.device)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.group)
        return buf.to(per_param.dtype).cpu()

    def averaged_hvp(self, hvp: Callable[[list[Tensor]], list[Tensor]]) -> Callable:
        """``v ↦ mean_r H_r v``: the Hessian-vector product of the mean of the ranks' losses."""

        def hvp_mean(v: list[Tensor]) -> list[Tensor]:
            return self.average(hvp(v))

        return hvp_mean

    # ----------------------------------------------------------------- one step
    def exchange_step(
        self,
        loss: float | None,
        stepped: bool,
        elapsed: float,
        sums: Sequence[Sequence[float]] = (),
    ) -> StepAgreement:
        """Reduce one scheduler step's rank-local inputs in a single all-reduce.

        Args:
            loss: This rank's loss of the step (``None`` if it has none).
            stepped: Whether this rank's optimizer stepped since the last scheduler step.
            elapsed: This rank's elapsed budget seconds (only rank 0's is kept).
            sums: Further rank-local sums to add over the ranks (e.g. each entropy probe's
                sufficient statistics), one sequence per source.

        Returns:
            A :class:`StepAgreement`: the global loss (``None`` if no rank has one, NaN if any
            rank's is not finite), rank 0's elapsed seconds and the summed ``sums``.

        Raises:
            RankMismatchError: if the optimizer stepped on some ranks and not on others (e.g.
                a ``GradScaler`` that skipped a step on one rank only): the parameters differ.
        """
        finite = loss is not None and math.isfinite(loss)
        values = [
            loss if finite else 0.0,
            1.0 if finite else 0.0,
            1.0 if loss is not None and not finite else 0.0,
            1.0 if stepped else 0.0,
            elapsed if self.rank == 0 else 0.0,
        ]
        for part in sums:
            values += [float(x) for x in part]
        out = self.all_reduce_sum(values)
        loss_sum, n_finite, n_bad, n_stepped, rank0_elapsed = out[:_STEP_FIELDS]
        if n_stepped not in (0.0, float(self.world_size)):
            raise RankMismatchError(
                f"optimizer.step() ran on {int(n_stepped)} of {self.world_size} ranks before this "
                "scheduler step, so the ranks' parameters now differ. Every rank must take (or "
                "skip) the same optimizer steps; under DDP the gradients, and so GradScaler's "
                "overflow checks, agree by construction."
            )
        summed, start = [], _STEP_FIELDS
        for part in sums:
            summed.append(out[start : start + len(part)])
            start += len(part)
        if n_bad > 0:
            agreed: float | None = math.nan
        else:
            agreed = loss_sum / n_finite if n_finite > 0 else None
        return StepAgreement(agreed, rank0_elapsed, summed)


class StepAgreement(NamedTuple):
    """What every rank agrees on after :meth:`RankSync.exchange_step`."""

    loss: float | None
    rank0_elapsed: float
    sums: list[list[float]]


def resolve_sync(process_group: Any = None, distributed: bool | None = None) -> RankSync | None:
    """The :class:`RankSync` a scheduler should use, or ``None`` for single-process behaviour.

    Args:
        process_group: A process group, or ``None`` for the default one.
        distributed: ``None`` (auto: on when ``torch.distributed`` is initialised and the group
            has more than one rank), ``False`` (off: every rank plans alone), or ``True``
            (required: raise if ``torch.distributed`` is not initialised).

    Raises:
        GraffConfigError: ``distributed=True`` without an initialised process group, or
            ``distributed`` not a bool or None.
    """
    if distributed is not None and not isinstance(distributed, bool):
        raise GraffConfigError(f"distributed must be None, True or False, got {distributed!r}.")
    if distributed is False:
        return None
    import torch.distributed as dist

    ready = dist.is_available() and dist.is_initialized()
    if not ready:
        if distributed:
            raise GraffConfigError(
                "distributed=True, but torch.distributed is not initialised: call "
                "torch.distributed.init_process_group(...) before building the scheduler."
            )
        return None
    if dist.get_world_size(process_group) <= 1:
        return None
    return RankSync(process_group)
