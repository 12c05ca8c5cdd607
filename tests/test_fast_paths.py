"""Per-step fast paths give the numbers of the general paths they stand in for, bit for bit.

GRAFF's LR is a function of these numbers, so a fast path that differed by one ulp would change
the LR trajectory (``tests/test_golden_trajectories.py`` checks the end result on a few runs;
these tests check each fast path against its general path on random inputs, edge values
included).
"""

from __future__ import annotations

import copy

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from graff.probes._flat import FlatBlockBuffer
from graff.probes._update import UpdateBuffer


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor (NaNs compare equal when their payloads are)."""
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


# --------------------------------------------------------------------------- UpdateBuffer.take
@settings(max_examples=60, deadline=None)
@given(
    shapes=st.lists(st.lists(st.integers(1, 70), min_size=1, max_size=3), min_size=1, max_size=6),
    blocks=st.integers(1, 3),
    chunk=st.sampled_from([1, 4, 256]),
    seed=st.integers(0, 2**16),
    scale=st.sampled_from([1e-30, 1e-3, 1.0, 1e20]),
    poison=st.sampled_from([None, "nan", "inf"]),
)
def test_take_rounded_equals_the_general_take(shapes, blocks, chunk, seed, scale, poison) -> None:
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g) for s in shapes]
    block_of = [int(torch.randint(0, blocks, (1,), generator=g)) for _ in params]
    fast = UpdateBuffer(params, block_of, torch.bfloat16)
    fast.flat = FlatBlockBuffer(params, block_of, chunk=chunk, dtype=torch.bfloat16)
    assert fast._float_copy  # float32 parameters on the CPU, bfloat16 storage
    slow = copy.deepcopy(fast)
    slow._float_copy = False
    after = [p + scale * torch.randn(p.shape, generator=g) for p in params]
    grads = [scale * torch.randn(p.shape, generator=g) for p in params]
    if poison is not None:
        grads[-1].view(-1)[0] = float(poison)
    idx = list(range(len(params)))
    for buf in (fast, slow):
        buf.hold(params, idx)
        buf.take(after, idx, grads)
    for a, b in zip(fast.flat.flats, slow.flat.flats, strict=True):
        assert torch.equal(_bits(a), _bits(b))
    for name in ("gdu", "usq"):
        assert torch.equal(_bits(getattr(fast, name)), _bits(getattr(slow, name))), name
    assert fast.valid == slow.valid
    assert fast.incomplete == slow.incomplete
    assert fast._theta is None
    assert slow._theta is None


def test_take_of_some_parameters_takes_the_general_path() -> None:
    params = [torch.randn(3, 5), torch.randn(7)]
    buf = UpdateBuffer(params, [0, 1], torch.bfloat16)
    buf.hold(params, [0])
    called = []
    buf._take_rounded = lambda *a: called.append(a)  # type: ignore[method-assign]
    buf.take([p + 1 for p in params], [0], [torch.ones(3, 5)])
    assert not called
    assert buf.valid == {0}
    assert float(buf.gdu[0]) == 15.0  # ⟨g, Δθ⟩ = ⟨1, 1⟩ over 15 entries
