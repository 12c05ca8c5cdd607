"""One flat, parameter-padded buffer shaped like a list of parameters, with fused segment sums.

The curvature probe keeps one copy of the trainable parameters (the applied update
:math:`\\Delta\\theta`). Storing it as a single flat tensor per (device, dtype), ordered by block
and with each parameter's segment zero-padded to a multiple of ``chunk`` elements, makes every
per-parameter (and so per-block) reduction of an elementwise expression two kernels, whatever
the number of parameters:

.. math::

    S_j(x) = \\sum_{k \\in \\text{param } j} x_k
           = \\sum_{r \\in \\text{rows}(j)} \\sum_{c < C} X_{r,c},\\qquad X = x.\\text{view}(-1, C),

a row reduction of the ``[rows, C]`` view followed by an ``index_add`` over the few rows
(:meth:`FlatBlockBuffer.param_totals`). Block sums add the parameters of a block. The padding
stays zero, so it adds nothing to a sum of products. A list of tensors shaped like the
parameters (the gradients) is brought into the same layout by one concatenation
(:meth:`FlatBlockBuffer.dots_with`), so a per-parameter dot product of the gradients with the
buffer is a row reduction too, instead of one kernel per parameter.

Memory: the parameters' elements plus at most ``chunk − 1`` padding elements per parameter
tensor and one index entry per row — one copy of the parameters plus O(parameter tensors) for
``chunk`` fixed (and O(N / chunk) for the row index, 1/256 of a float32 copy at the default
chunk). :meth:`FlatBlockBuffer.dots_with` allocates transient copies of at most
``MAX_SEGMENT`` elements at a time.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

CHUNK = 256
MAX_SEGMENT = 1 << 22  # most elements dots_with() copies at a time (16 MiB fp32)
_WIDE = (torch.float32, torch.float64)


def _row_dot(x: Tensor, y: Tensor) -> Tensor:
    """Row-wise dot products of two ``[rows, chunk]`` tensors, float32 (low precision upcast)."""
    if x.dtype in _WIDE and y.dtype == x.dtype:
        return torch.linalg.vecdot(x, y, dim=1).float()
    return (x.float() * y.float()).sum(1)


def row_sq(x: Tensor) -> Tensor:
    """Row-wise squared norms of a ``[rows, chunk]`` tensor, float32 (no temporary copy)."""
    if x.dtype in _WIDE:
        return torch.linalg.vector_norm(x, dim=1).float().square_()
    return torch.linalg.vector_norm(x, dim=1, dtype=torch.float32).square_()


class FlatBlockBuffer:
    """Flat storage for ``params`` (grouped by device and dtype) with per-parameter/block sums.

    Args:
        params: The parameters, in any order.
        block_of: Block index of each parameter (same length).
        chunk: Row length of the reduction view; each parameter segment is padded to a multiple.
        dtype: Storage dtype of floating parameters (``None``: each parameter's own).

    Attributes:
        views: ``views[j]`` is a tensor shaped like ``params[j]`` inside the flat storage.
        flats: One flat tensor per (device, dtype) group.
    """

    def __init__(
        self,
        params: Sequence[Tensor],
        block_of: Sequence[int],
        chunk: int = CHUNK,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.chunk = chunk
        self.num_params = len(params)
        self.block_of = [int(b) for b in block_of]
        groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for j, p in enumerate(params):
            store = dtype if dtype is not None and p.is_floating_point() else p.dtype
            groups.setdefault((p.device, store), []).append(j)
        self.views: list[Tensor] = [torch.empty(0)] * len(params)
        self.flats: list[Tensor] = []
        self._row_param: list[Tensor] = []  # parameter index of each row, per group (its device)
        # dots_with(): per group, segments of (param index or pad tensor) in buffer order
        self._plans: list[list[list[int | Tensor]]] = []
        self._segment_rows: list[list[tuple[int, int]]] = []  # [first, end) rows per segment
        for (device, dtype), members in groups.items():
            members = sorted(members, key=lambda j: self.block_of[j])  # stable: keeps order
            layout, rows, offset = [], [], 0
            plan: list[list[int | Tensor]] = [[]]
            bounds = [0]  # first row of each segment
            segment = 0
            for j in members:
                n = params[j].numel()
                padded = math.ceil(n / chunk) * chunk
                layout.append((j, offset))
                rows += [j] * (padded // chunk)
                offset += padded
                if plan[-1] and segment + padded > MAX_SEGMENT:
                    plan.append([])
                    bounds.append((offset - padded) // chunk)
                    segment = 0
                plan[-1].append(j)
                if padded > n:
                    plan[-1].append(torch.zeros(padded - n, device=device, dtype=dtype))
                segment += padded
            flat = torch.zeros(offset, device=device, dtype=dtype)
            for j, start in layout:
                self.views[j] = flat[start : start + params[j].numel()].view(params[j].shape)
            self.flats.append(flat)
            self._row_param.append(torch.tensor(rows, dtype=torch.long, device=device))
            self._plans.append(plan)
            bounds.append(offset // chunk)
            self._segment_rows.append(list(itertools.pairwise(bounds)))
        self._pads: dict[tuple[int, torch.dtype, torch.device], Tensor] = {}  # gather()
        self._row_views = [flat.view(-1, chunk) for flat in self.flats]

    # ------------------------------------------------------------------ copies
    def __getstate__(self) -> dict[str, Any]:
        """The flat buffers and each view's place in them, not the views themselves.

        Plain pickle writes each tensor's storage on its own, which would cut the views loose
        from the flats (the curvature probe writes Δθ through the views and reads the flats): a
        pickled copy would then compute from stale buffers. ``__setstate__`` rebuilds the views.
        """
        state = self.__dict__.copy()
        keys = [(f.untyped_storage().data_ptr(), f.dtype, f.device) for f in self.flats]
        places: list[Tensor | tuple[int, int, tuple[int, ...]]] = []
        for view in self.views:
            key = (view.untyped_storage().data_ptr(), view.dtype, view.device)
            if view.numel() == 0 or key not in keys:  # nothing shared: the tensor itself
                places.append(view)
                continue
            g = keys.index(key)
            start = view.storage_offset() - self.flats[g].storage_offset()
            places.append((g, start, tuple(view.shape)))
        state["views"] = places
        del state["_row_views"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        views = []
        for place in state["views"]:
            if isinstance(place, Tensor):
                views.append(place)
                continue
            g, start, shape = place
            views.append(self.flats[g][start : start + math.prod(shape)].view(shape))
        self.views = views
        self._row_views = [flat.view(-1, self.chunk) for flat in self.flats]

    # ------------------------------------------------------------------ layout
    def gather(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """``tensors`` (shaped like the parameters) copied into the buffer's layout.

        One new flat tensor per group, in the tensors' own dtype, padding zero: one
        concatenation per group instead of one copy kernel per tensor. The curvature probe holds
        θ_t this way between its hooks when the buffer is narrower than the parameters.
        """
        out = []
        for plan in self._plans:
            items: list[Tensor] = []
            for seg in plan:
                for x in seg:
                    if isinstance(x, int):
                        items.append(tensors[x])
                    else:  # a padding tensor: zeros of the tensors' dtype
                        items.append(self._zeros(x.numel(), items[-1]))
            # a new tensor, never a view of the input (callers update it in place)
            out.append(
                _flatten_dense_tensors(items)
                if len(items) > 1
                else torch.cat([items[0].reshape(-1)])
            )
        return out

    def views_of(self, flats: Sequence[Tensor]) -> list[Tensor]:
        """Views shaped like the parameters into ``flats``, tensors laid out like :attr:`flats`
        (e.g. :meth:`gather` output): elementwise work on the parameters' entries of a gathered
        copy, in place, without a second gathered tensor. One C++ call per group makes them."""
        out = list(self.views)
        for flat, plan in zip(flats, self._plans, strict=True):
            items = [self.views[x] if isinstance(x, int) else x for seg in plan for x in seg]
            views = _unflatten_dense_tensors(flat, items)  # the layout gather() wrote
            for x, view in zip((x for seg in plan for x in seg), views, strict=True):
                if isinstance(x, int):
                    out[x] = view
        return out

    def _zeros(self, n: int, like: Tensor) -> Tensor:
        key = (n, like.dtype, like.device)
        pad = self._pads.get(key)
        if pad is None:
            pad = self._pads[key] = torch.zeros(n, dtype=like.dtype, device=like.device)
        return pad

    # ------------------------------------------------------------------ row reductions
    def dots_with(
        self, tensors: Sequence[Tensor], *, self_dot: bool = False, buffer_sq: bool = False
    ) -> list[Tensor]:
        """Per-row ``⟨t_r, x_r⟩`` of ``tensors`` (shaped like the parameters) with the buffer.

        The tensors are brought into the buffer's layout one segment (at most ``MAX_SEGMENT``
        elements) at a time by a concatenation, so the transient copies stay bounded.

        Args:
            tensors: One tensor per parameter (entries whose buffer segment is zero may be any
                tensor of the shape, e.g. the buffer's own view).
            self_dot: Also return the per-row ``⟨t_r, t_r⟩``.
            buffer_sq: Also return the buffer's per-row ``⟨x_r, x_r⟩``.

        Returns:
            One float32 ``[k, rows]`` tensor per group (on its device), rows ``⟨t, x⟩``, then
            ``⟨t, t⟩`` and ``⟨x, x⟩`` as asked.
        """
        out = []
        for plan, bounds, rows in zip(
            self._plans, self._segment_rows, self._row_views, strict=True
        ):
            parts = []
            for seg, (first, end) in zip(plan, bounds, strict=True):
                items = [tensors[x] if isinstance(x, int) else x for x in seg]
                # a new tensor (never a view of the input: it is overwritten below)
                t = torch.cat([items[0].reshape(-1)]) if len(items) == 1 else None
                t = _flatten_dense_tensors(items) if t is None else t
                t, x = t.view(-1, self.chunk), rows[first:end]
                k = [row_sq(t)] if self_dot else []
                if buffer_sq:
                    k.append(row_sq(x))
                # ⟨t, x⟩ last: t ← t ⊙ x in place (no product temporary; a narrower buffer is
                # promoted to t's dtype inside the kernel), then row sums
                if t.dtype in _WIDE and x.dtype.itemsize <= t.dtype.itemsize:
                    k.insert(0, t.mul_(x).sum(1, dtype=torch.float32))
                else:
                    k.insert(0, _row_dot(t, x))
                parts.append(torch.stack(k))
            out.append(parts[0] if len(parts) == 1 else torch.cat(parts, 1))
        return out

    def row_sq_norms(self) -> list[Tensor]:
        """Per-row squared norms of the buffer (float32, one tensor per group, on its device)."""
        return [row_sq(v) for v in self._row_views]  # the kernel dots_with(buffer_sq) uses

    def param_totals(self, per_row: Sequence[Tensor]) -> Tensor:
        """``[k, n_params]`` (float32, CPU): ``k`` per-row quantities summed per parameter.

        Args:
            per_row: One ``[k, rows]`` (or ``[rows]``, read as ``k = 1``) tensor per group.
        """
        out = None
        for x, rows in zip(per_row, self._row_param, strict=True):
            x = x.view(-1, x.shape[-1])
            part = torch.zeros(x.shape[0], self.num_params, device=rows.device)
            part = part.index_add_(1, rows, x).cpu()
            out = part if out is None else out + part
        if out is None:
            return torch.zeros(1, self.num_params)
        return out

    # ------------------------------------------------------------------ in place
    def zero_(self) -> None:
        """Zero every element (parameters and padding)."""
        for flat in self.flats:
            flat.zero_()
