"""The curvature probe's input checks: its blocks, the Δθ storage dtype, and no sparse gradients.

The probe reads dense gradients only (its dot products run on strided tensors): a model with a
``sparse=True`` embedding is refused at construction, and any other sparse gradient is refused
from the optimizer's pre-step hook, before the update it would corrupt. Inputs that rule out the
λ̂ estimates (sharded parameters, a loss that cannot be re-evaluated) do not raise: the probe
turns λ̂ off with the warnings written here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from graff.blocks import Block, discover_blocks
from graff.errors import GraffConfigError, GraffTypeError

__all__ = [
    "SHARDED_LAMBDA_OFF",
    "SparseGradCheck",
    "check_blocks",
    "check_update_dtype",
    "lambda_off_message",
    "reject_sparse_grad",
    "reject_sparse_modules",
]


def check_update_dtype(dtype: Any) -> torch.dtype | None:
    """``dtype`` if it is None or a floating ``torch.dtype`` (the Δθ buffer's storage)."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise GraffConfigError(
            f"update_dtype must be None or a floating torch.dtype, got {dtype!r}."
        )
    return dtype


def check_blocks(
    optimizer: torch.optim.Optimizer, model: nn.Module | None, blocks: Any
) -> list[Block]:
    """The probed blocks: discovered (``None`` or a mapping), or a checked list of ``Block``."""
    if blocks is None or isinstance(blocks, Mapping):
        return discover_blocks(optimizer, model, blocks)
    blocks = list(blocks)
    if not blocks or not all(isinstance(b, Block) for b in blocks):
        raise GraffTypeError(
            f"blocks must be None, a mapping {{name: parameters}} or a non-empty list of "
            f"graff.blocks.Block, got {blocks!r}."
        )
    return blocks


#: The warning when λ̂ is turned off because the parameters are sharded (FSDP).
SHARDED_LAMBDA_OFF = (
    "CurvatureProbe turns its λ̂ estimates off: the parameters are sharded (FSDP), "
    "and Hessian-vector products need gradients with respect to the full parameters; "
    "the per-step statistics are summed over the shards. See docs/distributed.md. "
    "To silence: warnings.filterwarnings('ignore', category=graff.errors.ProbeWarning)."
)


def lambda_off_message(err: Exception) -> str:
    """The warning when λ̂ is turned off because the loss cannot be re-evaluated."""
    message = f"CurvatureProbe turns its λ̂ estimates off: {err}"
    if "loss_fn=" not in message:
        message += " Pass loss_fn= to enable them."
    return (
        message + " loss_fn must return the loss on one fixed probe batch (the same tensors at "
        "every call, e.g. the first training batch): on the current batch λ̂ follows the batch "
        "noise and two identical runs differ. Without λ̂ the LR is guarded by the loss alone "
        "(docs/concepts/graff.md). To silence: "
        "warnings.filterwarnings('ignore', category=graff.errors.ProbeWarning)."
    )


_SPARSE_HINT = (
    "graff's curvature probe (used by GraffScheduler and ReactorScheduler) reads dense "
    "gradients only; build the module with sparse=False, or use graff.BudgetScheduler, "
    "which reads no gradients."
)


def reject_sparse_modules(model: nn.Module | None, params: Sequence[Tensor]) -> None:
    """Raise if ``model`` has an embedding with ``sparse=True`` whose weight is probed."""
    if model is None:
        return
    ids = {id(p) for p in params}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse and id(m.weight) in ids:
            raise GraffConfigError(f"{name or type(m).__name__} has sparse=True: {_SPARSE_HINT}")


def reject_sparse_grad(p: Tensor) -> None:
    """Raise (before the optimizer step runs) if ``p`` has a sparse gradient."""
    if p.grad is not None and p.grad.layout != torch.strided:
        raise GraffConfigError(
            f"a parameter of shape {tuple(p.shape)} has a sparse gradient ({p.grad.layout}): "
            + _SPARSE_HINT
        )


class SparseGradCheck:
    """Rejects a sparse gradient the first time each parameter has a gradient.

    Each parameter is checked once (its gradient's layout does not change afterwards); once all
    are, :meth:`check` costs one attribute test per step.
    """

    def __init__(self, params: Sequence[Tensor]) -> None:
        self._params = params
        self._checked = [False] * len(params)
        self._all_checked = not params

    def check(self, have: list[int]) -> None:
        """Check the parameters at the indices ``have`` (those with a gradient now)."""
        if self._all_checked:
            return
        for j in have:
            if not self._checked[j]:
                reject_sparse_grad(self._params[j])
                self._checked[j] = True
        self._all_checked = all(self._checked)
