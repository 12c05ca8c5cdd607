"""Fused block sums, subsampled per-step statistics, chunked cold starts and subsampled entropy."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_tiny_lora, make_tiny_qwen3
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from graff.blocks import Block
from graff.errors import CheckpointError, GraffConfigError, ProbeError
from graff.probes._flat import FlatBlockBuffer
from graff.probes.curvature import CurvatureProbe
from graff.probes.entropy import EntropyProbe


# --------------------------------------------------------------------------- flat block buffer
@settings(max_examples=40, deadline=None)
@given(
    shapes=st.lists(st.lists(st.integers(1, 40), min_size=1, max_size=3), min_size=1, max_size=7),
    blocks=st.integers(1, 4),
    chunk=st.sampled_from([1, 4, 16, 256]),
    seed=st.integers(0, 2**16),
    mixed=st.booleans(),
)
def test_block_sums_equal_per_block_dot_products(shapes, blocks, chunk, seed, mixed) -> None:
    g = torch.Generator().manual_seed(seed)
    params = [
        torch.randn(s, generator=g, dtype=torch.float64 if mixed and j % 2 else torch.float32)
        for j, s in enumerate(shapes)
    ]
    block_of = [int(torch.randint(0, blocks, (1,), generator=g)) for _ in params]
    buf = FlatBlockBuffer(params, block_of, chunk=chunk)
    assert len(buf.flats) == (2 if mixed and len(params) > 1 else 1)
    others = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
    for view, p in zip(buf.views, params, strict=True):
        assert view.shape == p.shape
        assert view.dtype == p.dtype
        view.copy_(p)
    expect_dot = torch.zeros(blocks, dtype=torch.float64)
    expect_sq = torch.zeros(blocks, dtype=torch.float64)
    for p, o, b in zip(params, others, block_of, strict=True):
        expect_dot[b] += (p.double() * o.double()).sum()
        expect_sq[b] += p.double().pow(2).sum()
    index = torch.tensor(block_of)

    def to_blocks(per_param: torch.Tensor) -> torch.Tensor:  # what the probe's _record does
        return torch.zeros(per_param.shape[0], blocks).index_add_(1, index, per_param).double()

    per_param = buf.param_totals(buf.dots_with(others, buffer_sq=True))
    torch.testing.assert_close(to_blocks(per_param)[0], expect_dot, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(to_blocks(per_param)[1], expect_sq, rtol=1e-4, atol=1e-4)
    squares = buf.param_totals(buf.row_sq_norms())
    torch.testing.assert_close(to_blocks(squares)[0], expect_sq, rtol=1e-4, atol=1e-4)
    buf.zero_()
    assert all(int(f.count_nonzero()) == 0 for f in buf.flats)


def test_flat_buffer_memory_is_one_copy_plus_padding() -> None:
    params = [torch.zeros(300, 7), torch.zeros(5), torch.zeros(64, 64)]
    buf = FlatBlockBuffer(params, [0, 0, 1], chunk=256)
    n = sum(p.numel() for p in params)
    total = sum(f.numel() for f in buf.flats)
    assert n <= total < n + 3 * 256  # less than one chunk of padding per parameter tensor


@settings(max_examples=30, deadline=None)
@given(
    shapes=st.lists(st.lists(st.integers(1, 30), min_size=1, max_size=3), min_size=1, max_size=6),
    chunk=st.sampled_from([1, 4, 16, 256]),
    seed=st.integers(0, 2**16),
)
def test_dots_with_gives_per_parameter_dot_products(shapes, chunk, seed) -> None:
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g) for s in shapes]
    block_of = [j % 2 for j in range(len(params))]
    buf = FlatBlockBuffer(params, block_of, chunk=chunk)
    for view, p in zip(buf.views, params, strict=True):
        view.copy_(p)
    others = [torch.randn(p.shape, generator=g) for p in params]
    per_param = buf.param_totals(buf.dots_with(others, self_dot=True, buffer_sq=True))
    expect = torch.stack(
        [
            torch.stack(
                [(p.double() * o.double()).sum() for p, o in zip(params, others, strict=True)]
            ),
            torch.stack([o.double().pow(2).sum() for o in others]),
            torch.stack([p.double().pow(2).sum() for p in params]),
        ]
    )
    torch.testing.assert_close(per_param.double(), expect, rtol=1e-4, atol=1e-4)


@settings(max_examples=30, deadline=None)
@given(
    shapes=st.lists(st.lists(st.integers(1, 30), min_size=1, max_size=3), min_size=1, max_size=6),
    chunk=st.sampled_from([1, 4, 16, 256]),
    seed=st.integers(0, 2**16),
    narrow=st.booleans(),
)
def test_gather_copies_tensors_into_the_buffer_layout(shapes, chunk, seed, narrow) -> None:
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g) for s in shapes]
    buf = FlatBlockBuffer(
        params,
        [j % 3 for j in range(len(params))],
        chunk=chunk,
        dtype=torch.bfloat16 if narrow else None,
    )
    (flat,) = buf.gather(params)
    assert flat.dtype == torch.float32  # the tensors' dtype, whatever the buffer stores
    assert flat.shape == buf.flats[0].shape
    for p, v in zip(params, buf.views, strict=True):
        start = v.data_ptr() - buf.flats[0].data_ptr()
        offset = start // buf.flats[0].element_size()
        torch.testing.assert_close(flat[offset : offset + p.numel()], p.reshape(-1), rtol=0, atol=0)
    assert float(flat.abs().sum()) == pytest.approx(sum(float(p.abs().sum()) for p in params))
    flat.zero_()  # a new tensor: the parameters are not views of it
    assert all(bool(p.ne(0).any()) for p in params if p.numel() > 0)


# --------------------------------------------------------------------------- bfloat16 update buffer
def _two_probe_run(steps: int = 12, stats_every: int = 1):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    exact = CurvatureProbe(opt, model=model, hvp=False, stats_every=stats_every)
    narrow = CurvatureProbe(
        opt, model=model, hvp=False, stats_every=stats_every, update_dtype=torch.bfloat16
    )
    x, y = torch.randn(64, 16), torch.randn(64, 4)
    pairs = []
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        if exact.last is not None:
            pairs.append((exact.last, narrow.last))
    return exact, narrow, pairs


def test_bfloat16_update_buffer_is_half_the_bytes_and_close_to_exact() -> None:
    exact, narrow, pairs = _two_probe_run()
    nbytes = [
        sum(f.numel() * f.element_size() for f in p._update.flat.flats) for p in (exact, narrow)
    ]
    assert nbytes[1] * 2 == nbytes[0]
    assert all(f.dtype == torch.bfloat16 for f in narrow._update.flat.flats)
    assert narrow._update._theta is None  # θ_t is held only between the pre- and post-step hooks
    assert len(pairs) == 11
    for a, b in pairs:
        assert a.step == b.step
        for field in ("hypergrad", "grad_dot_update", "update_sq_norm", "grad_sq_norm"):
            torch.testing.assert_close(getattr(b, field), getattr(a, field), rtol=1e-2, atol=1e-9)
        # the bf16 rounding is not nothing: the update itself differs entry by entry
    delta = [
        v.float() - w
        for v, w in zip(narrow._update.flat.views, exact._update.flat.views, strict=True)
    ]
    assert any(bool(d.abs().gt(0).any()) for d in delta)
    rel = max(
        float((d.abs() / w.abs().clamp_min(1e-12)).max())
        for d, w in zip(delta, exact._update.flat.views, strict=True)
        if w.numel()
    )
    assert rel <= 2.0**-8  # one rounding to bfloat16 (8 significant bits)


def test_bfloat16_update_buffer_refuses_to_rescale_and_bad_dtypes_raise() -> None:
    _, narrow, _ = _two_probe_run(steps=3)
    with pytest.raises(GraffConfigError, match="update_dtype=None"):
        narrow.scale_last_update(torch.ones(len(narrow.blocks)))
    p = nn.Parameter(torch.ones(3))
    for bad in (torch.int8, "bfloat16", 16):
        with pytest.raises(GraffConfigError, match="update_dtype"):
            CurvatureProbe(torch.optim.SGD([p], lr=0.1), hvp=False, update_dtype=bad)


def test_bfloat16_update_buffer_state_round_trip() -> None:
    exact, narrow, _ = _two_probe_run(steps=4, stats_every=1)
    state = narrow.state_dict()
    assert all(t.dtype == torch.bfloat16 for t in state["update"].values())
    exact.load_state_dict(state)  # a float32 probe can resume from a bfloat16 one
    for v, w in zip(exact._update.flat.views, narrow._update.flat.views, strict=True):
        torch.testing.assert_close(v, w.float())


# --------------------------------------------------------------------------- subsampled stats
def _quadratic_run(stats_every: int, steps: int = 9):
    torch.manual_seed(0)
    a = torch.randn(6, 6, dtype=torch.float64)
    a = a @ a.T + torch.eye(6, dtype=torch.float64)
    x1 = nn.Parameter(torch.randn(4, dtype=torch.float64))
    x2 = nn.Parameter(torch.randn(2, dtype=torch.float64))
    opt = torch.optim.Adam([x1, x2], lr=0.05)
    blocks = [Block("a", (x1,)), Block("b", (x2,))]
    every = CurvatureProbe(opt, blocks=blocks, hvp=False)
    sampled = CurvatureProbe(opt, blocks=blocks, hvp=False, stats_every=stats_every)
    seen: dict[str, dict[int, object]] = {"every": {}, "sampled": {}}
    for _ in range(steps):
        opt.zero_grad()
        x = torch.cat([x1, x2])
        (0.5 * x @ a @ x).backward()
        opt.step()
        for name, probe in (("every", every), ("sampled", sampled)):
            if probe.last is not None:
                seen[name][probe.last.step] = probe.last
    return seen


@pytest.mark.parametrize("k", [2, 3])
def test_subsampled_statistics_are_the_full_ones_on_the_sampled_steps(k: int) -> None:
    seen = _quadratic_run(k)
    assert sorted(seen["sampled"]) == [s for s in sorted(seen["every"]) if s % k == 0]
    for step, got in seen["sampled"].items():
        want = seen["every"][step]
        for field in ("hypergrad", "grad_dot_update", "update_sq_norm", "grad_sq_norm", "secant"):
            torch.testing.assert_close(getattr(got, field), getattr(want, field))


# --------------------------------------------------------------------------- chunked cold start
def _spectrum(d: int, lam_max: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    eigs = torch.linspace(lam_max / 50, lam_max, d, dtype=torch.float64)
    return q @ torch.diag(eigs) @ q.T


def _chunked_probe(opt, x, a, chunk_iters: int) -> CurvatureProbe:
    """A probe on ``½ xᵀAx`` whose 20-product first estimate runs ``chunk_iters`` per step."""
    return CurvatureProbe(
        opt,
        loss_fn=lambda: 0.5 * x @ a @ x,
        every=1000,
        initial_iters=20,
        chunk_iters=chunk_iters,
        start_step=0,
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_chunked_cold_start_publishes_after_the_last_chunk_and_is_accurate(seed: int) -> None:
    a = _spectrum(40, 100.0, seed)
    x = nn.Parameter(torch.randn(40, dtype=torch.float64))
    opt = torch.optim.SGD([x], lr=1e-4)
    probe = _chunked_probe(opt, x, a, chunk_iters=6)
    published = []
    for _ in range(5):
        opt.zero_grad()
        (0.5 * x @ a @ x).backward()
        opt.step()
        published.append(probe.lambda_max)
    # 20 products in chunks of 6: steps 1, 2, 3 run 6 each, step 4 the last 2 and publishes
    assert published[:3] == [None, None, None]
    assert published[3] is not None
    assert published[4] == published[3]
    assert probe.n_estimates == 1
    assert 0.9 * 100.0 <= probe.lambda_max <= 100.0 * (1 + 1e-5)


def test_chunked_cold_start_resumes_mid_way() -> None:
    a = _spectrum(20, 10.0, 0)

    def build():
        x = nn.Parameter(torch.ones(20, dtype=torch.float64))
        opt = torch.optim.SGD([x], lr=1e-3)
        return x, opt, _chunked_probe(opt, x, a, chunk_iters=5)

    def run(x, opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            (0.5 * x @ a @ x).backward()
            opt.step()

    x, opt, probe = build()
    run(x, opt, 2)  # two of four chunks
    state, opt_state, x_saved = probe.state_dict(), opt.state_dict(), x.detach().clone()
    assert state["estimator"]["cold_iters_done"] == 10
    assert probe.lambda_max is None
    run(x, opt, 2)
    x2, opt2, probe2 = build()
    with torch.no_grad():
        x2.copy_(x_saved)
    opt2.load_state_dict(opt_state)
    probe2.load_state_dict(state)
    run(x2, opt2, 2)
    assert probe2.lambda_max == pytest.approx(probe.lambda_max, rel=1e-6)
    estimator = {k: v for k, v in state["estimator"].items() if k != "cold_iters_done"}
    incomplete = {**state, "estimator": estimator}
    with pytest.raises(CheckpointError, match="cold_iters_done"):
        probe2.load_state_dict(incomplete)


def test_max_every_caps_the_auto_interval() -> None:
    a = _spectrum(10, 5.0, 0)
    x = nn.Parameter(torch.ones(10, dtype=torch.float64))
    opt = torch.optim.SGD([x], lr=1e-3)
    probe = CurvatureProbe(
        opt,
        loss_fn=lambda: 0.5 * x @ a @ x,
        overhead_target=1e-6,
        min_every=2,
        max_every=3,
        start_step=0,
    )
    for _ in range(8):
        opt.zero_grad()
        (0.5 * x @ a @ x).backward()
        opt.step()
    assert probe.interval == 3  # the 1e-6 target alone asks for millions of steps
    assert probe.n_estimates == 3  # after steps 1, 4 and 7
    with pytest.raises(GraffConfigError, match="max_every"):
        CurvatureProbe(opt, loss_fn=lambda: x.sum(), min_every=5, max_every=4)


# --------------------------------------------------------------------------- entropy every k
def test_entropy_every_k_decodes_the_same_tokens_as_every_pass(token_batch) -> None:
    model = make_tiny_lora(make_tiny_qwen3())
    full = EntropyProbe(model, max_tokens=7, seed=3)
    sub = EntropyProbe(model, max_tokens=7, seed=3, every=2)
    readings: list[tuple[torch.Tensor, torch.Tensor]] = []
    with torch.no_grad():
        for call in range(5):
            before = sub.entropies
            model(input_ids=token_batch["input_ids"])
            if call % 2 == 0:
                assert torch.equal(sub.token_index, full.token_index)
                torch.testing.assert_close(sub.entropies, full.entropies)
                readings.append((sub.token_index, sub.entropies))
            else:
                assert sub.entropies is before  # skipped passes leave the readings in place
    assert sub.calls == full.calls == 5
    assert len({tuple(i.tolist()) for i, _ in readings}) > 1  # a fresh subset per decoded pass
    with pytest.raises(ProbeError, match="every"):
        EntropyProbe(model, max_tokens=None, every=2).token_weights()
    assert math.isfinite(sub.mean_entropy())
    full.remove()
    sub.remove()


# --------------------------------------------------------------------------- int8 eigenvector
@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 300),
    log_scale=st.floats(-30, 30),
    seed=st.integers(0, 2**16),
)
def test_int8_eigenvector_round_trips_bitwise_and_is_close(n, log_scale, seed) -> None:
    from graff.probes._hvp import dequantize_int8, quantize_int8

    x = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 2.0**log_scale
    q, s = quantize_int8(x)
    assert q.dtype == torch.int8
    assert int(q.abs().max()) >= 64  # the power-of-two scale is the smallest that fits
    deq = dequantize_int8(q, s)
    assert float((deq - x).abs().max()) <= 0.5 * s * (1 + 1e-6)  # half a quantization step
    saved = dequantize_int8(q, s, torch.bfloat16)  # what state_dict stores
    assert torch.equal(saved.float(), deq)  # exact in bfloat16
    q2, s2 = quantize_int8(saved.float())
    assert s2 == s
    assert torch.equal(q2, q)
    cos = float(deq @ x / (deq.norm() * x.norm()))
    assert cos > 0.999
