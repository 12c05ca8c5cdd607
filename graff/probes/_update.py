"""The last update the optimizer applied, Δθ_t, kept between two steps for the curvature probe.

The probe's pre-step hook copies θ_t in (:meth:`UpdateBuffer.hold`), its post-step hook turns
it into ``D = θ_t − θ_{t+1} = −Δθ_t`` (:meth:`UpdateBuffer.take`, which skips the negation: one
pass less) with ⟨g_t, Δθ_t⟩ and ‖Δθ_t‖² per parameter, and the next pre-step hook reads it
against the new gradient. One flat buffer (:class:`graff.probes._flat.FlatBlockBuffer`) holds
it, optionally in a narrower dtype than the parameters: θ_t then waits in the parameters' dtype
from the pre-step to the post-step hook, and Δθ_t is rounded once.

All tensors given to the methods are the probe's local tensors (the shards under FSDP2), in the
probe's parameter order.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from graff.errors import CheckpointError
from graff.probes._flat import FlatBlockBuffer, row_sq


class UpdateBuffer:
    """Δθ_t as ``D = −Δθ_t``, and which parameters hold a valid update.

    Attributes:
        flat: The flat storage of D.
        narrow: The storage dtype is narrower than some parameter's (θ_t is held separately).
        gdu, usq: ⟨g_t, Δθ_t⟩ and ‖Δθ_t‖² per parameter (float32, CPU).
        valid: The parameters whose entries of D hold Δθ_t.
        incomplete: The last update had non-finite entries (the next sample is dropped).
        has_update: The post-step hook buffered an update (a sample is due).
    """

    def __init__(
        self, params: Sequence[Tensor], block_of: Sequence[int], dtype: torch.dtype | None
    ) -> None:
        self.flat = FlatBlockBuffer(params, block_of, dtype=dtype)
        self.narrow = dtype is not None and any(
            p.is_floating_point() and p.element_size() > dtype.itemsize for p in params
        )
        self._theta: list[Tensor] | None = None
        # take() of a full update reads the rounded D back into θ_t's float32 copy (CPU: there
        # bfloat16 arithmetic is slow); elsewhere it computes from the buffer (_take_rounded)
        self._float_copy = self.narrow and all(
            p.dtype == torch.float32 and p.device.type == "cpu" for p in params
        )
        self.n = len(params)
        self.usq = torch.zeros(self.n)
        self.gdu = torch.zeros(self.n)
        self.valid: set[int] = set()
        self.incomplete = False
        self.has_update = False

    def hold(self, params: Sequence[Tensor], have: list[int]) -> None:
        """Copy θ_t of the parameters in ``have`` (all of ``params`` are given)."""
        if self.narrow:  # θ_t in the parameters' dtype, buffer layout, until post-step
            self._theta = self.flat.gather(params)
            return
        partial = len(have) < self.n
        if partial:
            self.flat.zero_()  # entries of parameters without a gradient stay 0
        views = self.flat.views
        sources = [params[j] for j in have] if partial else list(params)
        torch._foreach_copy_([views[j] for j in have] if partial else views, sources)

    def take(self, params: Sequence[Tensor], idx: list[int], grads: Sequence[Tensor]) -> None:
        """D = θ_t − θ_{t+1} for ``idx`` (``grads``: their g_t, in order), with ⟨g_t, Δθ_t⟩, ‖Δθ_t‖²."""
        full = len(idx) == self.n
        if self._theta is not None and full and self._float_copy:
            per_param = self._take_rounded(params, grads)
        else:
            per_param = self._take(params, idx, grads, full)
        per_param[0].neg_()  # ⟨g_t, Δθ_t⟩ = −⟨g_t, D⟩
        # A NaN/inf gradient or update is not kept: no NaN in the state, no sample from it.
        # The sum is finite only if every term is (one host read in the usual case).
        if math.isfinite(float(per_param.sum())) or bool(per_param.isfinite().all()):
            self.valid = set(idx)
        else:
            finite = torch.isfinite(per_param[0]).tolist()
            self.valid = {j for j in idx if finite[j]}
            self.incomplete = True
            per_param = torch.nan_to_num(per_param, 0.0, 0.0, 0.0)
        self.gdu, self.usq = per_param[0], per_param[1]
        self.has_update = True

    def _take(
        self, params: Sequence[Tensor], idx: list[int], grads: Sequence[Tensor], full: bool
    ) -> Tensor:
        """D into the buffer; ``[⟨g_t, D⟩, ‖D‖²]`` per parameter (any dtype, device, subset)."""
        flat = self.flat
        if self._theta is not None:  # D in the parameters' dtype, stored rounded
            now = flat.gather(params)
            for buffer, before, after in zip(flat.flats, self._theta, now, strict=True):
                buffer.copy_(before.sub_(after))  # outside idx: ignored by the sums
            self._theta = None
        else:
            views = flat.views if full else [flat.views[j] for j in idx]
            sources = list(params) if full else [params[j] for j in idx]
            torch._foreach_sub_(views, sources)  # D = θ_t − θ_{t+1} = −Δθ_t (0 elsewhere)
        # ⟨g_t, D⟩ and ‖D‖² per parameter: row reductions while the buffer is in cache
        all_grads = list(grads) if full else list(flat.views)
        if not full:  # entries outside idx are 0: any tensor of the shape will do
            for j, g in zip(idx, grads, strict=True):
                all_grads[j] = g
        return flat.param_totals(flat.dots_with(all_grads, buffer_sq=True))

    def _take_rounded(self, params: Sequence[Tensor], grads: Sequence[Tensor]) -> Tensor:
        """:meth:`_take` of every parameter, float32 on the CPU, narrow buffer: the same numbers.

        θ_t's gathered copy becomes D in place (no gathered θ_{t+1}), is rounded into the buffer
        and read back, so it holds the stored D exactly, in float32. The sums then run on it
        instead of the buffer: ``‖D‖²`` rows are the same float32 reduction of the same values
        (``vector_norm`` casts a bfloat16 input to float32 first); ``g ⊙ D`` is formed in place
        in D's copy (float32 products commute), not in a gathered copy of the gradients, and
        summed by rows as :meth:`FlatBlockBuffer.dots_with` does. Bit for bit its result, at
        about half the passes over memory and without bfloat16 arithmetic, which is slow on CPUs.
        """
        flat, theta = self.flat, self._theta
        assert theta is not None
        self._theta = None
        views = flat.views_of(theta)
        torch._foreach_sub_(views, list(params))  # D = θ_t − θ_{t+1}, float32
        rows = []
        for buffer, d in zip(flat.flats, theta, strict=True):
            buffer.copy_(d)  # D rounded once, as stored
            d.copy_(buffer)  # ... and back: the stored D, exactly
            rows.append(d.view(-1, flat.chunk))
        sq = [row_sq(r) for r in rows]  # ‖D‖² by rows, before D is overwritten
        torch._foreach_mul_(views, list(grads))  # D ⊙ g_t in place (padding stays 0)
        dots = [r.sum(1, dtype=torch.float32) for r in rows]
        return flat.param_totals([torch.stack(k) for k in zip(dots, sq, strict=True)])

    def rescale(self, params: Sequence[Tensor], factors: Sequence[float]) -> None:
        """θ ← θ + (f − 1)·Δθ for the valid parameters (in sorted order), and D, gdu, usq with it."""
        for j, f, param in zip(sorted(self.valid), factors, params, strict=True):
            if f != 1.0:
                param.add_(self.flat.views[j], alpha=1.0 - f)  # D = −Δθ
                self.flat.views[j].mul_(f)
                self.gdu[j] *= f
                self.usq[j] *= f * f

    def saved(self) -> dict[int, Tensor]:
        """Δθ_t of the valid parameters (CPU copies)."""
        return {j: self.flat.views[j].detach().neg().cpu() for j in sorted(self.valid)}

    def load(self, update: object, gdu: object, params: Sequence[Tensor]) -> None:
        """Restore :meth:`saved` output and ``gdu``; raise CheckpointError if they do not fit."""
        if (
            not isinstance(update, Mapping)
            or not isinstance(gdu, Tensor)
            or gdu.shape != self.gdu.shape
            or not gdu.is_floating_point()
        ):
            raise CheckpointError("CurvatureProbe state has an invalid saved update.")
        for j, delta in update.items():
            if not (0 <= int(j) < self.n) or delta.shape != params[int(j)].shape:
                raise CheckpointError(f"saved update {j} does not fit the probed parameters.")
        self.flat.zero_()
        with torch.no_grad():
            for j, delta in update.items():
                self.flat.views[int(j)].copy_(delta).neg_()  # the buffer holds −Δθ
        self.usq = self.flat.param_totals(self.flat.row_sq_norms())[0]
        self.valid = {int(j) for j in update}
        self.gdu = gdu.clone()
