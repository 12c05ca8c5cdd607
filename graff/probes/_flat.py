"""One flat, block-padded buffer shaped like a list of parameters, with fused block sums.

The curvature probe keeps one copy of the trainable parameters (the applied update
:math:`\\Delta\\theta`). Storing it as a single flat tensor per (device, dtype), ordered by block
and with each block's segment zero-padded to a multiple of ``chunk`` elements, makes every
per-block reduction of an elementwise expression two kernels, whatever the number of parameters:

.. math::

    S_b(x) = \\sum_{k \\in \\text{block } b} x_k
           = \\sum_{r \\in \\text{rows}(b)} \\sum_{c < C} X_{r,c},\\qquad X = x.\\text{view}(-1, C),

a row sum of the ``[rows, C]`` view followed by an ``index_add`` over the few rows. The padding
stays zero, so it adds nothing to a sum of products. Memory: the parameters' elements plus at
most ``chunk − 1`` padding elements per block and one index entry per row — one copy of the
parameters plus O(blocks) for ``chunk`` fixed (O(N / chunk) for the row index, 1/256 of a
float32 copy at the default chunk).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

CHUNK = 256


class FlatBlockBuffer:
    """Flat storage for ``params`` (grouped by device and dtype) with per-block sums.

    Args:
        params: The parameters, in any order.
        block_of: Block index of each parameter (same length).
        num_blocks: Number of blocks.
        chunk: Row length of the reduction view; each block segment is padded to a multiple.

    Attributes:
        views: ``views[j]`` is a tensor shaped like ``params[j]`` inside the flat storage.
        flats: One flat tensor per (device, dtype) group.
    """

    def __init__(
        self,
        params: Sequence[Tensor],
        block_of: Sequence[int],
        num_blocks: int,
        chunk: int = CHUNK,
    ) -> None:
        self.num_blocks, self.chunk = num_blocks, chunk
        groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for j, p in enumerate(params):
            groups.setdefault((p.device, p.dtype), []).append(j)
        self.views: list[Tensor] = [torch.empty(0)] * len(params)
        self.flats: list[Tensor] = []
        self._rows: list[Tensor] = []  # block index of each row, per group (on its device)
        for (device, dtype), members in groups.items():
            members = sorted(members, key=lambda j: block_of[j])  # stable: keeps param order
            layout, rows, offset = [], [], 0
            for b in sorted({block_of[j] for j in members}):
                start = offset
                for j in (j for j in members if block_of[j] == b):
                    layout.append((j, offset))
                    offset += params[j].numel()
                padded = max(chunk, math.ceil((offset - start) / chunk) * chunk)
                rows += [b] * (padded // chunk)
                offset = start + padded
            flat = torch.zeros(offset, device=device, dtype=dtype)
            for j, start in layout:
                self.views[j] = flat[start : start + params[j].numel()].view(params[j].shape)
            self.flats.append(flat)
            self._rows.append(torch.tensor(rows, dtype=torch.long, device=device))
        self.flat_views = [v.view(-1) for v in self.views]

    def block_sums(self, *factors: Sequence[Tensor]) -> Tensor:
        """``[S_b(a ⊙ b ⊙ …)]_b`` (float32, CPU) for flat tensors given group by group.

        Each argument is a list with one flat tensor per group (``self.flats`` or tensors of the
        same layout); one argument gives plain block sums, two give per-block dot products.
        """
        out = torch.zeros(self.num_blocks)
        for g, rows in enumerate(self._rows):
            x = factors[0][g]
            for other in factors[1:]:
                x = x * other[g]
            partial = x.view(-1, self.chunk).sum(1, dtype=torch.float32)
            sums = torch.zeros(self.num_blocks, device=rows.device).index_add_(0, rows, partial)
            out = out + sums.cpu() if len(self._rows) > 1 else sums.cpu()
        return out

    def block_sq_norms(self) -> Tensor:
        """``[‖x_b‖²]_b`` of the buffer itself (float32, CPU), without a temporary copy."""
        out = torch.zeros(self.num_blocks)
        for flat, rows in zip(self.flats, self._rows, strict=True):
            norms = torch.linalg.vector_norm(flat.view(-1, self.chunk), dim=1).float()
            sums = torch.zeros(self.num_blocks, device=rows.device).index_add_(
                0, rows, norms.square_()
            )
            out = out + sums.cpu() if len(self._rows) > 1 else sums.cpu()
        return out

    def zero_(self) -> None:
        """Zero every element (parameters and padding)."""
        for flat in self.flats:
            flat.zero_()

    def neg_(self) -> None:
        """Negate every element in place (padding stays zero)."""
        for flat in self.flats:
            flat.neg_()
